"""CUDA depthwise conv and state fusion against the PyTorch reference (computed in float32): outputs and input,
weight, bias (and alpha) gradients per dtype, at the Spatial-Mamba stage shapes, odd sizes, random shapes."""
import random

import pytest
import torch
from conftest import has_kernel
from fixture_utils import rel_err
from ops.shapes import fusion_cases

from vssm.ops import dwconv2d, state_fusion

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and has_kernel('dwconv2d')),
                                reason='needs a GPU and the built kernel: see kernels/README.md')

# max|kernel - reference| / max|reference|; the reference runs in float32 on the same (rounded) inputs.
OUT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
PARAM_GRAD_TOL = 1e-4  # weight/bias/alpha gradients: float32 sums over B x H x W of the same products


def _run(fn, leaves, dout):
    out = fn(**leaves)
    (out.float() * dout).sum().backward()
    return out


def compare(kernel_fn, ref_fn, inputs, dtype, x_key):
    leaves_k = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    leaves_r = {k: v.detach().float().clone().requires_grad_() for k, v in inputs.items()}
    # The kernel's output has the input dtype, so its incoming gradient is rounded to it: give the reference the same.
    dout = torch.randn(inputs[x_key].shape, device='cuda').to(dtype).float()
    out_k = _run(kernel_fn, leaves_k, dout)
    out_r = _run(ref_fn, leaves_r, dout)
    assert out_k.dtype == dtype
    assert rel_err(out_k, out_r) < OUT_TOL[dtype], ('out', rel_err(out_k, out_r))
    for key in inputs:
        tol = OUT_TOL[dtype] if key == x_key else PARAM_GRAD_TOL
        assert rel_err(leaves_k[key].grad, leaves_r[key].grad) < tol, (key, rel_err(leaves_k[key].grad,
                                                                                   leaves_r[key].grad))


def dense_case(b, c, h, w, k, dilation, mode, dtype, bias=True, seed=0):
    g = torch.Generator(device='cuda').manual_seed(seed)
    inputs = dict(x=torch.randn(b, c, h, w, device='cuda', generator=g).to(dtype),
                  weight=torch.randn(c, 1, k, k, device='cuda', generator=g) / k)
    if bias:
        inputs['bias'] = torch.randn(c, device='cuda', generator=g)
    compare(lambda **a: dwconv2d(**a, dilation=dilation, padding_mode=mode, backend='cuda'),
            lambda **a: dwconv2d(**a, dilation=dilation, padding_mode=mode, backend='torch'), inputs, dtype, 'x')


def fusion_case(b, c, h, w, mode, dtype, seed=0):
    g = torch.Generator(device='cuda').manual_seed(seed)
    inputs = dict(h=torch.randn(b, c, h, w, device='cuda', generator=g).to(dtype),
                  kernel_3=torch.randn(c, 1, 3, 3, device='cuda', generator=g) * 0.3,
                  kernel_3_1=torch.randn(c, 1, 3, 3, device='cuda', generator=g) * 0.3,
                  kernel_3_2=torch.randn(c, 1, 3, 3, device='cuda', generator=g) * 0.3,
                  alpha=torch.rand(3, device='cuda', generator=g) + 0.25)
    compare(lambda **a: state_fusion(**a, padding_mode=mode, backend='cuda'),
            lambda **a: state_fusion(**a, padding_mode=mode, backend='torch'), inputs, dtype, 'h')


@pytest.mark.parametrize('case', fusion_cases(), ids=lambda c: '-'.join(map(str, c[:3])))
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_state_fusion_model_shapes(case, dtype):
    _, _, _, d, h, w = case
    fusion_case(1, d, h, w, 'replicate', dtype)


@pytest.mark.parametrize('mode', ['replicate', 'zeros'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('size', [(1, 1), (2, 3), (5, 5), (7, 7), (14, 14), (17, 33), (56, 56), (40, 1)])
def test_state_fusion_odd_sizes(mode, dtype, size):
    fusion_case(2, 8, *size, mode, dtype)


# Replicate padding's backward folds the padded positions onto the border pixels: from running sums of the border
# bands in shared memory when the plane is at least reach + 1 = 6 pixels on each side and its bands fit in 48 KiB
# (6x6, 520x500: the largest that fit), one thread per border pixel otherwise (5x40, and H + W > 1024).
@pytest.mark.parametrize('size', [(6, 6), (520, 500), (5, 40), (6, 1100), (1100, 6)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_state_fusion_replicate_fold_paths(size, dtype):
    fusion_case(1, 3, *size, 'replicate', dtype)


@pytest.mark.parametrize('k, dilation', [(3, 1), (5, 1), (7, 1), (7, 2), (11, 1), (13, 1), (3, 5), (31, 1)])
@pytest.mark.parametrize('mode', ['zeros', 'replicate'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_dense_kernels(k, dilation, mode, dtype):
    dense_case(2, 6, 23, 37, k, dilation, mode, dtype)


@pytest.mark.parametrize('size', [(1, 1), (3, 2), (7, 7), (56, 56), (200, 336)])
def test_dense_11x11_sizes_without_bias(size):
    dense_case(1, 4, *size, 11, 1, 'zeros', torch.float32, bias=False)


def test_non_contiguous_input():
    x = torch.randn(2, 16, 20, 20, device='cuda')[:, ::2]
    weight = torch.randn(8, 1, 5, 5, device='cuda')
    torch.testing.assert_close(dwconv2d(x, weight, backend='cuda'), dwconv2d(x, weight, backend='torch'), rtol=1e-5,
                               atol=1e-5)


def test_random_shapes():
    rng = random.Random(0)
    for trial in range(200):
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        mode = rng.choice(['zeros', 'replicate'])
        b, c, h, w = rng.randint(1, 3), rng.randint(1, 12), rng.randint(1, 70), rng.randint(1, 70)
        if rng.random() < 0.5:
            fusion_case(b, c, h, w, mode, dtype, seed=trial)
        else:
            k, dil = rng.choice([1, 3, 5, 7, 9, 11, 15]), rng.randint(1, 3)
            dense_case(b, c, h, w, k, dil, mode, dtype, bias=rng.random() < 0.5, seed=trial)


def test_opcheck():
    x = torch.randn(2, 4, 9, 13, device='cuda', requires_grad=True)
    weight = torch.randn(4, 25, device='cuda', requires_grad=True)
    for replicate in (False, True):
        torch.library.opcheck(torch.ops.vssm_dwconv2d.fwd.default,
                              (x, weight, None, [3, 3, 3], [1, 3, 5], [False, True, True], replicate))


def test_torch_compile_matches_eager():
    h = torch.randn(2, 8, 14, 14, device='cuda')
    kernels = [torch.randn(8, 1, 3, 3, device='cuda', requires_grad=True) for _ in range(3)]
    alpha = torch.ones(3, device='cuda', requires_grad=True)

    def fn(h, *params):
        return state_fusion(h, *params, backend='cuda').square().sum()

    eager = fn(h, *kernels, alpha)
    compiled = torch.compile(fn, fullgraph=True)(h, *kernels, alpha)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_cuda_backend_rejects_what_the_kernel_cannot_do():
    x = torch.randn(1, 2, 8, 8, device='cuda', dtype=torch.float64)
    with pytest.raises(ValueError, match='CUDA kernel takes'):
        dwconv2d(x, torch.randn(2, 1, 3, 3, device='cuda', dtype=torch.float64), backend='cuda')
    with pytest.raises(ValueError, match='kernel sizes up to 31'):
        dwconv2d(x.float(), torch.randn(2, 1, 33, 33, device='cuda'), backend='cuda')
