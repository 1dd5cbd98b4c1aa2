"""Scan orders as index maps: tokens gathered into K sequences, and sequences added back onto the tokens.

VMamba reads the H x W tokens in four directions and Spectral VMamba in the orders of Laplacian eigenvectors; both
then add the K output sequences back onto the raster positions. With ``index`` (B or 1, K, M) holding, for sequence k,
the raster position read at each step::

    gather_tokens(x, index)[b, k, :, i]  = x[b, :, index[b, k, i]]                           (B, D, L) -> (B, K, D, M)
    scatter_tokens(y, index, L)[b, :, p] = sum of y[b, k, :, i] over all (k, i) with index[b, k, i] = p
                                                                                        (B, K, D, M) -> (B, D, L)

The two are adjoint linear maps for the same ``index``, so each is the other's backward, exact for every index map:
a position read twice gets both gradients, a position never read gets zero. Each op saves only ``index`` (and
``inverse``) for its backward.

``inverse`` (same batch dim, (B or 1, K, L)) is an optional fact about ``index``: every row of it is a permutation of
0..L-1 (M = L) and ``inverse[b, k, index[b, k, i]] = i`` (:func:`inverse_permutation`). Given it, ``scatter_tokens``
(and so ``gather_tokens``' backward) is one gather and a sum over k, deterministic on every device; without it, a
scatter-add per sequence, which is deterministic while no row repeats a position and uses atomic adds on CUDA when one
does. Pass ``inverse`` only for index maps that are permutations by construction. On CUDA tensors the merge's gather
and sum are one Triton kernel (:mod:`vssm.ops._triton_token_maps`: no (B, K, D, L) copy in raster order; same values,
deterministic) and the gather is a Triton kernel too (each run of positions loaded once for a tile of channels)
under the backends ``'auto'`` and ``'cuda'`` with the Triton fusions on (the default; ``VSSM_TRITON_FUSIONS=0`` turns
them off); ``backend='torch'`` keeps the plain gather and sum.

Under ``torch.compile`` both are plain gathers and sums inside the graph (:data:`INLINE_UNDER_COMPILE`), each with
the other as its backward (an ``autograd.Function`` that dynamo traces): inductor then fuses the gather into the pass
that produces x (VMamba's SiLU after the depthwise conv) and the merge's gather and sum into the pass that reads its
result (the out-norm), so neither (B, K, D, L) copy in raster order is written; with :data:`INLINE_UNDER_COMPILE`
off they are ``torch.library`` custom ops with fake and autograd registrations (opaque graph nodes). In
eager mode the same functions run as ``torch.autograd.Function``s, whose dispatch costs the host a fraction of a
custom op's (about 20 against 100+ microseconds per call measured on a CPU: hundreds of calls per training step).
Under ``torch.jit.trace`` and ``torch.export`` (FLOP counters, ONNX export) and in :func:`~vssm.ops.plain_autograd`
mode they run as plain PyTorch ops (``torch.gather`` / ``Tensor.scatter_add``) that autograd differentiates itself.

Shape legend: B batch, D channels, L = H*W tokens, K sequences, M steps per sequence.
"""
from typing import Optional

import torch
from torch import Tensor

from ._backend import (
    check_backend_name,
    exporting,
    plain_autograd_enabled,
    triton_fusions_enabled,
    try_import_extension,
)

__all__ = ['gather_tokens', 'scatter_tokens', 'inverse_permutation']

_KERNEL = try_import_extension(f'{__package__}._triton_token_maps')  # None without Triton (CPU-only torch installs)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INLINE_UNDER_COMPILE = True  # under torch.compile, plain ops that inductor fuses with their neighbours


def _expand_index(index: Tensor, batch: int, channels: int) -> Tensor:
    """(B or 1, K, M) -> (B, K, D, M) view."""
    return index[:, :, None, :].expand(batch, index.shape[1], channels, index.shape[2])


def _kernel_runs(t: Tensor, backend: str) -> bool:
    """Whether the Triton kernels gather the tokens or add the sequences back (module docstring)."""
    return (backend != 'torch' and _KERNEL is not None and t.is_cuda and t.dtype in _KERNEL_DTYPES
            and triton_fusions_enabled())


