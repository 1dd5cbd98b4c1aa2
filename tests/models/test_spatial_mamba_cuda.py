"""SpatialMamba with the CUDA kernels against the PyTorch references, on a GPU (outputs and gradients)."""
import pytest
import torch
from conftest import has_kernel

from vssm.models import SpatialMamba

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel('selective_scan') and has_kernel('dwconv2d')),
    reason='needs a GPU and both kernels: see kernels/README.md')

ARCH = dict(dims=32, depths=[1, 2, 2, 1])


def run(backend, state_dict, x, proj, autocast):
    model = SpatialMamba(ARCH, out_indices=(0, 1, 2, 3), ops_backend=backend).cuda()
    model.load_state_dict(state_dict)
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
        outs = model(x)
    # A random projection of the outputs (sum(o**2) of LayerNorm outputs would be constant, its gradient noise).
    sum((o.float() * p).sum() for o, p in zip(outs, proj)).backward()
    # The conv biases that a BatchNorm follows have a true gradient of 0: what any path gives there is noise.
    grads = {n: p.grad for n, p in model.named_parameters() if not n.endswith('conv.2.conv.bias')}
    return [o.float() for o in outs], grads


def errors(outs, grads, gold_outs, gold_grads):
    """Per tensor: max|diff| / max|gold| (gradients: at least 1% of the largest gradient as the scale)."""
    scale = max(g.abs().max().item() for g in gold_grads.values())
    errs = {f'out{i}': ((a - b).abs().max() / b.abs().max()).item() for i, (a, b) in enumerate(zip(outs, gold_outs))}
    for name, g in grads.items():
        gold = gold_grads[name]
        errs[name] = (g - gold).abs().max().item() / max(gold.abs().max().item(), 1e-2 * scale)
    return errs


def test_kernels_match_reference_in_the_backbone():
    torch.manual_seed(0)
    state_dict = SpatialMamba(ARCH, out_indices=(0, 1, 2, 3)).state_dict()
    x = torch.randn(2, 3, 96, 128, device='cuda')
    proj = [torch.randn(2, c, 96 // s, 128 // s, device='cuda') for c, s in zip((32, 64, 128, 256), (4, 8, 16, 32))]
    gold = run('torch', state_dict, x, proj, autocast=False)
    # float32: the kernels agree with the references to rounding.
    for name, err in errors(*run('cuda', state_dict, x, proj, autocast=False), *gold).items():
        assert err < 1e-3, (name, err)
    # bf16 autocast: the kernel path is no further from float32 than the reference path under the same autocast.
    ref_bf16 = errors(*run('torch', state_dict, x, proj, autocast=True), *gold)
    ker_bf16 = errors(*run('cuda', state_dict, x, proj, autocast=True), *gold)
    for name, err in ker_bf16.items():
        assert err < max(2 * ref_bf16[name], 1e-2), (name, err, ref_bf16[name])
