"""vssm.ops.layer_norm_2d and layer_norm_last: the Triton kernel (channels-first maps and rows of channels) against
float64 autograd (in Triton's interpreter on the CPU, and on a GPU), the dispatch (reference on CPU tensors and under
compilation), the output dtype, errors."""
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import GRAD_TOLERANCES, TOLERANCES
from ops.triton_interpreter import run_in_interpreter

from vssm.ops import layer_norm, layer_norm_2d, layer_norm_2d_ref, layer_norm_last
from vssm.ops.layer_norm import kernel_available

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and kernel_available()), reason='needs a GPU and Triton')


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    """The switch on, and the kernel on every map (the dispatch takes it only where it pays: test_where_it_pays)."""
    monkeypatch.setenv('VSSM_TRITON_FUSIONS', '1')
    monkeypatch.setattr(layer_norm, 'KERNEL_MAX_CHANNELS', 1 << 30)
    monkeypatch.setattr(layer_norm, 'KERNEL_MIN_PIXELS', 0)
# (B, C, H, W): one tile of channels, the chunked backward (C > 1024) and the chunked forward too (C > 2048, not a
# multiple of the chunk), odd sides and maps narrower than a pixel block
SHAPES = [(2, 5, 3, 7), (3, 96, 9, 11), (2, 300, 5, 3), (1, 768, 7, 7), (2, 520, 1, 33), (2, 1300, 4, 5),
          (2, 2100, 3, 3)]
INTERPRETER_SHAPES = [(2, 5, 3, 7), (2, 96, 3, 5), (1, 300, 2, 3)]  # the interpreter is slow: small maps
# (forward, backward) single-tile limits in the interpreter: the models' and small ones, so that the chunked paths run
# on small maps too
INTERPRETER_LIMITS = [(2048, 1024), (64, 32)]


def _float64_reference(x, weight, bias, eps, dy):
    x, weight, bias = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1], ), weight, bias, eps).permute(0, 3, 1, 2)
    return (y.detach(), *torch.autograd.grad(y, (x, weight, bias), dy.double()))


@pytest.mark.skipif(not kernel_available() or torch.cuda.is_available(),
                    reason='needs Triton; with a GPU the GPU tests below run the kernels')
def test_kernel_matches_float64_autograd_in_the_triton_interpreter():
    """The kernels themselves, run by Triton's interpreter on CPU tensors (a fresh process: the interpreter is chosen
    when Triton is imported)."""
    script = textwrap.dedent(f'''
        import itertools
        import torch
        import torch.nn.functional as F
        from vssm.ops import _triton_layer_norm as kernel
        torch.manual_seed(0)
        for (kernel.SINGLE_MAX_C, kernel.SINGLE_MAX_C_BWD), (b, c, h, w), last in itertools.product(
                {INTERPRETER_LIMITS!r}, {INTERPRETER_SHAPES!r}, (False, True)):
            # (B, C, L) maps, or (B, L, C) rows of channels (last)
            shape = (b, h * w, c) if last else (b, c, h * w)
            x = torch.randn(shape) * 3 + 5
            weight, bias, dy = torch.randn(c), torch.randn(c), torch.randn(shape)
            y, mean, rstd = kernel.forward(x, weight, bias, 1e-5, torch.float32, channels_last=last)
            dx, dw, db = kernel.backward(dy, x, weight, mean, rstd, channels_last=last)
            xd, wd, bd = (t.double().requires_grad_() for t in (x, weight, bias))
            ref = F.layer_norm(xd, (c,), wd, bd, 1e-5) if last else F.layer_norm(
                xd.transpose(1, 2), (c,), wd, bd, 1e-5).transpose(1, 2)
            grads = torch.autograd.grad(ref, (xd, wd, bd), dy.double())
            for name, got, want in zip(['y', 'dx', 'dw', 'db'], (y, dx, dw, db), (ref.detach(), *grads)):
                err = ((got.double() - want).norm() / want.norm()).item()
                assert err < 1e-5, (kernel.SINGLE_MAX_C, b, c, h, w, last, name, err)
        print('ok')
        ''')
    run_in_interpreter(script, ops_only=True)


