"""The SSM core of VMamba and Spectral VMamba as one op: K sequences read from a map, scanned, added back::

    xs         = gather_tokens(x, index)                     (B, K, D, L): sequence k reads token index[k, i] at step i
    dts, B, C  = x_proj_weight[k] @ xs[:, k]                 per step: R low-rank step inputs, N and N projections
    y          = selective_scan(xs, dt_weight[k] @ dts, A, B, C, Ds, dt_bias, softplus)
    out        = scatter_tokens(y, merge)                    (B, D, L) float32: each sequence added back onto its tokens

The reference is this composition (the scan on its own dispatch: the CUDA kernel or the PyTorch reference): it writes
(B, K, D, L) maps three times (the gathered tokens, the step sizes, the scan's output) and reads them back. In training
it saves the gathered tokens and the rank-R step inputs, not the step sizes: :func:`~vssm.ops.selective_scan_low_rank`
recomputes them in the backward (one GEMM of rank R). The Triton
kernel (:mod:`vssm.ops._triton_cross_scan`) writes none of them: x_proj runs as one GEMM on the raster map (it is per
token, so the order of the tokens does not matter), and one kernel reads the tokens and their projections through the
index, computes the step sizes from the low rank, scans and adds the K sequences back onto the map. Its backward
saves x, the projections (B, K, R + 2N, L) and the states entering each tile of steps. It runs
with the Triton fusions on (the default; ``VSSM_TRITON_FUSIONS=0`` turns them off,
:func:`~vssm.ops._backend.triton_fusions_enabled`) on CUDA tensors where every row of the index is a permutation
(``inverse`` given, no separate ``merge``) and where it is faster than the composition (:func:`_pays`: 16-bit inference
over per-image maps), unless deterministic algorithms are requested (it adds with
atomics). On CUDA tensors without that kernel, with ``VSSM_CROSS_FORM=1``
(:func:`~vssm.ops._backend.cross_form_enabled`), the CUDA selective scan's cross form (:func:`cross_form`) does the
same in one pass over the steps: x_proj on the raster map, its R + 2N output rows gathered into the sequences' step
orders (:func:`step_projections`), then one warp per sequence and channel reads its tokens through the index and the
low-rank step inputs, B and C in step order (the step sizes are dt_proj's weight times the low-rank inputs, inside the
kernel) and adds its outputs back at its tokens (atomics, so not under deterministic algorithms either; any index
within the map, repeated or skipped tokens included). In training it keeps the scan's state at the end of every
256-step chunk, and its backward reads the same tokens, adds x's gradient back at them and writes the step sizes', B's
and C's in step order (two GEMMs turn the step sizes' into dt_proj's and the low-rank inputs'; the gather's backward
adds x_proj's output gradient back at the tokens). Everything else runs the reference.

Under ``torch.compile`` the kernels are two ``torch.library`` custom ops, ``vssm::cross_scan_fwd`` (out and the
states) and ``vssm::cross_scan_bwd``, with fake implementations and the forward's autograd (graph nodes; the backward
is not differentiable, so a double backward raises); in eager mode the same forward, saved tensors and backward run as
a ``torch.autograd.Function``, whose dispatch costs the host less (as the token maps do, :mod:`vssm.ops.token_maps`).
Under ``torch.jit.trace`` and ``torch.export`` (FLOP counters, ONNX export) and in
:func:`~vssm.ops.plain_autograd` mode the reference runs.

Shape legend: B batch, D channels, L tokens (H*W), K sequences, R rank of the step sizes, N state size.
"""
from typing import Optional

import torch
from torch import Tensor

from ._backend import (
    autocast_dtype,
    check_backend_name,
    cross_form_enabled,
    exporting,
    plain_autograd_enabled,
    triton_fusions_enabled,
    try_import_extension,
)
from .grouped_matmul import grouped_matmul
from .selective_scan import (
    KERNEL_DTYPES,
    KERNEL_MAX_STATE,
    cross_form_available,
    selective_scan,
    selective_scan_low_rank,
)
from .token_maps import gather_tokens, scatter_tokens

__all__ = ['cross_selective_scan', 'cross_selective_scan_ref', 'cross_form', 'cross_form_ref', 'step_projections',
           'kernel_available']

_KERNEL = try_import_extension(f'{__package__}._triton_cross_scan')  # None without Triton (CPU-only torch installs)


def kernel_available() -> bool:
    """Whether the Triton kernel can run (Triton importable; the tensors must also be on a CUDA device)."""
    return _KERNEL is not None