def _gather(x: Tensor, index: Tensor, backend: str = 'torch') -> Tensor:
    """Gather: (B, D, L), (B or 1, K, M) -> (B, K, D, M); the Triton kernel on CUDA tensors unless ``backend`` is
    ``'torch'``, else one ATen gather (x expanded over K, never copied)."""
    if _kernel_runs(x, backend) and x.numel() > 0 and index.numel() > 0:
        return _KERNEL.gather(x.contiguous(), index.contiguous())
    b, d, length = x.shape
    k = index.shape[1]
    return x[:, None].expand(b, k, d, length).gather(3, _expand_index(index, b, d))


def _scatter(y: Tensor, index: Tensor, length: int, inverse: Optional[Tensor], backend: str = 'torch') -> Tensor:
    """Scatter-add: (B, K, D, M) -> (B, D, L); with the inverse permutations a gather and a sum over K (one Triton
    kernel on CUDA tensors unless ``backend`` is ``'torch'``)."""
    b, k, d, _ = y.shape
    if inverse is not None:
        if _kernel_runs(y, backend):
            return _KERNEL.merge(y.contiguous(), inverse.contiguous())
        return y.gather(3, _expand_index(inverse, b, d)).sum(1)
    out = y.new_zeros(b, d, length)
    for i in range(k):  # one sequence at a time: no two adds to one address in a launch unless a row repeats
        out = out.scatter_add(2, index[:, i, None, :].expand(b, d, index.shape[2]), y[:, i])
    return out


@torch.library.custom_op('vssm::gather_tokens', mutates_args=())
def _gather_op(x: Tensor, index: Tensor, inverse: Optional[Tensor], backend: str) -> Tensor:
    return _gather(x, index, backend)


@torch.library.custom_op('vssm::scatter_tokens', mutates_args=())
def _scatter_op(y: Tensor, index: Tensor, length: int, inverse: Optional[Tensor], backend: str) -> Tensor:
    return _scatter(y, index, length, inverse, backend)


@_gather_op.register_fake
def _(x, index, inverse, backend):
    return x.new_empty(x.shape[0], index.shape[1], x.shape[1], index.shape[2])


@_scatter_op.register_fake
def _(y, index, length, inverse, backend):
    return y.new_empty(y.shape[0], y.shape[2], length)


def _setup_gather(ctx, inputs, output):
    x, index, inverse, backend = inputs
    ctx.length, ctx.backend = x.shape[2], backend
    ctx.save_for_backward(index, inverse)


def _backward_gather(ctx, grad):
    index, inverse = ctx.saved_tensors
    return _scatter_op(grad.contiguous(), index, ctx.length, inverse, ctx.backend), None, None, None


def _setup_scatter(ctx, inputs, output):
    _, index, _, inverse, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(index, inverse)


def _backward_scatter(ctx, grad):
    index, inverse = ctx.saved_tensors
    return _gather_op(grad.contiguous(), index, inverse, ctx.backend), None, None, None, None


_gather_op.register_autograd(_backward_gather, setup_context=_setup_gather)
_scatter_op.register_autograd(_backward_scatter, setup_context=_setup_scatter)


