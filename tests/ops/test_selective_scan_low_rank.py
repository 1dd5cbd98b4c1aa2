"""vssm.ops.selective_scan_low_rank: the output-form scan of K groups with step sizes dt_weight[k] @ dts[:, k], saving
the rank-R inputs instead of the (Bt, K * D, L) step sizes. Values and gradients equal the composition (grouped_matmul
then selective_scan) under plain autograd in float64 on irregular shapes, on the reference scan and, with the CUDA
ops stubbed by the reference, through the kernel branch; what it saves; where it is the composition itself."""
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vssm.ops import grouped_matmul, plain_autograd, selective_scan, selective_scan_low_rank
from vssm.ops._backend import recompute_enabled, set_recompute

scan_module = importlib.import_module('vssm.ops.selective_scan')


def _inputs(bt, k, d, n_rank, n_state, length, dtype=torch.float64, seed=0, device='cpu'):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(device, dtype)

    u = rand(bt, k * d, length)
    # dts as the models pass it: rows of x_proj's output (a non-contiguous view), B and C the rows after it
    dbl = rand(bt, k, n_rank + 2 * n_state, length, scale=0.5)
    dts, B, C = torch.split(dbl, [n_rank, n_state, n_state], dim=2)
    dt_weight = rand(k, d, n_rank, scale=n_rank**-0.5)
    A = -torch.rand(k * d, n_state, generator=gen, dtype=torch.float64).to(device) - 0.3
    D, bias = rand(k * d).float().to(torch.float64), rand(k * d, shift=-2.0).to(torch.float64)
    return dict(u=u, dts=dts, dt_weight=dt_weight, A=A, B=B, C=C, D=D, delta_bias=bias), dbl


def _composition(u, dts, dt_weight, A, B, C, D, delta_bias, backend='torch'):
    delta = grouped_matmul(dt_weight, dts).reshape(u.shape)
    return selective_scan(u, delta, A, B, C, D, delta_bias, True, backend=backend)


def _values_and_grads(fn, inputs, dbl, weight):
    leaves = {name: t for name, t in inputs.items() if name not in ('dts', 'B', 'C')}
    leaves = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
    dbl = dbl.detach().clone().requires_grad_()
    n_rank, n_state = inputs['dts'].shape[2], inputs['B'].shape[2]
    dts, B, C = torch.split(dbl, [n_rank, n_state, n_state], dim=2)
    out = fn(dts=dts, B=B, C=C, **leaves)
    inputs = [*leaves.values(), dbl]
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)  # A: unused by one step
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    return out.detach(), dict(zip([*leaves, 'dbl'], grads))


def _check_against_composition(shape, seed, fn=selective_scan_low_rank, rtol=1e-10, form='output'):
    """``form='state'``: no C and no D (Spatial-Mamba's scan, K = 1 there), the states (Bt, K * D, N, L) returned."""
    inputs, dbl = _inputs(*shape, seed=seed)
    state = dict(C=None, D=None) if form == 'state' else {}
    bt, kd, length = inputs['u'].shape
    out_shape = (bt, kd, shape[4], length) if form == 'state' else (bt, kd, length)
    weight = torch.randn(out_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    out, grads = _values_and_grads(lambda **kw: fn(**{**kw, **state}, backend='torch'), inputs, dbl, weight)
    with plain_autograd():
        ref_out, ref_grads = _values_and_grads(lambda **kw: _composition(**{**kw, **state}), inputs, dbl, weight)
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=rtol)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=rtol, msg=name)


@settings(max_examples=30, deadline=None)
@given(bt=st.integers(1, 3), k=st.integers(1, 4), d=st.integers(1, 5), n_rank=st.integers(1, 4),
       n_state=st.integers(1, 3), length=st.integers(1, 17), form=st.sampled_from(['output', 'state']),
       seed=st.integers(0, 2**31 - 1))
def test_values_and_gradients_equal_the_composition_in_float64(bt, k, d, n_rank, n_state, length, form, seed):
    _check_against_composition((bt, k, d, n_rank, n_state, length), seed, form=form)


