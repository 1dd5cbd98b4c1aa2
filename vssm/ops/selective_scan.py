"""Selective scan (S6), the recurrence every family in vssm runs.

For batch b, channel d and step t = 0..L-1, with a state h in R^N and h_{-1} = 0::

    dt_t = softplus(delta_t + delta_bias_d)          (threshold 20: identity above it)
    h_t  = exp(dt_t * A_d) * h_{t-1} + dt_t * B_t * u_t
    y_t  = <C_t, h_t> + D_d * u_t

B_t and C_t are shared by a group of channels: with G groups, channel d uses group d // (D / G).
Two forms are needed:

* *state-returning* (Spatial-Mamba): no C and no D; the op returns all states h, (Bt, D, N, L).
* *output-returning* (VMamba v2, Spectral VMamba): returns y, (Bt, D, L), K groups of B/C.

The reference here is written for speed on a CPU as well as for clarity: the linear recurrence is
solved with a log-depth (Hillis-Steele) parallel scan, never a Python loop over L, and the backward
pass is written by hand (the adjoint of a linear recurrence is the same recurrence run backwards),
so autograd keeps only the inputs instead of every intermediate. Internally everything is float32
(float64 stays float64), whatever the input dtype, as in the upstream kernels.

Shape legend: Bt batch, D channels (K*D for the multi-direction scans), N state size, L length,
G groups of B/C.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import (
    autocast_dtype,
    exporting,
    plain_autograd_enabled,
    recompute_enabled,
    resolve_backend,
    try_import_extension,
)
from .grouped_matmul import grouped_gemm, grouped_gemm_backward, grouped_matmul

__all__ = ['selective_scan', 'selective_scan_ref', 'selective_scan_low_rank', 'kernel_available',
           'cross_form_available', 'KERNEL_DTYPES', 'KERNEL_MAX_STATE']

_EXT_NAME = 'vssm_selective_scan'
_EXT = try_import_extension(_EXT_NAME)
KERNEL_CHUNK = 256  # steps per warp iteration in the kernel (kChunk in kernels/selective_scan/csrc/selective_scan.h)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_MAX_STATE = 16  # largest state size N (kMaxState in kernels/selective_scan/csrc/selective_scan.h)
# builds older than the cross form (or than its backward) lack it
_CROSS_FORM = _EXT is not None and hasattr(torch.ops.vssm_selective_scan, 'cross_bwd')


def kernel_available() -> bool:
    """Whether the compiled ``vssm_selective_scan`` extension is installed."""
    return _EXT is not None


def cross_form_available() -> bool:
    """Whether the installed extension has the scan's cross form, ``torch.ops.vssm_selective_scan.cross_fwd`` and
    ``cross_bwd`` (:func:`vssm.ops.cross_scan.cross_form`)."""
    return _CROSS_FORM


def linear_scan(a: Tensor, b: Tensor) -> Tensor:
    """Solve ``h_t = a_t * h_{t-1} + b_t`` (h_{-1} = 0) along the last dim in log2(L) steps.

    Hillis-Steele: after the step with offset k every position holds the composition of the
    affine maps of the k preceding positions, so ceil(log2 L) steps cover the whole sequence.
    Only products of the a_t (in [0, 1] here) are formed, so it is as stable as the loop.
    """
    length = a.shape[-1]
    k = 1
    while k < length:
        b_next = b.clone()
        b_next[..., k:].addcmul_(a[..., k:], b[..., :-k])
        b = b_next
        if 2 * k < length:  # the last step does not need the composed a
            a_next = a.clone()
            a_next[..., k:].mul_(a[..., :-k])
            a = a_next
        k *= 2
    return b


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _grouped(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Optional[Tensor],
             delta_bias: Optional[Tensor], delta_softplus: bool):
    """Cast to the compute dtype and reshape to the grouped layout (Bt, G, Dg, N, L)."""
    ct = _compute_dtype(u)
    bt, d, length = u.shape
    g, n = B.shape[1], B.shape[2]
    u5 = u.to(ct).reshape(bt, g, d // g, 1, length)
    dt_raw = delta.to(ct)
    if delta_bias is not None:
        dt_raw = dt_raw + delta_bias.to(ct)[:, None]
    dt_raw = dt_raw.reshape(bt, g, d // g, 1, length)
    dt = F.softplus(dt_raw, beta=1, threshold=20) if delta_softplus else dt_raw
    A4 = A.to(ct).reshape(g, d // g, n, 1)
    B5 = B.to(ct).unsqueeze(2)  # (Bt, G, 1, N, L)
    C5 = None if C is None else C.to(ct).unsqueeze(2)
    return u5, dt_raw, dt, A4, B5, C5


def _states(u5: Tensor, dt: Tensor, A4: Tensor, B5: Tensor) -> Tuple[Tensor, Tensor]:
    """The decay a = exp(dt * A) and the states h, both (Bt, G, Dg, N, L)."""
    a = torch.exp(dt * A4)
    h = linear_scan(a, dt * u5 * B5)
    return a, h


def _reference_forward(u, delta, A, B, C, D, delta_bias, delta_softplus) -> Tensor:
    """The reference's forward as plain tensor ops (differentiable by autograd: :func:`~vssm.ops.plain_autograd`)."""
    u5, _, dt, A4, B5, C5 = _grouped(u, delta, A, B, C, delta_bias, delta_softplus)
    _, h = _states(u5, dt, A4, B5)
    bt, d, length = u.shape
    if C5 is None:
        return h.reshape(bt, d, -1, length)
    y = (h * C5).sum(3)  # (Bt, G, Dg, L)
    if D is not None:
        y = y + D.to(y.dtype).reshape(1, *y.shape[1:3], 1) * u5.squeeze(3)
    return y.reshape(bt, d, length)


