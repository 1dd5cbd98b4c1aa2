"""Shared pytest helpers: devices, kernel availability, tolerances, fixtures' folder on sys.path, fuzzing options."""
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # fixture_utils

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup('vssm', 'vssm kernel fuzzing (tests/ops/test_fuzz_kernels_cuda.py)')
    group.addoption('--fuzz-cases', type=int, default=int(os.environ.get('VSSM_FUZZ_CASES', 20)),
                    help='random cases per op for the kernel fuzzing tests (default: $VSSM_FUZZ_CASES or 20)')
    group.addoption('--fuzz-seed', type=int, default=int(os.environ.get('VSSM_FUZZ_SEED', 0)),
                    help='seed of the fuzzing cases (default: $VSSM_FUZZ_SEED or 0)')


def load_tool(relative: str) -> ModuleType:
    """A script of the repository (tools/ is no package) imported by path, e.g. ``load_tool('tools/train.py')``."""
    path = REPO_ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# (rtol, atol) per dtype for kernel-vs-reference comparisons; gradients use GRAD_TOLERANCES.
TOLERANCES = {
    torch.float32: (6e-4, 2e-3),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (3e-2, 5e-2),
    torch.float64: (1e-10, 1e-12),
}
GRAD_TOLERANCES = {
    torch.float32: (1e-3, 5e-3),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (5e-2, 1e-1),
    torch.float64: (1e-9, 1e-11),
}

DEVICES = [
    'cpu',
    pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')),
]


def has_kernel(name: str) -> bool:
    """Whether the compiled vssm_<name> extension is installed."""
    from vssm.ops._backend import try_import_extension
    return try_import_extension(f'vssm_{name}') is not None


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope='session')
def _exact_cuda_references():
    """The PyTorch references on a GPU must not use TF32 (cuDNN convolutions default to it)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