def test_the_kernel_branch_with_the_cuda_ops_stubbed_by_the_reference(monkeypatch):
    """The branch the CUDA kernel takes (its inputs cast as the kernel takes them, the chunk states handed to the
    backward, B's and C's gradients cast back), with fwd/bwd replaced by the reference on the same inputs."""
    states = torch.zeros(1)

    def fwd(u, delta, A, B, C, D, bias, softplus):
        return scan_module._reference_forward(u, delta, A, B, C, D, bias, softplus), states

    def bwd(u, delta, A, B, C, D, bias, gout, chunk_states, softplus):
        assert chunk_states is states and gout.dtype == torch.float32
        grads = scan_module._reference_backward(u, delta, A, B, C, D, bias, softplus, gout)
        # as the kernel: B's and C's in float32, empty tensors for the inputs that are None
        return tuple(u.new_empty(0) if g is None else g.float() if i in (3, 4) else g for i, g in enumerate(grads))

    monkeypatch.setattr(scan_module, 'resolve_backend', lambda backend, *args: 'cuda')
    monkeypatch.setattr(scan_module, '_kernel_fwd', fwd)
    monkeypatch.setattr(scan_module, '_kernel_bwd', bwd)
    monkeypatch.setattr(scan_module, 'KERNEL_DTYPES', scan_module.KERNEL_DTYPES + (torch.float64, ))
    # the kernel's inputs hold A, D and delta_bias in float32 (the composition's float64): agreement to their rounding
    _check_against_composition((2, 4, 3, 2, 1, 11), seed=3, rtol=1e-6)
    _check_against_composition((2, 1, 5, 3, 2, 9), seed=4, rtol=1e-6, form='state')


def test_saves_the_low_rank_inputs_not_the_step_sizes():
    inputs, _ = _inputs(2, 4, 5, 2, 1, 13, dtype=torch.float32)
    inputs = {name: t.requires_grad_() if t.is_leaf else t for name, t in inputs.items()}
    delta_numel = inputs['u'].numel()

    def saved_shapes(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            fn(**inputs, backend='torch')
        return [s for s in saved if torch.Size(s).numel() == delta_numel]

    assert saved_shapes(selective_scan_low_rank) == [tuple(inputs['u'].shape)]  # u only
    assert len(saved_shapes(_composition)) >= 2  # u and the step sizes
    assert recompute_enabled()
    try:
        set_recompute(False)  # the plain composition, saving the step sizes
        assert len(saved_shapes(selective_scan_low_rank)) >= 2
    finally:
        set_recompute(True)


def test_without_gradients_under_autocast_and_compile_it_is_the_composition():
    inputs, _ = _inputs(2, 2, 3, 2, 1, 9, dtype=torch.float32)
    expected = _composition(**inputs)
    with torch.no_grad():
        torch.testing.assert_close(selective_scan_low_rank(**inputs, backend='torch'), expected)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # the step sizes in autocast's dtype, as the composition's
        torch.testing.assert_close(selective_scan_low_rank(**inputs, backend='torch'),
                                   _composition(**inputs))
    leaves = {name: t.requires_grad_() if t.is_leaf else t for name, t in inputs.items()}
    compiled = torch.compile(lambda: selective_scan_low_rank(**leaves, backend='torch'), backend='aot_eager',
                             fullgraph=True)
    torch.testing.assert_close(compiled(), expected)


def test_errors():
    inputs, _ = _inputs(2, 2, 3, 2, 1, 9, dtype=torch.float32)
    with pytest.raises(ValueError, match='dt_weight'):
        selective_scan_low_rank(**dict(inputs, dt_weight=inputs['dt_weight'][:, :2]))


@pytest.mark.skipif(not torch.cuda.is_available() or not scan_module.kernel_available(),
                    reason='needs a GPU and the scan kernel')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize('form', ['output', 'state'])
def test_kernel_matches_the_composition_on_gpu(dtype, form):
    """The CUDA kernel through both paths (bf16: under autocast, as the models run it): the same values, the same
    gradients (the recomputed step sizes are the forward's GEMM again). Output form: VMamba-T's stage 1 sequences
    (K = 4, 3136 / 4 steps); state form: Spatial-Mamba's (K = 1, no C and no D)."""
    k, state = (4, {}) if form == 'output' else (1, dict(C=None, D=None))
    inputs, dbl = _inputs(2, k, 96, 6, 1, 3136 // 4, dtype=torch.float32, device='cuda')
    inputs = {name: t.to(dtype) if name in ('u', ) else t for name, t in inputs.items()}
    bt, kd, length = inputs['u'].shape
    weight = torch.randn((bt, kd, length) if form == 'output' else (bt, kd, 1, length), device='cuda')

    def run(**kw):
        return selective_scan_low_rank(**{**kw, **state}, backend='cuda')

    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out, grads = _values_and_grads(run, inputs, dbl, weight)
        set_recompute(False)
        try:
            ref_out, ref_grads = _values_and_grads(run, inputs, dbl, weight)
        finally:
            set_recompute(True)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for name in grads:
        # dbl holds B's and C's gradients, which the kernel sums over the channels with float32 atomics (their order,
        # so their last bits, vary from run to run) and returns in B's dtype: in bf16 a last-bit difference can round
        # to the neighbouring bf16 value (up to a relative 2^-7), in either path alike.
        rtol = 2**-7 if name == 'dbl' and dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=1e-5, msg=name)
