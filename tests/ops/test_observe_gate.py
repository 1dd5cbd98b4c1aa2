"""vssm.ops.observe_gate (Spatial-Mamba's observation, norm and gate): the Triton kernel against float64 autograd (in
Triton's interpreter on the CPU, and on a GPU against the reference in fp32 and under bf16 autocast), the dispatch,
errors."""
import textwrap

import pytest
import torch
from conftest import GRAD_TOLERANCES, TOLERANCES
from ops.triton_interpreter import run_in_interpreter

from vssm.ops import observe_gate, observe_gate_ref
from vssm.ops.observe_gate import kernel_available

# (B, D, H, W): one tile of channels (D <= 256) and the chunked path (D > 256, not a multiple of the chunk)
SHAPES = [(2, 6, 3, 5), (2, 96, 4, 7), (1, 300, 3, 3), (2, 520, 2, 3)]
INTERPRETER_SHAPES = [(2, 6, 3, 5), (2, 96, 2, 3), (1, 300, 2, 3)]  # the interpreter is slow: small maps
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and kernel_available()), reason='needs a GPU and Triton')


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.setenv('VSSM_TRITON_FUSIONS', '1')


def _inputs(b, d, h, w, device='cpu', dtype=torch.float32, seed=0):
    """fused, C, Ds, u, z (a channel chunk of a (B, H, W, 2D) map, as in the model), weight, bias."""
    g = torch.Generator().manual_seed(seed)
    length = h * w
    fused = torch.randn(b, d, length, generator=g)
    C, Ds = torch.randn(b, 1, length, generator=g), torch.randn(d, generator=g)
    u = torch.randn(b, d, length, generator=g)
    z = torch.randn(b, h, w, 2 * d, generator=g)[..., d:]
    weight, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    return [t.to(device) for t in (fused, C.to(dtype), Ds, u.to(dtype), z.to(dtype), weight, bias)]


@pytest.mark.skipif(not kernel_available() or torch.cuda.is_available(),
                    reason='needs Triton; with a GPU the GPU tests below run the kernels')
def test_kernel_matches_float64_autograd_in_the_triton_interpreter():
    """The kernels run by Triton's interpreter on CPU tensors, fp32 (a fresh process: the interpreter is chosen when
    Triton is imported)."""
    script = textwrap.dedent(f'''
        import torch
        import torch.nn.functional as F
        from vssm.ops import _triton_observe_gate as kernel
        torch.manual_seed(0)
        for b, d, h, w in {INTERPRETER_SHAPES!r}:
            length = h * w
            fused, C, Ds = torch.randn(b, d, length), torch.randn(b, 1, length), torch.randn(d)
            u = torch.randn(b, d, length)
            z = torch.randn(b, length, 2 * d)[..., d:]
            weight, bias, da = torch.randn(d), torch.randn(d), torch.randn(b, length, d)
            out, mean, rstd = kernel.forward(fused, C, u, Ds, z, weight, bias, 1e-5)
            grads = kernel.backward(da, fused, C, u, Ds, z, weight, bias, mean, rstd)
            leaves = [t.double().requires_grad_() for t in (fused, C, u, Ds, z, weight, bias)]
            f, c, uu, ds, zz, wt, bs = leaves
            ref = F.layer_norm((f * c + ds[:, None] * uu).transpose(1, 2), (d,), wt, bs, 1e-5) * F.silu(zz)
            dref = torch.autograd.grad(ref, leaves, da.double())
            # kernel.backward returns d fused, dC, du, dz, dDs, dweight, dbias
            want = [dref[0], dref[1], dref[2], dref[4], dref[3], dref[5], dref[6]]
            for name, got, exp in zip(['out', 'fused', 'C', 'u', 'z', 'Ds', 'w', 'b'], (out, *grads),
                                      (ref.detach(), *want)):
                err = ((got.double() - exp).norm() / exp.norm()).item()
                assert err < 1e-5, (b, d, h, w, name, err)
        print('ok')
        ''')
    run_in_interpreter(script, ops_only=True)


def test_cpu_takes_the_reference_and_the_kernel_waits_for_the_switch(monkeypatch):
    inputs = _inputs(2, 6, 3, 5)
    assert torch.equal(observe_gate(*inputs), observe_gate_ref(*inputs, 1e-5))
    monkeypatch.setenv('VSSM_TRITON_FUSIONS', '0')
    assert torch.equal(observe_gate(*inputs), observe_gate_ref(*inputs, 1e-5))


def test_errors():
    fused, C, Ds, u, z, weight, bias = _inputs(2, 6, 3, 5)
    with pytest.raises(ValueError, match=r'z must be \(B, H, W, D\)'):
        observe_gate(fused, C, Ds, u, z[:, :2], weight, bias)
    with pytest.raises(ValueError, match=r'expected C \(B, 1, L\)'):
        observe_gate(fused, C[:, :, :4], Ds, u, z, weight, bias)


def _grads(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad.to(out.dtype)))


@needs_gpu
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_kernel_matches_reference_on_gpu(shape, dtype):
    """fp32: against the reference in float64; bf16: against the reference under autocast (the model's setting)."""
    inputs = _inputs(*shape, device='cuda', dtype=dtype)
    grad = torch.randn(shape[0], shape[2], shape[3], shape[1], device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = _grads(lambda *t: observe_gate(*t, backend='cuda'), inputs, grad)
        if dtype == torch.float32:
            want = _grads(lambda *t: observe_gate_ref(*t, 1e-5), [t.double() for t in inputs], grad.double())
        else:
            want = _grads(lambda *t: observe_gate_ref(*t, 1e-5), inputs, grad)
    assert got[0].dtype == dtype
    names = ['out', 'fused', 'C', 'Ds', 'u', 'z', 'weight', 'bias']
    for name, a, b in zip(names, got, want):
        rtol, atol = (TOLERANCES if name == 'out' else GRAD_TOLERANCES)[dtype]
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * max(scale, 1.0), msg=name)