def _reference_backward(u, delta, A, B, C, D, delta_bias, delta_softplus, gout) -> Tuple[Optional[Tensor], ...]:
    """The reference's hand-written backward: the gradients of (u, delta, A, B, C, D, delta_bias), each in its input's
    dtype and shape (None for inputs that are None)."""
    bt, d, length = u.shape
    g, n = B.shape[1], B.shape[2]
    with torch.no_grad():
        u5, dt_raw, dt, A4, B5, C5 = _grouped(u, delta, A, B, C, delta_bias, delta_softplus)
        a, h = _states(u5, dt, A4, B5)
        gout = gout.to(u5.dtype)
        grad_u = grad_C = grad_D = None
        if C5 is None:
            gh = gout.reshape(bt, g, d // g, n, length)
        else:
            gy = gout.reshape(bt, g, d // g, 1, length)
            gh = gy * C5
            grad_C = (gy * h).sum(2)  # (Bt, G, N, L)
            if D is not None:
                grad_D = (gy * u5).sum((0, 4)).reshape(d)
                grad_u = gy * D.to(gy.dtype).reshape(1, g, d // g, 1, 1)
        # Adjoint recurrence, run backwards: g_t = gh_t + a_{t+1} g_{t+1}.
        a_next = F.pad(a[..., 1:], (0, 1))
        gs = linear_scan(a_next.flip(-1), gh.flip(-1)).flip(-1)
        h_prev = F.pad(h[..., :-1], (1, 0))
        g_logdecay = gs * h_prev * a  # gradient w.r.t. dt * A
        gsB = gs * B5
        grad_dt = (g_logdecay * A4).sum(3, keepdim=True) + (gsB * u5).sum(3, keepdim=True)
        grad_A = (g_logdecay * dt).sum((0, 4)).reshape(d, n)
        grad_B = (gs * dt * u5).sum(2)  # (Bt, G, N, L)
        grad_u_scan = (gsB * dt).sum(3, keepdim=True)
        grad_u = grad_u_scan if grad_u is None else grad_u + grad_u_scan
        if delta_softplus:
            grad_dt = grad_dt * torch.where(dt_raw <= 20, torch.sigmoid(dt_raw), torch.ones_like(dt_raw))
        grad_delta = grad_dt.reshape(bt, d, length)
        grad_bias = None if delta_bias is None else grad_delta.sum((0, 2))

    def cast(grad, like):
        return None if grad is None or like is None else grad.reshape(like.shape).to(like.dtype)

    return (cast(grad_u, u), cast(grad_delta, delta), cast(grad_A, A), cast(grad_B, B), cast(grad_C, C),
            cast(grad_D, D), cast(grad_bias, delta_bias))


class _SelectiveScanRef(torch.autograd.Function):
    """The reference scan as one autograd node (one node also lets FLOP counters see it)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):
        with torch.no_grad():
            out = _reference_forward(u, delta, A, B, C, D, delta_bias, delta_softplus)
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        return out

    @staticmethod
    def backward(ctx, gout):
        return (*_reference_backward(*ctx.saved_tensors, ctx.delta_softplus, gout), None)


def _normalize_groups(name: str, x: Optional[Tensor]) -> Optional[Tensor]:
    """(Bt, N, L) means one group shared by all channels: view it as (Bt, 1, N, L)."""
    if x is None:
        return None
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f'selective_scan: {name} must be (Bt, N, L) or (Bt, G, N, L), got shape {tuple(x.shape)}.')
    return x


def _check_inputs(u, delta, A, B, C, D, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f'selective_scan: u must be (Bt, D, L), got shape {tuple(u.shape)}.')
    bt, d, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f'selective_scan: delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}.')
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f'selective_scan: A must be (D, N) = ({d}, N), got {tuple(A.shape)}.')
    n = A.shape[1]
    g = B.shape[1]
    for name, x in (('B', B), ('C', C)):
        if x is None:
            continue
        if x.shape[0] != bt or x.shape[2] != n or x.shape[3] != length:
            raise ValueError(f'selective_scan: {name} must be (Bt, G, N, L) = ({bt}, G, {n}, {length}), '
                             f'got {tuple(x.shape)}.')
        if x.shape[1] != g:
            raise ValueError(f'selective_scan: B and C must have the same number of groups, got B {tuple(B.shape)} '
                             f'and C {tuple(C.shape)}.')
    if d % g:
        raise ValueError(f'selective_scan: the channel count D={d} must be divisible by the number of B/C groups '
                         f'G={g}.')
    for name, x in (('D', D), ('delta_bias', delta_bias)):
        if x is not None and tuple(x.shape) != (d,):
            raise ValueError(f'selective_scan: {name} must be ({d},), got {tuple(x.shape)}.')
    if C is None and D is not None:
        raise ValueError('selective_scan: D (the skip term D*u) only exists in the output-returning form; '
                         'pass C too, or drop D to get the states.')


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Optional[Tensor] = None,
                       D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                       delta_softplus: bool = True) -> Tensor:
    """Pure-PyTorch selective scan (CPU or GPU); see :func:`selective_scan` for the arguments."""
    return selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, backend='torch')


def _register_kernel_ops() -> None:
    """Fake implementations and autograd for the operators of the compiled extension (torch.library)."""
    lib = _EXT_NAME

    @torch.library.register_fake(f'{lib}::fwd')
    def _fwd_fake(u, delta, A, B, C, D, delta_bias, delta_softplus):
        bt, d, length = u.shape
        n = A.shape[1]
        out_shape = (bt, d, length) if C is not None else (bt, d, n, length)
        n_chunks = (length + KERNEL_CHUNK - 1) // KERNEL_CHUNK
        return u.new_empty(out_shape, dtype=torch.float32), u.new_empty((bt, d, n_chunks, n), dtype=torch.float32)

    @torch.library.register_fake(f'{lib}::bwd')
    def _bwd_fake(u, delta, A, B, C, D, delta_bias, dout, chunk_states, delta_softplus):
        f32 = dict(dtype=torch.float32)
        d = u.shape[1]
        return (torch.empty_like(u), torch.empty_like(delta), A.new_empty(A.shape, **f32), B.new_empty(B.shape, **f32),
                B.new_empty(B.shape if C is not None else (0, ), **f32), u.new_empty((d, ) if D is not None else (0, ),
                                                                                   **f32),
                u.new_empty((d, ) if delta_bias is not None else (0, ), **f32))

    def setup_context(ctx, inputs, output):
        u, delta, A, B, C, D, delta_bias, delta_softplus = inputs
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, output[1])

    def backward(ctx, dout, _dchunk_states):
        return (*_kernel_backward(*ctx.saved_tensors, ctx.delta_softplus, dout), None)

    torch.library.register_autograd(f'{lib}::fwd', backward, setup_context=setup_context)

    if cross_form_available():
        _register_cross_form()


def low_rank_grads(ddelta: Tensor, dbl: Tensor, dt_weight: Tensor) -> Tuple[Tensor, Tensor]:
    """The gradients of ``dt_weight`` (K * D, R) and of the low-rank step inputs ``dbl[:, :, :R]`` (B, K, R, L) of the
    cross form's step sizes ``delta[b, k] = dt_weight[k] @ dbl[b, k, :R]``, from the gradient ``ddelta``
    (B, K * D, L): GEMMs in dbl's dtype (as the composition's dt_proj under autocast), dt_weight's summed in float32."""
    bt, k, _, length = dbl.shape
    n_rank = dt_weight.shape[1]
    ddelta = ddelta.to(dbl.dtype).view(bt, k, -1, length)  # (B, K, D, L)
    d_weight = torch.matmul(ddelta, dbl[:, :, :n_rank].transpose(2, 3)).sum(0, dtype=torch.float32)  # (K, D, R)
    d_dts = torch.matmul(dt_weight.to(dbl.dtype).view(k, -1, n_rank).transpose(1, 2), ddelta)  # (B, K, R, L)
    return d_weight.view(dt_weight.shape).to(dt_weight.dtype), d_dts


def _register_cross_form() -> None:
    """Fake implementations of the cross form's operators and the forward's autograd: cross_bwd, then the gradients of
    dt_proj's weight and of the low-rank step inputs from the step sizes' gradient (two GEMMs, in dbl's dtype as the
    composition's dt_proj under autocast)."""
    lib = _EXT_NAME

    @torch.library.register_fake(f'{lib}::cross_fwd')
    def _cross_fwd_fake(x, index, dt_weight, A, dbl, D, delta_bias, delta_softplus, keep_states):
        bt, _, length = x.shape
        n_chunks = (length + KERNEL_CHUNK - 1) // KERNEL_CHUNK
        states_shape = (bt, A.shape[0], n_chunks, A.shape[1]) if keep_states else (0, )
        return x.new_empty(x.shape, dtype=torch.float32), x.new_empty(states_shape, dtype=torch.float32)

    @torch.library.register_fake(f'{lib}::cross_bwd')
    def _cross_bwd_fake(x, index, dt_weight, A, dbl, D, delta_bias, dout, chunk_states, delta_softplus):
        f32 = dict(dtype=torch.float32)
        d = A.shape[0]
        return (x.new_empty(x.shape, **f32), x.new_empty((x.shape[0], d, x.shape[2]), **f32),
                A.new_empty(A.shape, **f32), dbl.new_empty(dbl.shape, **f32),
                x.new_empty((d, ) if D is not None else (0, ), **f32),
                x.new_empty((d, ) if delta_bias is not None else (0, ), **f32))

    def setup_context(ctx, inputs, output):
        x, index, dt_weight, A, dbl, D, delta_bias, delta_softplus, _keep_states = inputs
        ctx.delta_softplus = delta_softplus
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, index, dt_weight, A, dbl, D, delta_bias, output[1])

    def backward(ctx, dout, _dchunk_states):
        x, index, dt_weight, A, dbl, D, delta_bias, chunk_states = ctx.saved_tensors
        if chunk_states.dim() != 4:
            raise RuntimeError('vssm_selective_scan.cross_fwd ran with keep_states=False, so it has no backward: call '
                               'it with keep_states=True where gradients are needed (vssm.ops.cross_scan.cross_form '
                               'decides this from the inputs).')
        dx, ddelta, dA, ddbl, dD, dbias = torch.ops.vssm_selective_scan.cross_bwd(
            x, index, dt_weight, A, dbl, D, delta_bias, dout.float().contiguous(), chunk_states, ctx.delta_softplus)
        d_weight, ddbl[:, :, :dt_weight.shape[1]] = low_rank_grads(ddelta, dbl, dt_weight)
        return (dx.to(x.dtype), None, d_weight, dA, ddbl.to(dbl.dtype),
                None if D is None else dD, None if delta_bias is None else dbias, None, None)

    torch.library.register_autograd(f'{lib}::cross_fwd', backward, setup_context=setup_context)


if _EXT is not None:
    _register_kernel_ops()


def _kernel_limits(u: Tensor, A: Tensor) -> Optional[str]:
    """What the kernel cannot take about these inputs (None when it takes them)."""
    if u.dtype not in KERNEL_DTYPES:
        return f'u of dtype {KERNEL_DTYPES}, got {u.dtype}'
    if A.shape[1] > KERNEL_MAX_STATE:
        return f'a state size N <= {KERNEL_MAX_STATE}, got N = {A.shape[1]}'
    return None


def _selective_scan_cuda(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Optional[Tensor], D: Optional[Tensor],
                         delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    """The kernel path: contiguous inputs, delta/B/C in u's dtype, A/D/delta_bias in float32."""
    delta, A, B, C, D, delta_bias = _kernel_inputs(u, delta, A, B, C, D, delta_bias)
    out, _ = torch.ops.vssm_selective_scan.fwd(u.contiguous(), delta, A, B, C, D, delta_bias, delta_softplus)
    return out


def _kernel_fwd(*args):
    """``vssm_selective_scan::fwd``: (out, the states at the chunk ends)."""
    return torch.ops.vssm_selective_scan.fwd(*args)


def _kernel_bwd(*args):
    """``vssm_selective_scan::bwd``: the gradients of (u, delta, A, B, C, D, delta_bias), B's and C's in float32,
    empty tensors for the inputs that are None."""
    return torch.ops.vssm_selective_scan.bwd(*args)


def _kernel_backward(u, delta, A, B, C, D, delta_bias, chunk_states, delta_softplus,
                     gout) -> Tuple[Optional[Tensor], ...]:
    """The kernel's gradients of (u, delta, A, B, C, D, delta_bias) from the forward's inputs and chunk states: B's
    and C's cast to their dtypes, None for the inputs that are None."""
    du, ddelta, dA, dB, dC, dD, dbias = _kernel_bwd(u, delta, A, B, C, D, delta_bias, gout.float().contiguous(),
                                                    chunk_states, delta_softplus)
    return (du, ddelta, dA, dB.to(B.dtype), None if C is None else dC.to(C.dtype), None if D is None else dD,
            None if delta_bias is None else dbias)


class _LowRankStepScan(torch.autograd.Function):
    """The scan (either form) of K groups whose raw step sizes are a low-rank product, ``delta[:, k] = dt_weight[k] @
    dts[:, k]``, saving the rank-R inputs ``dts`` instead of the (Bt, K * D, L) step sizes: the backward recomputes
    them (one GEMM of rank R, the forward's, so the same values) before the scan's backward. Scan on the kernel
    (``use_kernel``) or the reference; the inputs as the kernel takes them (:func:`_kernel_inputs`)."""

    @staticmethod
    def forward(ctx, use_kernel, u, dts, dt_weight, A, B, C, D, delta_bias, delta_softplus):
        delta = grouped_gemm(dt_weight, dts).view(u.shape)
        if use_kernel:
            out, states = _kernel_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus)
        else:
            with torch.no_grad():
                out, states = _reference_forward(u, delta, A, B, C, D, delta_bias, delta_softplus), None
        ctx.use_kernel, ctx.delta_softplus = use_kernel, delta_softplus
        ctx.save_for_backward(u, dts, dt_weight, A, B, C, D, delta_bias, states)
        return out

    @staticmethod
    def backward(ctx, gout):
        u, dts, dt_weight, A, B, C, D, delta_bias, states = ctx.saved_tensors
        delta = grouped_gemm(dt_weight, dts).view(u.shape)
        if ctx.use_kernel:
            du, ddelta, dA, dB, dC, dD, dbias = _kernel_backward(u, delta, A, B, C, D, delta_bias, states,
                                                                 ctx.delta_softplus, gout)
        else:
            du, ddelta, dA, dB, dC, dD, dbias = _reference_backward(u, delta, A, B, C, D, delta_bias,
                                                                    ctx.delta_softplus, gout)
        bt, k, _, length = dts.shape
        ddelta = ddelta.to(dts.dtype).view(bt, k, -1, length)  # (Bt, K, D, L)
        need_dts, need_weight = ctx.needs_input_grad[2:4]
        d_weight, d_dts = grouped_gemm_backward(dt_weight, dts, ddelta, need_weight, need_dts)
        return None, du, d_dts, d_weight, dA, dB, dC, dD, dbias, None


def _kernel_inputs(u: Tensor, *tensors: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """delta, B, C in u's dtype and A, D, delta_bias in float32, all contiguous (the kernel's inputs; order: delta, A,
    B, C, D, delta_bias)."""
    delta, A, B, C, D, delta_bias = tensors

    def same_dtype(x):
        return None if x is None else x.to(u.dtype).contiguous()

    def fp32(x):
        return None if x is None else x.float().contiguous()

    return same_dtype(delta), fp32(A), same_dtype(B), same_dtype(C), fp32(D), fp32(delta_bias)


def selective_scan_low_rank(u: Tensor, dts: Tensor, dt_weight: Tensor, A: Tensor, B: Tensor,
                            C: Optional[Tensor] = None, D: Optional[Tensor] = None,
                            delta_bias: Optional[Tensor] = None, delta_softplus: bool = True, *,
                            backend: str = 'auto') -> Tensor:
    """:func:`selective_scan` (either form) of K groups with the raw step sizes ``delta[:, k] = dt_weight[k] @
    dts[:, k]`` (:func:`~vssm.ops.grouped_matmul`, in its dtype: autocast's where it is on): the same values and
    gradients as that composition, but in training it saves the rank-R ``dts`` instead of the (Bt, K * D, L) step
    sizes and recomputes them in the backward (dt_proj's rank is C / 16 in the models, so the step sizes are 16x to
    32x the bytes of their low-rank inputs). Without gradients, under ``torch.compile`` (whose partitioner chooses
    what to save), in :func:`~vssm.ops.plain_autograd` mode, under tracing and with the recomputations off
    (:func:`~vssm.ops._backend.set_recompute`) it is the composition itself.

    Args:
        u: (Bt, K * D, L); dts: (Bt, K, R, L); dt_weight: (K, D, R); the rest as in :func:`selective_scan`.
    """
    if (dts.dim() != 4 or dt_weight.dim() != 3 or dts.shape[:2] != (u.shape[0], dt_weight.shape[0])
            or dts.shape[2] != dt_weight.shape[2] or dts.shape[3] != u.shape[2]
            or dt_weight.shape[0] * dt_weight.shape[1] != u.shape[1]):
        raise ValueError(f'selective_scan_low_rank: expected u (Bt, K * D, L), dts (Bt, K, R, L) and dt_weight '
                         f'(K, D, R); got u {tuple(u.shape)}, dts {tuple(dts.shape)}, dt_weight '
                         f'{tuple(dt_weight.shape)}.')

    def composition() -> Tensor:
        delta = grouped_matmul(dt_weight, dts).reshape(u.shape)
        return selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, backend=backend)

    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (u, dts, dt_weight, A, B, C, D, delta_bias))
    if (not needs_grad or not recompute_enabled() or plain_autograd_enabled() or torch.compiler.is_compiling()
            or exporting() or torch.jit.is_tracing()):
        return composition()
    B, C = _normalize_groups('B', B), _normalize_groups('C', C)
    _check_inputs(u, u, A, B, C, D, delta_bias)
    dtype = autocast_dtype(dts)
    use_kernel = resolve_backend(backend, _EXT, _EXT_NAME, 'selective_scan', u) == 'cuda'
    if use_kernel and (_kernel_limits(u, A) is not None or dtype != u.dtype):
        return composition()  # what it does with such inputs (falls back, or raises for backend='cuda')
    if use_kernel:
        u = u.contiguous()
        _, A, B, C, D, delta_bias = _kernel_inputs(u, None, A, B, C, D, delta_bias)
    return _LowRankStepScan.apply(use_kernel, u, dts.to(dtype), dt_weight.to(dtype), A, B, C, D, delta_bias,
                                  delta_softplus)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Optional[Tensor] = None,
                   D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = True, *, backend: str = 'auto') -> Tensor:
    """Selective scan, state-returning (``C is None``) or output-returning.

    Args:
        u: input, (Bt, D, L); float32, float16 or bfloat16 (float64 runs on the reference only).
        delta: raw step sizes, (Bt, D, L); cast to ``u``'s dtype on the kernel path.
        A: state matrix (diagonal), (D, N), negative; float32.
        B: input projections, (Bt, N, L) for one group shared by all channels or (Bt, G, N, L).
        C: output projections, same layout as ``B``; ``None`` returns the states instead of y.
        D: skip weights, (D,), output form only.
        delta_bias: added to ``delta`` before the softplus, (D,).
        delta_softplus: apply softplus (threshold 20) to ``delta + delta_bias``.
        backend: ``'auto'`` (the kernel for CUDA tensors when it is built, else the reference), ``'torch'``
            or ``'cuda'`` (see :mod:`vssm.ops._backend`). Non-contiguous inputs are copied for the kernel.

    Returns:
        float32 (float64 for float64 inputs): the states h, (Bt, D, N, L), when ``C`` is ``None``,
        else y, (Bt, D, L).
    """
    B, C = _normalize_groups('B', B), _normalize_groups('C', C)
    _check_inputs(u, delta, A, B, C, D, delta_bias)
    if plain_autograd_enabled():
        return _reference_forward(u, delta, A, B, C, D, delta_bias, delta_softplus)
    if resolve_backend(backend, _EXT, _EXT_NAME, 'selective_scan', u) == 'cuda':
        unsupported = _kernel_limits(u, A)
        if unsupported is None:
            return _selective_scan_cuda(u, delta, A, B, C, D, delta_bias, delta_softplus)
        if backend == 'cuda':
            raise ValueError(f"selective_scan: the CUDA kernel takes {unsupported}; use backend='torch' (or 'auto', "
                             'which sends such inputs to the reference).')
    return _SelectiveScanRef.apply(u, delta, A, B, C, D, delta_bias, delta_softplus)
