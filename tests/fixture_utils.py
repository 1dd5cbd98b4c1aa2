"""Reading the upstream numeric fixtures in ``shared/reference/fixtures`` (see its README)."""
import hashlib
import json
import os
from pathlib import Path
from typing import Dict

import torch


def reference_dir() -> Path:
    """The folder holding the upstream manifests and fixtures (``$VSSM_REFERENCE_DIR`` or tests/data/reference)."""
    return Path(os.environ.get('VSSM_REFERENCE_DIR') or Path(__file__).parent / 'data' / 'reference')


def load_manifest(family: str, size: str, kind: str) -> dict:
    with open(reference_dir() / f'{family}_{size}_{kind}.json') as f:
        return json.load(f)


def load_fixture(name: str) -> dict:
    return torch.load(reference_dir() / 'fixtures' / f'{name}.pt', weights_only=True)


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max|expected - got| / max|expected|, the fixtures' metric."""
    got, expected = got.detach().double(), expected.detach().double()
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def fixture_weights(fixture: dict, check_sha: bool = True) -> Dict[str, torch.Tensor]:
    """The fixture's weights, from its tensors or regenerated from its recipe (vssm-fixture-uniform-v1)."""
    weights = fixture['weights']
    if weights['source'] == 'tensors':
        return dict(weights['tensors'])
    out = {}
    for key, shape, dtype, entry in weights['recipe']['table']:
        if 'const' in entry:
            t = torch.full(shape, entry['const'], dtype=getattr(torch, dtype))
        else:
            g = torch.Generator(device='cpu')
            g.manual_seed(entry['seed'])
            t = torch.rand(shape, generator=g, dtype=torch.float32) * entry['span'] + entry['lo']
        if check_sha and _sha256(t) != weights['sha256'][key]:
            raise AssertionError(f'fixture weight {key} does not match its sha256 after regeneration')
        out[key] = t
    return out
