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
    arch = dict(dims=32, depths=[1, 2, 2, 1])
    ref = SpatialMamba(arch, out_indices=(0, 1, 2, 3), ops_backend='torch').cuda()
    ker = SpatialMamba(arch, out_indices=(0, 1, 2, 3), ops_backend='cuda').cuda()
    ker.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 96, 128, device='cuda')
    # A random projection of the outputs (sum(o**2) of LayerNorm outputs would be constant, its gradient noise).
    proj = [torch.randn(2, c, 96 // s, 128 // s, device='cuda') for c, s in zip(ref.out_channels, (4, 8, 16, 32))]
    outs = []
    for model in (ref, ker):
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(x)
        sum((o.float() * p).sum() for o, p in zip(out, proj)).backward()
        outs.append(out)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(*outs):
        assert rel_err(b, a) < tol
    # Gradients relative to each tensor's scale, but at least 1% of the largest gradient. The conv biases that a
    # BatchNorm follows (downsample.conv.2.conv.bias) have a true gradient of 0: what both paths give there is noise.
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    for (name, p), q in zip(ref.named_parameters(), ker.parameters()):
        if name.endswith('conv.2.conv.bias'):
            continue
        err = (q.grad - p.grad).abs().max().item() / max(p.grad.abs().max().item(), 1e-2 * scale)
        assert err < tol * 10, (name, err)