def cross_selective_scan_ref(x: Tensor, index: Tensor, x_proj_weight: Tensor, dt_weight: Tensor, dt_bias: Tensor,
                             A: Tensor, Ds: Tensor, *, inverse: Optional[Tensor] = None, merge: Optional[Tensor] = None,
                             backend: str = 'auto') -> Tensor:
    """The composition of the module docstring (``backend``: the selective scan's); arguments of
    :func:`cross_selective_scan`."""
    b, d, length = x.shape
    k, n_rank, n_state = index.shape[1], dt_weight.shape[2], A.shape[1]
    xs = gather_tokens(x, index, inverse if merge is None else None, backend=backend)  # (B, K, D, L)
    # One GEMM per sequence with the weight broadcast over the batch (grouped_matmul: its backward keeps views of xs,
    # which the scan saves too).
    x_dbl = grouped_matmul(x_proj_weight, xs)  # (B, K, R + 2N, L)
    dts, Bs, Cs = torch.split(x_dbl, [n_rank, n_state, n_state], dim=2)
    # the step sizes dt_proj(dts) (B, K, D, L), recomputed in the backward from the rank-R dts instead of saved
    y = selective_scan_low_rank(xs.reshape(b, k * d, length), dts, dt_weight, A, Bs, Cs, Ds, dt_bias.reshape(-1),
                                delta_softplus=True, backend=backend)  # (B, K * D, L) float32
    return scatter_tokens(y.view(b, k, d, length), index if merge is None else merge, length, inverse,
                          backend=backend)


def step_projections(t: Tensor, index: Tensor) -> Tensor:
    """``t`` (B, K, C, L) in token order read in the sequences' step orders: ``out[b, k, :, i] = t[b, k, :,
    index[b, k, i]]`` (``index`` (B or 1, K, L)); its gradient is added back at the tokens."""
    return t.gather(3, index[:, :, None].expand(t.shape))


def cross_form(x: Tensor, index: Tensor, dt_weight: Tensor, A: Tensor, dbl: Tensor, Ds: Tensor,
               dt_bias: Tensor) -> Tensor:
    """The CUDA scan's cross form, ``torch.ops.vssm_selective_scan.cross_fwd`` with its backward ``cross_bwd``: the K
    sequences of ``index`` over the map x, each scanned with softplus step sizes, added back onto the tokens they read.
    Where gradients are needed it keeps the states at the chunk ends for the backward (inference keeps none).

    Args:
        x: (B, D, L) CUDA tensor; float32, float16 or bfloat16.
        index: (B or 1, K, L) int64: sequence k reads token index[k, i] at step i and adds its output there (entries
            may repeat or leave tokens out).
        dt_weight: (K * D, R) float32, dt_proj's weight: the raw step sizes of sequence k are its rows times the R
            low-rank step inputs (computed in the kernel, never stored).
        A: (K * D, N) float32; Ds, dt_bias: (K * D,) float32.
        dbl: (B, K, R + 2N, L), x_proj's output in x's dtype in each sequence's step order (``dbl[b, k, :, i]`` is
            the projection of token ``index[b, k, i]``): rows 0.. are the low-rank step inputs, rows R.. B, rows
            R + N.. C. Gathered by the caller (:func:`step_projections`), so the kernels read it coalesced.

    Returns: (B, D, L) float32, the sum of the sequences' outputs at their tokens (atomic adds: the last bits vary
    from run to run; so do the gradients'). :func:`cross_form_ref` is its reference.
    """
    keep_states = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt_weight, A, dbl, Ds, dt_bias))
    return torch.ops.vssm_selective_scan.cross_fwd(x, index, dt_weight, A, dbl, Ds, dt_bias, True, keep_states)[0]


def cross_form_ref(x: Tensor, index: Tensor, dt_weight: Tensor, A: Tensor, dbl: Tensor, Ds: Tensor,
                   dt_bias: Tensor) -> Tensor:
    """:func:`cross_form` in PyTorch (any device): the tokens gathered by ``index``, the step sizes from the low rank
    (float32), scanned, added back."""
    b, d, length = x.shape
    k, n_state, n_rank = index.shape[1], A.shape[1], dt_weight.shape[1]
    xs = step_projections(x[:, None].expand(b, k, d, length), index)
    dts = torch.matmul(dt_weight.view(k, d, n_rank), dbl[:, :, :n_rank].to(dt_weight.dtype))  # (B, K, D, L)
    bs, cs = dbl[:, :, n_rank:n_rank + n_state], dbl[:, :, n_rank + n_state:]
    y = selective_scan(xs.reshape(b, k * d, length), dts.reshape(b, k * d, length), A, bs, cs, Ds, dt_bias, True,
                       backend='torch')
    return scatter_tokens(y.view(b, k, d, length), index, length)


def _setup_context(ctx, inputs, output):
    """What the backward needs: the inputs (x, dbl, index, w, bias, a, ds) and the states entering each tile."""
    ctx.save_for_backward(*inputs, output[1])