def test_cpu_tensors_and_compilation_take_the_reference():
    x, weight, bias = torch.randn(2, 6, 3, 4), torch.randn(6), torch.randn(6)
    expected = layer_norm_2d_ref(x, weight, bias, 1e-5)
    assert torch.equal(layer_norm_2d(x, weight, bias), expected)
    compiled = torch.compile(lambda t: layer_norm_2d(t, weight, bias), backend='aot_eager', fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # the dtype F.layer_norm gives, or out_dtype
        assert layer_norm_2d(x.bfloat16(), weight, bias).dtype == layer_norm_2d_ref(x.bfloat16(), weight, bias,
                                                                                   1e-5).dtype
        assert layer_norm_2d(x, weight, bias, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_layer_norm_last_on_cpu_tensors_and_compiled_is_f_layer_norm():
    """Rows of channels (channels-last maps' LayerNorms): the reference on CPU tensors and under
    compilation, F.layer_norm's dtype or out_dtype."""
    x, weight, bias = torch.randn(2, 3, 5, 6), torch.randn(6), torch.randn(6)
    expected = F.layer_norm(x, (6, ), weight, bias, 1e-5)
    assert torch.equal(layer_norm_last(x, weight, bias), expected)
    compiled = torch.compile(lambda t: layer_norm_last(t, weight, bias), backend='aot_eager', fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)
    assert layer_norm_last(x, weight, bias, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert layer_norm_last(x.bfloat16(), weight, bias).dtype == F.layer_norm(x.bfloat16(), (6, ), weight,
                                                                                 bias).dtype
    with pytest.raises(ValueError, match=r'expected x \(\.\.\., C\)'):
        layer_norm_last(x, torch.randn(5), torch.randn(5))


def test_where_it_pays(monkeypatch):
    """The kernel where it beat the reference on an H100 (kernels/README.md): without gradients on every map; with
    gradients (its backward too) up to 192 channels and at least 1024 pixels per image."""
    monkeypatch.undo()
    pays = {(128, 96, 56, 56): True, (2, 192, 32, 32): True, (128, 192, 28, 28): False, (128, 256, 56, 56): False,
            (128, 768, 7, 7): False, (2, 96, 3, 5): False}
    for shape, expected in pays.items():
        x = torch.empty(shape, device='meta')
        weight, bias = torch.empty(shape[1], device='meta'), torch.empty(shape[1], device='meta')
        assert layer_norm._pays(x, weight, bias), shape  # inference
        assert layer_norm._pays(x.requires_grad_(), weight, bias) is expected, shape
        assert layer_norm._pays(x.detach(), weight.requires_grad_(), bias) is expected, shape
        with torch.no_grad():
            assert layer_norm._pays(x.requires_grad_(), weight, bias), shape


def test_errors():
    with pytest.raises(ValueError, match=r'expected x \(B, C, H, W\)'):
        layer_norm_2d(torch.randn(2, 6, 4), torch.randn(6), torch.randn(6))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        if not kernel_available():
            raise ValueError('needs CUDA tensors')  # nothing else to check without Triton
        layer_norm_2d(torch.randn(1, 6, 2, 2), torch.randn(6), torch.randn(6), backend='cuda')
    with pytest.raises(ValueError, match='Unknown ops backend'):
        layer_norm_2d(torch.randn(1, 6, 2, 2), torch.randn(6), torch.randn(6), backend='triton')


@needs_gpu
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernel_matches_reference_on_gpu(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape, device='cuda') * 2 + 3).to(dtype).requires_grad_()
    weight = torch.randn(shape[1], device='cuda', requires_grad=True)
    bias = torch.randn(shape[1], device='cuda', requires_grad=True)
    dy = torch.randn(shape, device='cuda').to(dtype)
    y = layer_norm_2d(x, weight, bias, backend='cuda')
    assert y.dtype == dtype and y.is_contiguous()
    grads = torch.autograd.grad(y, (x, weight, bias), dy)
    ref = _float64_reference(x, weight, bias, 1e-5, dy)
    for name, got, want in zip(['y', 'dx', 'dweight', 'dbias'], (y, *grads), ref):
        table = TOLERANCES if name == 'y' else GRAD_TOLERANCES
        rtol, atol = table[dtype]
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * max(scale, 1.0), msg=name)


@needs_gpu
@pytest.mark.parametrize('shape', [(2, 5, 7, 64), (3, 9, 11, 96), (2, 4, 5, 200), (1, 33, 1, 256), (7, 3)],
                         ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_layer_norm_last_matches_float64_on_gpu(shape, dtype):
    """Rows of channels through the kernel: values and the gradients of x, weight and bias against float64."""
    torch.manual_seed(0)
    c = shape[-1]
    x = (torch.randn(shape, device='cuda') * 2 + 3).to(dtype).requires_grad_()
    weight = torch.randn(c, device='cuda', requires_grad=True)
    bias = torch.randn(c, device='cuda', requires_grad=True)
    dy = torch.randn(shape, device='cuda').to(dtype)
    y = layer_norm_last(x, weight, bias, backend='cuda')
    assert y.dtype == dtype and y.grad_fn is not None and 'LayerNormLast' in type(y.grad_fn).__name__
    grads = torch.autograd.grad(y, (x, weight, bias), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    ref = F.layer_norm(leaves[0], (c, ), leaves[1], leaves[2], 1e-5)
    ref_grads = torch.autograd.grad(ref, leaves, dy.double())
    for name, got, want in zip(['y', 'dx', 'dweight', 'dbias'], (y, *grads), (ref.detach(), *ref_grads)):
        rtol, atol = (TOLERANCES if name == 'y' else GRAD_TOLERANCES)[dtype]
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * max(scale, 1.0), msg=name)


@needs_gpu
def test_out_dtype_and_autocast_on_gpu():
    x = torch.randn(2, 64, 5, 6, device='cuda')
    weight, bias = torch.randn(64, device='cuda'), torch.randn(64, device='cuda')
    expected = layer_norm_2d_ref(x, weight, bias, 1e-5)
    got = layer_norm_2d(x, weight, bias, out_dtype=torch.bfloat16, backend='cuda')
    assert got.dtype == torch.bfloat16  # the float32 result rounded once (1 ulp of bf16 where the two round apart)
    torch.testing.assert_close(got, expected.to(torch.bfloat16), rtol=8e-3, atol=8e-3)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        assert layer_norm_2d(x.bfloat16(), weight, bias).dtype == torch.float32