class _GatherTokens(torch.autograd.Function):
    """Eager form of ``vssm::gather_tokens``: the same forward, setup and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Optional[Tensor], backend: str) -> Tensor:
        _setup_gather(ctx, (x, index, inverse, backend), None)
        return _gather(x, index, backend)

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, inverse = ctx.saved_tensors
        return _ScatterTokens.apply(grad.contiguous(), index, ctx.length, inverse, ctx.backend), None, None, None


class _ScatterTokens(torch.autograd.Function):
    """Eager form of ``vssm::scatter_tokens``."""

    @staticmethod
    def forward(ctx, y: Tensor, index: Tensor, length: int, inverse: Optional[Tensor], backend: str) -> Tensor:
        _setup_scatter(ctx, (y, index, length, inverse, backend), None)
        return _scatter(y, index, length, inverse, backend)

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, inverse = ctx.saved_tensors
        return _GatherTokens.apply(grad.contiguous(), index, inverse, ctx.backend), None, None, None, None


class _GatherTokensInline(torch.autograd.Function):
    """Under ``torch.compile``: the gather and its adjoint as plain ops that dynamo traces into the graph (the backward
    with the inverse permutations is a gather and a sum, deterministic, as in eager mode)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Optional[Tensor]) -> Tensor:
        ctx.length = x.shape[2]
        ctx.save_for_backward(index, inverse)
        return _gather(x, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, inverse = ctx.saved_tensors
        return _scatter(grad, index, ctx.length, inverse), None, None


class _ScatterTokensInline(torch.autograd.Function):
    """Under ``torch.compile``: the merge as plain ops, the gather its backward."""

    @staticmethod
    def forward(ctx, y: Tensor, index: Tensor, length: int, inverse: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(index)
        return _scatter(y, index, length, inverse)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index, ) = ctx.saved_tensors
        return _gather(grad, index), None, None, None


def _check(name: str, index: Tensor, inverse: Optional[Tensor], batch: int, length: Optional[int]) -> None:
    if index.dim() != 3 or index.shape[0] not in (1, batch) or index.dtype != torch.long:
        raise ValueError(f'{name}: index must be int64 (B or 1, K, M) with B = {batch}, got {index.dtype} '
                         f'{tuple(index.shape)}.')
    if inverse is not None and (inverse.shape != index.shape[:2] + (length, ) or inverse.dtype != torch.long):
        raise ValueError(f'{name}: inverse must be int64 {tuple(index.shape[:2]) + (length, )} (the inverse '
                         f'permutations of the rows of index), got {inverse.dtype} {tuple(inverse.shape)}.')


def gather_tokens(x: Tensor, index: Tensor, inverse: Optional[Tensor] = None, *, backend: str = 'auto') -> Tensor:
    """Tokens in K orders: ``out[b, k, :, i] = x[b, :, index[b, k, i]]``.

    Args:
        x: (B, D, L) tokens, or a (B, D, H, W) map (L = H*W, raster order).
        index: (B or 1, K, M) int64 raster positions in [0, L).
        inverse: (B or 1, K, L) inverse permutations of the rows of ``index``, only where they are permutations
            (makes the backward a gather; see the module docstring).
        backend: one of :data:`~vssm.ops.BACKENDS`: ``'auto'`` and ``'cuda'`` gather with the Triton kernel on CUDA
            tensors (module docstring), ``'torch'`` with ATen's gather; the backward (:func:`scatter_tokens`) too.

    Returns:
        (B, K, D, M), x's dtype.
    """
    x = x.flatten(2)
    check_backend_name(backend)
    if exporting():
        return _gather(x, index)
    _check('gather_tokens', index, inverse, x.shape[0], x.shape[2] if inverse is not None else None)
    if plain_autograd_enabled():
        return _gather(x, index)
    if torch.compiler.is_compiling():
        if INLINE_UNDER_COMPILE:
            return _GatherTokensInline.apply(x, index, inverse)
        return _gather_op(x, index, inverse, backend)
    return _GatherTokens.apply(x, index, inverse, backend)


def scatter_tokens(y: Tensor, index: Tensor, length: int, inverse: Optional[Tensor] = None, *,
                   backend: str = 'auto') -> Tensor:
    """K sequences added back onto the tokens: the adjoint of :func:`gather_tokens` for the same ``index``.

    Args:
        y: (B, K, D, M) sequences.
        index: (B or 1, K, M) int64 raster positions in [0, length): where step i of sequence k goes.
        length: L, the number of tokens.
        inverse: as in :func:`gather_tokens`.
        backend: one of :data:`~vssm.ops.BACKENDS`: ``'auto'`` and ``'cuda'`` add the sequences back with the Triton
            kernel on CUDA tensors when ``inverse`` is given (module docstring), ``'torch'`` with the plain ops.

    Returns:
        (B, D, L), y's dtype.
    """
    check_backend_name(backend)
    if exporting():
        return _scatter(y, index, length, None)
    _check('scatter_tokens', index, inverse, y.shape[0], length if inverse is not None else None)
    if y.shape[1] != index.shape[1] or y.shape[3] != index.shape[2]:
        raise ValueError(f'scatter_tokens: y (B, K, D, M) = {tuple(y.shape)} does not match index (B or 1, K, M) = '
                         f'{tuple(index.shape)}.')
    if plain_autograd_enabled():
        return _scatter(y, index, length, None)
    if torch.compiler.is_compiling():
        if INLINE_UNDER_COMPILE:
            return _ScatterTokensInline.apply(y, index, length, inverse)
        return _scatter_op(y, index, length, inverse, backend)
    return _ScatterTokens.apply(y, index, length, inverse, backend)


def inverse_permutation(index: Tensor) -> Tensor:
    """The inverse of each row of a (..., L) tensor of permutations of 0..L-1: ``out[..., index[..., i]] = i``
    (one scatter, no sort). For rows that are not permutations the result is meaningless."""
    steps = torch.arange(index.shape[-1], device=index.device).expand_as(index)
    return torch.empty_like(index).scatter_(-1, index, steps)