def _gradients(backward, ctx, grad):
    """The inputs' gradients in their dtypes (``backward``: the kernels' host function or the ``cross_scan_bwd`` op);
    the kernels' gradients are float32."""
    x, dbl, index, w, bias, a, ds, states = ctx.saved_tensors
    dx, ddbl, dw, dbias, da, dds = backward(grad, x, dbl, index, w, bias, a, ds, states)
    return dx.to(x.dtype), ddbl.to(dbl.dtype), None, dw.to(w.dtype), dbias, da, dds


if _KERNEL is not None:
    # The kernels as graph nodes under torch.compile. The backward is not differentiable: cross_scan_bwd has no
    # autograd registration, so a double backward through the op raises.
    @torch.library.custom_op('vssm::cross_scan_fwd', mutates_args=())
    def _fwd_op(x: Tensor, dbl: Tensor, index: Tensor, w: Tensor, bias: Tensor, a: Tensor,
                ds: Tensor) -> tuple[Tensor, Tensor]:
        return _KERNEL.forward(x, dbl, index, w, bias, a, ds)

    @torch.library.custom_op('vssm::cross_scan_bwd', mutates_args=())
    def _bwd_op(grad: Tensor, x: Tensor, dbl: Tensor, index: Tensor, w: Tensor, bias: Tensor, a: Tensor, ds: Tensor,
                states: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _KERNEL.backward(grad, x, dbl, index, w, bias, a, ds, states)

    @_fwd_op.register_fake
    def _(x, dbl, index, w, bias, a, ds):
        f32 = dict(dtype=torch.float32)
        return x.new_empty(x.shape, **f32), x.new_empty(_KERNEL.state_shape(x, index, a), **f32)

    @_bwd_op.register_fake
    def _(grad, x, dbl, index, w, bias, a, ds, states):
        return tuple(t.new_empty(t.shape, dtype=torch.float32) for t in (x, dbl, w, bias, a, ds))

    def _setup_op(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])  # the states: saved for the backward, no gradient flows into them
        _setup_context(ctx, inputs, output)

    _fwd_op.register_autograd(lambda ctx, grad, _grad_states: _gradients(_bwd_op, ctx, grad),
                              setup_context=_setup_op)


class _CrossSelectiveScan(torch.autograd.Function):
    """Eager form of ``vssm::cross_scan_fwd``: the same forward, setup and backward, without the op's dispatch."""

    @staticmethod
    def forward(ctx, x, dbl, index, w, bias, a, ds):
        out, states = _KERNEL.forward(x, dbl, index, w, bias, a, ds)
        _setup_context(ctx, (x, dbl, index, w, bias, a, ds), (out, states))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return _gradients(_KERNEL.backward, ctx, grad)


def _pays(x: Tensor, index: Tensor, needs_grad: bool) -> bool:
    """Where the kernel is faster than the composition (one H100; kernels/README.md): 16-bit inference over per-image
    maps (Spectral VMamba's orders), 1.34x for the whole Spectral VMamba-T in bf16. In float32 its exact-fp32 dots
    make it slower (0.76x); with one map for the batch (VMamba's four directions) the composition's gathers are cheap
    and its CUDA scan is faster than the kernel's tiles from stage 1 to 3; in training the kernel's backward (atomic
    adds of the per-token gradients) is slower everywhere."""
    return autocast_dtype(x) in (torch.float16, torch.bfloat16) and index.shape[0] > 1 and not needs_grad


def _fusable(backend: str, x: Tensor, index: Tensor, merge: Optional[Tensor], n_state: int) -> bool:
    """What both fused paths need: CUDA tensors of the kernels' dtypes, one map to read and to add back to."""
    check_backend_name(backend)
    if backend == 'torch' or plain_autograd_enabled() or exporting():
        return False  # FLOP counters and exporters (ONNX) know the reference's ops, not the kernels' custom ops
    # Both add the K sequences with atomics (run-to-run differences in the last bits): not where deterministic
    # algorithms are asked for (torch.use_deterministic_algorithms, mmengine's randomness.deterministic).
    return (x.is_cuda and merge is None and x.dtype in KERNEL_DTYPES and n_state <= KERNEL_MAX_STATE
            and index.dtype == torch.int64 and not torch.are_deterministic_algorithms_enabled())


def _use_kernel(backend: str, x: Tensor, index: Tensor, inverse: Optional[Tensor], merge: Optional[Tensor],
                n_state: int, needs_grad: bool = False) -> bool:
    """The Triton kernel: with the switch on, over permutations, where it pays."""
    return (_KERNEL is not None and triton_fusions_enabled() and inverse is not None
            and _fusable(backend, x, index, merge, n_state) and _pays(x, index, needs_grad))


