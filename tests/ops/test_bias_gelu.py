"""vssm.ops.bias_gelu: the Triton kernel against float64 autograd (in Triton's interpreter on the CPU, and on a GPU),
the dispatch (reference on CPU tensors, under compilation and with the switch off), errors, and VMamba's MLP with
fc1's bias folded into the GELU against the plain composition."""
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import GRAD_TOLERANCES, TOLERANCES
from ops.triton_interpreter import run_in_interpreter

from vssm.ops import bias_gelu, bias_gelu_ref
from vssm.ops.bias_gelu import kernel_available, kernel_runs

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and kernel_available()), reason='needs a GPU and Triton')

# (B, C, H, W): rows shorter than a program's pixels (7x7: masked lanes), longer (several programs per row, the last
# one partial), odd sides, one channel
SHAPES = [(2, 5, 3, 7), (3, 96, 9, 11), (2, 384, 7, 7), (1, 1, 33, 65), (2, 17, 56, 56)]
INTERPRETER_SHAPES = [(2, 5, 3, 7), (1, 3, 9, 15)]


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.setenv('VSSM_TRITON_FUSIONS', '1')


def _float64_reference(h, bias, grad):
    h, bias = (t.detach().double().requires_grad_() for t in (h, bias))
    out = F.gelu(h + bias[:, None, None])
    return (out.detach(), *torch.autograd.grad(out, (h, bias), grad.double()))


@pytest.mark.skipif(not kernel_available() or torch.cuda.is_available(),
                    reason='needs Triton; with a GPU the GPU tests below run the kernels')
def test_kernel_matches_float64_autograd_in_the_triton_interpreter():
    """The kernels, run by Triton's interpreter on CPU tensors, in float32 and bfloat16 (the sum rounded to 16 bits
    as the reference's add is), with a small program size so that rows span several programs."""
    script = textwrap.dedent(f'''
        import torch
        import torch.nn.functional as F
        from vssm.ops import _triton_bias_gelu as kernel, _triton_common as common
        torch.manual_seed(0)
        for block in (64, 16):
            common.MIN_ROW_BLOCK = common.MAX_ROW_BLOCK = block
            common.ROW_TILE = 4 * block  # 4 rows per program: programs over several rows, the last one partial
            for b, c, h, w in {INTERPRETER_SHAPES!r}:
                x, bias, g = torch.randn(b, c, h * w) * 2, torch.randn(c), torch.randn(b, c, h * w)
                out = kernel.forward(x, bias)
                dx, db = kernel.backward(g, x, bias)
                xd, bd = x.double().requires_grad_(), bias.double().requires_grad_()
                ref = F.gelu(xd + bd[:, None])
                want = (ref.detach(), *torch.autograd.grad(ref, (xd, bd), g.double()))
                for name, got, exp in zip(('out', 'dh', 'dbias'), (out, dx, db), want):
                    err = ((got.double() - exp).norm() / exp.norm()).item()
                    assert err < 1e-5, (block, b, c, h, w, name, err)
                # 16-bit: the reference computed in bfloat16 (its add and GELU rounded as ATen rounds them)
                xb, gb = x.bfloat16(), g.bfloat16()
                xr = xb.clone().requires_grad_()
                ref = F.gelu(xr + bias.bfloat16()[:, None])
                (dref, ) = torch.autograd.grad(ref, (xr, ), gb)
                out, (dx, db) = kernel.forward(xb, bias), kernel.backward(gb, xb, bias)
                assert out.dtype == dx.dtype == torch.bfloat16 and db.dtype == torch.float32
                torch.testing.assert_close(out, ref.detach(), atol=5e-2, rtol=3e-2)
                torch.testing.assert_close(dx, dref, atol=5e-2, rtol=3e-2)
                torch.testing.assert_close(db, dref.float().sum((0, 2)), atol=5e-2, rtol=3e-2)
        print('ok')
        ''')
    run_in_interpreter(script, ops_only=True)


