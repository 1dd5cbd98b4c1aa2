"""Reference depthwise conv and Spatial-Mamba state fusion: definitions, gradcheck, fixtures, errors."""
import pytest
import torch
from conftest import DEVICES
from fixture_utils import load_fixture, rel_err
from ops.naive import naive_dwconv, naive_state_fusion

from vssm.ops import dwconv2d, merge_state_fusion_kernels, state_fusion, state_fusion_ref


@pytest.mark.parametrize('kernel, dilation', [(3, 1), (5, 2), (7, 1), (11, 1), (3, 5), (31, 1)])
@pytest.mark.parametrize('padding_mode', ['zeros', 'replicate'])
@pytest.mark.parametrize('device', DEVICES)
def test_dwconv2d_matches_tap_sum(kernel, dilation, padding_mode, device):
    x = torch.randn(2, 5, 9, 13, device=device)
    weight = torch.randn(5, 1, kernel, kernel, device=device)
    bias = torch.randn(5, device=device)
    got = dwconv2d(x, weight, bias, dilation=dilation, padding_mode=padding_mode)
    expected = naive_dwconv(x.cpu().double(), weight.cpu().double(), bias.cpu().double(), dilation, padding_mode)
    assert got.shape == x.shape
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('padding_mode', ['zeros', 'replicate'])
def test_dwconv2d_gradcheck(padding_mode):
    x = torch.randn(1, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: dwconv2d(*a, dilation=2, padding_mode=padding_mode),
                                    (x, weight, bias))


@pytest.mark.parametrize('padding_mode', ['zeros', 'replicate'])
@pytest.mark.parametrize('device', DEVICES)
def test_state_fusion_matches_dilated_tap_sums(padding_mode, device):
    h = torch.randn(2, 5, 13, 8, device=device)
    kernels = [torch.randn(5, 1, 3, 3, device=device) for _ in range(3)]
    alpha = torch.rand(3, device=device) + 0.5
    got = state_fusion(h, *kernels, alpha, padding_mode=padding_mode)
    expected = naive_state_fusion(h.cpu().double(), *(k.cpu().double() for k in kernels), alpha.cpu().double(),
                                  padding_mode)
    assert got.shape == h.shape
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('padding_mode', ['zeros', 'replicate'])
def test_state_fusion_equals_merged_11x11_kernel(padding_mode):
    h = torch.randn(2, 4, 12, 9, dtype=torch.float64)
    kernels = [torch.randn(4, 1, 3, 3, dtype=torch.float64) for _ in range(3)]
    alpha = torch.randn(3, dtype=torch.float64)
    merged = merge_state_fusion_kernels(*kernels, alpha)
    expected = dwconv2d(h, merged, padding_mode=padding_mode)
    torch.testing.assert_close(state_fusion(h, *kernels, alpha, padding_mode=padding_mode), expected)


def test_state_fusion_gradcheck():
    h = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    alpha = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(state_fusion_ref, (h, *params, alpha))


def test_state_fusion_upstream_fixture():
    fixture = load_fixture('state_fusion')
    tol = fixture['tolerances']['float32']
    params = fixture['params']
    merged = merge_state_fusion_kernels(params['kernel_3'], params['kernel_3_1'], params['kernel_3_2'],
                                        params['alpha'])
    assert rel_err(merged, fixture['merged_kernel_11x11']) < tol
    for name, case in fixture['cases'].items():
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        h = case['h'].clone().requires_grad_()
        out = state_fusion(h, **leaves)
        assert rel_err(out, case['out_train_replicate']) < tol, name
        assert rel_err(out, case['out_merged_kernel_replicate_pad']) < tol, name
        (out * case['dout']).sum().backward()
        grads = case['grads_train_replicate']
        assert rel_err(h.grad, grads['d_h']) < tol, name
        for key, leaf in leaves.items():
            assert rel_err(leaf.grad, grads[f'd_{key}']) < tol, (name, key)
        zero = state_fusion(case['h'], **params, padding_mode='zeros')
        assert rel_err(zero, case['out_eval_upstream_zero_pad']) < tol, name


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_state_fusion_keeps_low_precision_dtype(dtype):
    h = torch.randn(1, 4, 8, 8).to(dtype)
    kernels = [torch.randn(4, 1, 3, 3) for _ in range(3)]
    out = state_fusion(h, *kernels, torch.ones(3))
    assert out.dtype == dtype
    expected = state_fusion(h.float(), *kernels, torch.ones(3))
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize('call, message', [
    (lambda: dwconv2d(torch.randn(1, 4, 8), torch.randn(4, 1, 3, 3)), 'x must be'),
    (lambda: dwconv2d(torch.randn(1, 4, 8, 8), torch.randn(3, 1, 3, 3)), 'weight must be'),
    (lambda: dwconv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 4, 4)), 'must be odd'),
    (lambda: dwconv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3), padding_mode='reflect'), 'padding_mode'),
    (lambda: state_fusion(torch.randn(1, 4, 8, 8), *[torch.randn(4, 1, 3, 3)] * 2, torch.randn(4, 1, 5, 5),
                          torch.ones(3)), 'kernel 2 must be'),
    (lambda: state_fusion(torch.randn(1, 4, 8, 8), *[torch.randn(4, 1, 3, 3)] * 3, torch.ones(2)), 'alpha must be'),
])
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_inputs_with_float32_parameters(dtype):
    """As the kernel: fp16/bf16 activations with fp32 weight and bias (no autocast) work and match fp32."""
    x = torch.randn(2, 4, 9, 9)
    weight, bias = torch.randn(4, 1, 5, 5), torch.randn(4)
    out = dwconv2d(x.to(dtype), weight, bias, backend='torch')
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), dwconv2d(x, weight, bias, backend='torch'), rtol=5e-2, atol=1e-1)


def test_fusion_tap_weights_are_the_merged_kernels_taps():
    """The kernel path's (C, 25) weights, in the order of its tap groups, are the 25 non-zero taps of the merged 11x11
    kernel (the three centres summed); float32 under autocast; the device map is not cached for fake tensors."""
    import importlib

    from torch._subclasses.fake_tensor import FakeTensorMode
    dw = importlib.import_module('vssm.ops.dwconv2d')  # the module (the package exports the function of its name)
    ks = [torch.randn(6, 1, 3, 3, dtype=torch.float64) for _ in range(3)]
    alpha = torch.rand(3, dtype=torch.float64) + 0.5
    weights = dw._fusion_tap_weights(*ks, alpha)
    merged = merge_state_fusion_kernels(*(k.float() for k in ks), alpha.float())
    offsets = [((ky - 1) * dil, (kx - 1) * dil) for _, dil, skip in dw._FUSION_GROUPS for ky in range(3)
               for kx in range(3) if not (skip and ky == kx == 1)]
    assert weights.shape == (6, 25) and weights.dtype == torch.float32 and len(set(offsets)) == 25
    expected = torch.stack([merged[:, 0, 5 + oy, 5 + ox] for oy, ox in offsets], dim=1)
    torch.testing.assert_close(weights, expected)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert dw._fusion_tap_weights(*(k.float() for k in ks), alpha.float()).dtype == torch.float32
    dw._FUSION_MAPS.clear()
    with FakeTensorMode():
        dw._fusion_tap_map(torch.device('cpu'))
    assert not dw._FUSION_MAPS
