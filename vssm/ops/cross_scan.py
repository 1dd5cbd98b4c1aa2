"""The SSM core of VMamba and Spectral VMamba as one op: K sequences read from a map, scanned, added back::

    xs         = gather_tokens(x, index)                     (B, K, D, L): sequence k reads token index[k, i] at step i
    dts, B, C  = x_proj_weight[k] @ xs[:, k]                 per step: R low-rank step inputs, N and N projections
    y          = selective_scan(xs, dt_weight[k] @ dts, A, B, C, Ds, dt_bias, softplus)
    out        = scatter_tokens(y, merge)                    (B, D, L) float32: each sequence added back onto its tokens

The reference is this composition (the scan on its own dispatch: the CUDA kernel or the PyTorch reference): it writes
(B, K, D, L) maps three times (the gathered tokens, the step sizes, the scan's output) and reads them back. The Triton
kernel (:mod:`vssm.ops._triton_cross_scan`) writes none of them: x_proj runs as one GEMM on the raster map (it is per
token, so the order of the tokens does not matter), and one kernel reads the tokens and their projections through the
index, computes the step sizes from the low rank, scans and adds the K sequences back onto the map. Its backward
saves x, the projections (B, K, R + 2N, L) and the states entering each chunk of steps. It runs with
``VSSM_TRITON_FUSIONS=1`` (:func:`~vssm.ops._backend.triton_fusions_enabled`) on CUDA tensors where every row of the
index is a permutation (``inverse`` given, no separate ``merge``) and where it is faster than the composition
(:func:`_pays`: inference over per-image maps), unless deterministic algorithms are requested (it adds with atomics);
everywhere else the reference runs.

Shape legend: B batch, D channels, L tokens (H*W), K sequences, R rank of the step sizes, N state size.
"""
from typing import Optional

import torch
from torch import Tensor

from ._backend import check_backend_name, plain_autograd_enabled, triton_fusions_enabled, try_import_extension
from .grouped_matmul import grouped_matmul
from .selective_scan import KERNEL_DTYPES, KERNEL_MAX_STATE, selective_scan
from .token_maps import gather_tokens, scatter_tokens

__all__ = ['cross_selective_scan', 'cross_selective_scan_ref', 'kernel_available']

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
    xs = gather_tokens(x, index, inverse if merge is None else None)  # (B, K, D, L)
    # One GEMM per sequence with the weight broadcast over the batch (grouped_matmul: its backward keeps views of xs,
    # which the scan saves too).
    x_dbl = grouped_matmul(x_proj_weight, xs)  # (B, K, R + 2N, L)
    dts, Bs, Cs = torch.split(x_dbl, [n_rank, n_state, n_state], dim=2)
    dts = grouped_matmul(dt_weight, dts)  # (B, K, D, L)
    y = selective_scan(xs.reshape(b, k * d, length), dts.reshape(b, k * d, length), A, Bs, Cs, Ds,
                       dt_bias.reshape(-1), delta_softplus=True, backend=backend)  # (B, K * D, L) float32
    return scatter_tokens(y.view(b, k, d, length), index if merge is None else merge, length, inverse)


class _CrossSelectiveScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, dbl, index, dt_weight, dt_bias, A, Ds):
        w = dt_weight.to(x.dtype).contiguous()  # the reference's dt_proj runs in x's (autocast's) dtype
        bias, a, ds = dt_bias.float().reshape(-1).contiguous(), A.float().contiguous(), Ds.float().contiguous()
        out, states = _KERNEL.forward(x, dbl, index, w, bias, a, ds)
        ctx.save_for_backward(x, dbl, index, w, bias, a, ds, states)
        ctx.dtypes = dt_weight.dtype, dt_bias.dtype, A.dtype, Ds.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, dbl, index, w, bias, a, ds, states = ctx.saved_tensors
        dx, ddbl, dw, dbias, da, dds = _KERNEL.backward(grad, x, dbl, index, w, bias, a, ds, states)
        w_dtype, bias_dtype, a_dtype, ds_dtype = ctx.dtypes
        return (dx.to(x.dtype), ddbl.to(dbl.dtype), None, dw.to(w_dtype), dbias.view(-1, x.shape[1]).to(bias_dtype),
                da.to(a_dtype), dds.to(ds_dtype))


def _pays(index: Tensor, needs_grad: bool) -> bool:
    """Where the kernel is faster than the composition (one H100; kernels/README.md): inference over per-image maps
    (Spectral VMamba's orders), 1.3x for the whole Spectral VMamba-T. With one map for the batch (VMamba's four
    directions) the composition's gathers are cheap and its CUDA scan is faster than the kernel's tiles from stage 1
    to 3, and in training the kernel's backward (atomic adds of the per-token gradients) is slower everywhere."""
    return index.shape[0] > 1 and not needs_grad


def _use_kernel(backend: str, x: Tensor, index: Tensor, inverse: Optional[Tensor], merge: Optional[Tensor],
                n_state: int, needs_grad: bool = False) -> bool:
    check_backend_name(backend)
    if backend == 'torch' or plain_autograd_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False  # under torch.compile the reference's ops are graph nodes (the scan a custom op)
    # The kernel adds the K sequences with atomics (run-to-run differences in the last bits): not where deterministic
    # algorithms are asked for (torch.use_deterministic_algorithms, mmengine's randomness.deterministic).
    return (_KERNEL is not None and x.is_cuda and triton_fusions_enabled() and inverse is not None and merge is None
            and x.dtype in KERNEL_DTYPES and n_state <= KERNEL_MAX_STATE and index.dtype == torch.int64
            and not torch.are_deterministic_algorithms_enabled() and _pays(index, needs_grad))


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
    if not _use_kernel(backend, x, index, inverse, merge, n_state, needs_grad):
        return cross_selective_scan_ref(x, index, x_proj_weight, dt_weight, dt_bias, A, Ds, inverse=inverse,
                                        merge=merge, backend=backend)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x = x.to(dtype).contiguous()
    # x_proj on the raster map: every token's projections for every sequence, (B, K, R + 2N, L)
    dbl = grouped_matmul(x_proj_weight.reshape(1, k * n_dbl, d), x[:, None]).view(b, k, n_dbl, length)
    return _CrossSelectiveScan.apply(x, dbl, index.contiguous(), dt_weight, dt_bias, A, Ds)