def test_cpu_tensors_compilation_and_the_switch_take_the_reference(monkeypatch):
    h, bias = torch.randn(2, 6, 3, 4), torch.randn(6)
    expected = F.gelu(h + bias[:, None, None])
    assert torch.equal(bias_gelu(h, bias), expected) and torch.equal(bias_gelu_ref(h, bias), expected)
    compiled = torch.compile(lambda t: bias_gelu(t, bias), backend='aot_eager', fullgraph=True)
    torch.testing.assert_close(compiled(h), expected)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # the bias cast to h's dtype: the result stays 16-bit
        assert bias_gelu(h.bfloat16(), bias).dtype == torch.bfloat16
    meta = torch.empty(2, 6, 3, 4, device='meta')
    assert not kernel_runs(meta) and not kernel_runs(h)
    fake_cuda = type('FakeCuda', (), {'is_cuda': True, 'dtype': torch.bfloat16})()
    assert kernel_runs(fake_cuda) is kernel_available()
    assert not kernel_runs(fake_cuda, 'torch')
    monkeypatch.setenv('VSSM_TRITON_FUSIONS', '0')
    assert not kernel_runs(fake_cuda)


def test_errors():
    with pytest.raises(ValueError, match=r'expected h \(B, C, H, W\) and bias \(C,\)'):
        bias_gelu(torch.randn(2, 6, 4), torch.randn(6))
    with pytest.raises(ValueError, match=r'expected h \(B, C, H, W\) and bias \(C,\)'):
        bias_gelu(torch.randn(2, 6, 4, 4), torch.randn(5))
    with pytest.raises(ValueError, match='Unknown ops backend'):
        bias_gelu(torch.randn(1, 6, 2, 2), torch.randn(6), backend='triton')
    if kernel_available():
        with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
            bias_gelu(torch.randn(1, 6, 2, 2), torch.randn(6), backend='cuda')


def test_vmamba_mlp_with_the_bias_folded_matches_the_plain_composition(monkeypatch):
    """Mlp2d where the kernel would run (here the reference stands in for it, on a CPU): fc1 without its bias, the
    bias added in GELU's pass; values and every gradient equal to fc2(gelu(fc1(norm(x)))) in float64, with and
    without the recomputing autograd function."""
    import vssm.models.vmamba as vmamba
    from vssm.models.layers import LayerNorm2d, set_recompute
    from vssm.models.vmamba import Mlp2d

    torch.manual_seed(0)
    calls = []
    monkeypatch.setattr(vmamba, 'bias_gelu_runs', lambda x, backend: calls.append(backend) or True)
    mlp, norm = Mlp2d(6, 20).double(), LayerNorm2d(6).double()
    for p in (*mlp.parameters(), *norm.parameters()):
        p.data.normal_()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    params = [x, *mlp.parameters(), *norm.parameters()]
    plain = mlp.fc2(F.gelu(mlp.fc1(norm(x))))
    grad = torch.randn_like(plain)
    want = torch.autograd.grad(plain, params, grad)
    for recompute in (True, False):
        set_recompute(recompute)
        try:
            out = mlp(x, norm)
        finally:
            set_recompute(True)
        torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
        for got, exp in zip(torch.autograd.grad(out, params, grad), want):
            torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)
    assert calls == ['auto', 'auto']


@needs_gpu
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kernel_matches_float64_on_gpu(shape, dtype):
    torch.manual_seed(0)
    h = (torch.randn(shape, device='cuda') * 2).to(dtype).requires_grad_()
    bias = torch.randn(shape[1], device='cuda', requires_grad=True)
    out = bias_gelu(h, bias, backend='cuda')
    grad = torch.randn_like(out)
    dh, db = torch.autograd.grad(out, (h, bias), grad)
    assert out.dtype == dh.dtype == dtype and db.dtype == torch.float32
    want = _float64_reference(h, bias.to(dtype), grad)
    tol, gtol = (dict(zip(('rtol', 'atol'), table[dtype])) for table in (TOLERANCES, GRAD_TOLERANCES))
    torch.testing.assert_close(out.double(), want[0], **tol)
    torch.testing.assert_close(dh.double(), want[1], **gtol)
    torch.testing.assert_close(db.double(), want[2], **gtol)
    # and the reference in the same dtype (the rounding of the sum to 16 bits included)
    ref = bias_gelu_ref(h, bias)
    torch.testing.assert_close(out, ref, **tol)