def _use_cross_form(backend: str, x: Tensor, index: Tensor, merge: Optional[Tensor], n_state: int) -> bool:
    """The CUDA scan's cross form: inference and training, any index within the map."""
    return cross_form_available() and cross_form_enabled() and _fusable(backend, x, index, merge, n_state)


def _raster_projections(x: Tensor, x_proj_weight: Tensor) -> Tensor:
    """x_proj on the raster map (it is per token, so the tokens' order does not matter): (B, K, R + 2N, L)."""
    b, d, length = x.shape
    k, n_dbl = x_proj_weight.shape[:2]
    return grouped_matmul(x_proj_weight.reshape(1, k * n_dbl, d), x[:, None]).view(b, k, n_dbl, length)


def cross_selective_scan(x: Tensor, index: Tensor, x_proj_weight: Tensor, dt_weight: Tensor, dt_bias: Tensor,
                         A: Tensor, Ds: Tensor, *, inverse: Optional[Tensor] = None, merge: Optional[Tensor] = None,
                         backend: str = 'auto') -> Tensor:
    """The K sequences of ``index`` over ``x``, each projected and scanned, added back onto the map.

    Args:
        x: (B, D, L) tokens in raster order.
        index: (B or 1, K, L) int64, the raster token sequence k reads at step i.
        x_proj_weight: (K, R + 2N, D), each sequence's projection to its step inputs, B and C.
        dt_weight: (K, D, R), the step sizes' low-rank projection; ``dt_bias`` (K, D) added before the softplus.
        A: (K * D, N) float32, negative (``-exp(A_logs)``); ``Ds``: (K * D,), the skip weights.
        inverse: (B or 1, K, L), the inverse permutations of the rows of the merge map, when they are permutations
            (:func:`~vssm.ops.gather_tokens`); it is also the scan's when ``merge`` is None.
        merge: where step i of each sequence is added back, when it differs from ``index`` (Spectral VMamba's
            upstream mode); None: ``index``.
        backend: ``'torch'`` for the reference everywhere; ``'auto'``/``'cuda'``: the Triton kernel where it may run
            (module docstring), else the reference with the selective scan on this backend.

    Returns:
        (B, D, L) float32 (float64 for float64 inputs).
    """
    b, d, length = x.shape
    k, n_dbl = x_proj_weight.shape[:2]
    n_rank, n_state = dt_weight.shape[2], A.shape[1]
    if (index.dim() != 3 or index.shape[0] not in (1, b) or index.shape[2] != length or x_proj_weight.shape[2] != d
            or n_dbl != n_rank + 2 * n_state or index.shape[1] != k or dt_weight.shape[:2] != (k, d)):
        raise ValueError(f'cross_selective_scan: expected x (B, D, L), index (B or 1, K, L), x_proj_weight '
                         f'(K, R + 2N, D) and dt_weight (K, D, R) with A (K * D, N); got x {tuple(x.shape)}, index '
                         f'{tuple(index.shape)}, x_proj_weight {tuple(x_proj_weight.shape)}, dt_weight '
                         f'{tuple(dt_weight.shape)}, A {tuple(A.shape)}.')
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, x_proj_weight, dt_weight, dt_bias, A, Ds))
    use_kernel = _use_kernel(backend, x, index, inverse, merge, n_state, needs_grad)
    if not use_kernel and not _use_cross_form(backend, x, index, merge, n_state):
        return cross_selective_scan_ref(x, index, x_proj_weight, dt_weight, dt_bias, A, Ds, inverse=inverse,
                                        merge=merge, backend=backend)
    dtype = autocast_dtype(x)
    x = x.to(dtype).contiguous()
    dbl = _raster_projections(x, x_proj_weight).to(dtype)
    if not use_kernel:  # the CUDA cross form (the step sizes from the low rank inside the kernel)
        index = index.contiguous()
        return cross_form(x, index, dt_weight.float().reshape(k * d, n_rank).contiguous(), A.float().contiguous(),
                          step_projections(dbl, index).contiguous(), Ds.float().contiguous(),
                          dt_bias.float().reshape(-1).contiguous())
    # the parameters as the kernels take them (autograd casts their gradients back): dt_proj in x's (autocast's)
    # dtype as the reference's, the rest float32
    inputs = (x, dbl, index.contiguous(), dt_weight.to(dtype).contiguous(), dt_bias.float().reshape(-1).contiguous(),
              A.float().contiguous(), Ds.float().contiguous())
    if torch.compiler.is_compiling():
        return _fwd_op(*inputs)[0]
    return _CrossSelectiveScan.apply(*inputs)
