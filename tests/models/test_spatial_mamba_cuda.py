"""SpatialMamba with the CUDA kernels against the PyTorch references, on a GPU (outputs and gradients)."""
import pytest
import torch
from conftest import has_kernel
from fixture_utils import rel_err

from vssm.models import SpatialMamba

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel('selective_scan') and has_kernel('dwconv2d')),
    reason='needs a GPU and both kernels: see kernels/README.md')


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_kernels_match_reference_in_the_backbone(dtype):
    torch.manual_seed(0)
    ref = SpatialMamba(dict(dims=32, depths=[1, 2, 2, 1]), out_indices=(0, 1, 2, 3), ops_backend='torch').cuda()
    ker = SpatialMamba(dict(dims=32, depths=[1, 2, 2, 1]), out_indices=(0, 1, 2, 3), ops_backend='cuda').cuda()
    ker.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 96, 128, device='cuda')
    outs = []
    for model in (ref, ker):
        with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)
        sum(o.float().square().mean() for o in out).backward()
        outs.append(out)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(*outs):
        assert rel_err(b, a) < tol
    for (name, p), q in zip(ref.named_parameters(), ker.parameters()):
        assert rel_err(q.grad, p.grad) < tol * 10, name
