"""Triton kernels of :func:`vssm.ops.layer_norm_2d` and :func:`vssm.ops.layer_norm_last`: LayerNorm over the
channels of a contiguous (B, C, L) map, or of a contiguous (B, L, C) one (rows of C channels: channels-last maps and
token sequences; the same tiles with the channel and pixel strides swapped).

A program takes ``BLOCK_L`` consecutive pixels of one image and all its channels: each channel row of the tile is a
run of consecutive addresses, the next program (the grid's fastest axis) reads the runs that follow. Up to
``SINGLE_MAX_C`` channels (padded to a power of two) the whole (channels, pixels) tile sits in registers: one read of
x, one write of y, the variance from the centred values (two-pass in registers, no cancellation). The pixels per tile
shrink as the channels grow (``TILE_ELEMENTS``), down to ``MIN_BLOCK_L``. Wider maps go in chunks of ``CHUNK_C``
channels merged with Chan's formula (two reads of x). Statistics are float32 whatever the dtype.

The backward gives dx per pixel and the weight and bias gradients as per-program partial sums: each program walks
several pixel blocks of one image (``_split``), so the partial-sum buffer has a few rows per image, summed on the
host side. Up to ``SINGLE_MAX_C_BWD`` channels x and dy are read once; wider maps read them twice, chunk by chunk
(the row sums first, then dx and the partial sums).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import NUM_WARPS, chan_merge

SINGLE_MAX_C = 2048  # forward: channels held in registers in one tile (padded to a power of two)
SINGLE_MAX_C_BWD = 1024  # backward: x and dy both in registers
TILE_ELEMENTS = 8192  # forward tile (channels x pixels); the backward's two tiles take half each
MIN_BLOCK_L, MAX_BLOCK_L = 4, 64
CHUNK_C = 128  # channels per chunk above the single-tile limit
BWD_PROGRAMS = 1024  # about this many backward programs (a few per SM), each walking pixel blocks of one image


def tiles(channels: int, length: int, elements: int, max_single: int):
    """(single tile, BLOCK_C, BLOCK_L): the channels padded to a power of two in one tile up to ``max_single``, else
    chunks of ``CHUNK_C``; pixels per tile about ``elements / BLOCK_C``, within [MIN_BLOCK_L, MAX_BLOCK_L] and not
    beyond the image's pixels (padded to a power of two)."""
    block_c = triton.next_power_of_2(channels)
    single = block_c <= max_single
    if not single:
        block_c = CHUNK_C
    block_l = min(MAX_BLOCK_L, max(MIN_BLOCK_L, elements // block_c), max(MIN_BLOCK_L, triton.next_power_of_2(length)))
    return single, block_c, block_l


@triton.jit
def _load(ptr, offs_c, base, mask_l, n_c, stride_c):
    """A [channels, pixels] tile as float32, with its mask."""
    mask_c = offs_c < n_c
    mask = mask_c[:, None] & mask_l[None, :]
    return tl.load(ptr + offs_c[:, None] * stride_c + base[None, :], mask=mask, other=0.).to(tl.float32), mask, mask_c


@triton.jit
def _write(y_ptr, w_ptr, b_ptr, x, mask, mask_c, offs_c, base, mean, rstd, stride_c):
    w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
    b = tl.load(b_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
    y = (x - mean[None, :]) * rstd[None, :] * w[:, None] + b[:, None]
    tl.store(y_ptr + offs_c[:, None] * stride_c + base[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pixels(block, batch, n_c, length, stride_l, BLOCK_L: tl.constexpr):
    """Pixel block ``block`` of image ``batch``: pixel indices, mask, and the offset of channel 0 (channel c adds
    c * stride_c)."""
    offs_l = block * BLOCK_L + tl.arange(0, BLOCK_L)
    return offs_l, offs_l < length, batch * n_c * length + offs_l * stride_l


@triton.jit
def _ln2d_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_c, length, stride_c, stride_l, eps,
                     SINGLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    batch = tl.program_id(1).to(tl.int64)
    offs_l, mask_l, base = _pixels(tl.program_id(0), batch, n_c, length, stride_l, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_C)
    if SINGLE:  # the tile stays in registers: one read of x in all
        x, mask, mask_c = _load(x_ptr, offs_c, base, mask_l, n_c, stride_c)
        mean = tl.sum(x, 0) / n_c
        xc = tl.where(mask, x - mean[None, :], 0.)
        rstd = 1. / tl.sqrt(tl.sum(xc * xc, 0) / n_c + eps)
        _write(y_ptr, w_ptr, b_ptr, x, mask, mask_c, offs_c, base, mean, rstd, stride_c)
    else:
        zeros = tl.zeros([BLOCK_L], dtype=tl.float32)
        count, mean, m2 = zeros, zeros, zeros
        for c0 in range(0, n_c, BLOCK_C):
            xb, maskb, _mask_cb = _load(x_ptr, c0 + offs_c, base, mask_l, n_c, stride_c)
            count, mean, m2 = chan_merge(count, mean, m2, xb, maskb)
        rstd = 1. / tl.sqrt(m2 / n_c + eps)
        for c0 in range(0, n_c, BLOCK_C):
            xb, maskb, mask_cb = _load(x_ptr, c0 + offs_c, base, mask_l, n_c, stride_c)
            _write(y_ptr, w_ptr, b_ptr, xb, maskb, mask_cb, c0 + offs_c, base, mean, rstd, stride_c)
    tl.store(mean_ptr + batch * length + offs_l, mean, mask=mask_l)
    tl.store(rstd_ptr + batch * length + offs_l, rstd, mask=mask_l)


@triton.jit
def _bwd_tile(x_ptr, dy_ptr, w_ptr, offs_c, base, mask_l, mean, rstd, n_c, stride_c):
    x, mask, mask_c = _load(x_ptr, offs_c, base, mask_l, n_c, stride_c)
    dy, _dy_mask, _dy_mask_c = _load(dy_ptr, offs_c, base, mask_l, n_c, stride_c)
    w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
    xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.)
    return dy, dy * w[:, None], xhat, mask


@triton.jit
def _ln2d_bwd_kernel(x_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr, n_c, length,
                     stride_c, stride_l, n_split, SINGLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    split, batch = tl.program_id(0), tl.program_id(1).to(tl.int64)
    part = (batch * n_split + split) * n_c  # this program's row of the partial sums
    offs_c = tl.arange(0, BLOCK_C)
    dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for block in range(split, tl.cdiv(length, BLOCK_L), n_split):
        offs_l, mask_l, base = _pixels(block, batch, n_c, length, stride_l, BLOCK_L)
        mean = tl.load(mean_ptr + batch * length + offs_l, mask=mask_l, other=0.)
        rstd = tl.load(rstd_ptr + batch * length + offs_l, mask=mask_l, other=0.)
        if SINGLE:  # x and dy stay in registers: one read each
            dy, g, xhat, mask = _bwd_tile(x_ptr, dy_ptr, w_ptr, offs_c, base, mask_l, mean, rstd, n_c, stride_c)
            c1 = tl.sum(g * xhat, 0) / n_c
            c2 = tl.sum(g, 0) / n_c
            dx = (g - c2[None, :] - xhat * c1[None, :]) * rstd[None, :]
            tl.store(dx_ptr + offs_c[:, None] * stride_c + base[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=mask)
            dw_acc += tl.sum(dy * xhat, 1)
            db_acc += tl.sum(dy, 1)
        else:  # the row sums over the chunks, then each chunk again for dx and the partial sums (zeroed buffer)
            c1 = tl.zeros([BLOCK_L], dtype=tl.float32)
            c2 = tl.zeros([BLOCK_L], dtype=tl.float32)
            for c0 in range(0, n_c, BLOCK_C):
                _dy, g, xhat, _mask = _bwd_tile(x_ptr, dy_ptr, w_ptr, c0 + offs_c, base, mask_l, mean, rstd, n_c,
                                                stride_c)
                c1 += tl.sum(g * xhat, 0)
                c2 += tl.sum(g, 0)
            c1 = c1 / n_c
            c2 = c2 / n_c
            for c0 in range(0, n_c, BLOCK_C):
                dy, g, xhat, mask = _bwd_tile(x_ptr, dy_ptr, w_ptr, c0 + offs_c, base, mask_l, mean, rstd, n_c,
                                              stride_c)
                dx = (g - c2[None, :] - xhat * c1[None, :]) * rstd[None, :]
                tl.store(dx_ptr + (c0 + offs_c)[:, None] * stride_c + base[None, :],
                         dx.to(dx_ptr.dtype.element_ty), mask=mask)
                mask_c = c0 + offs_c < n_c
                tl.atomic_add(dw_part_ptr + part + c0 + offs_c, tl.sum(dy * xhat, 1), mask=mask_c)
                tl.atomic_add(db_part_ptr + part + c0 + offs_c, tl.sum(dy, 1), mask=mask_c)
    if SINGLE:
        tl.store(dw_part_ptr + part + offs_c, dw_acc, mask=offs_c < n_c)
        tl.store(db_part_ptr + part + offs_c, db_acc, mask=offs_c < n_c)


def _split(batch: int, blocks: int) -> int:
    """Programs per image in the backward: enough for about ``BWD_PROGRAMS`` in all, at most one per pixel block."""
    return max(1, min(blocks, triton.cdiv(BWD_PROGRAMS, batch)))


def _layout(x: Tensor, channels_last: bool):
    """(B, C, L, channel stride, pixel stride) of a contiguous (B, C, L) map, or of a (B, L, C) one
    (``channels_last``: rows of C channels)."""
    if channels_last:
        b, length, c = x.shape
        return b, c, length, 1, c
    b, c, length = x.shape
    return b, c, length, length, 1


def forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype, channels_last: bool = False):
    """x (B, C, L) contiguous, or (B, L, C) with ``channels_last`` -> y of x's shape and ``out_dtype``, mean and rstd
    (B, L) float32."""
    b, c, length, stride_c, stride_l = _layout(x, channels_last)
    single, block_c, block_l = tiles(c, length, TILE_ELEMENTS, SINGLE_MAX_C)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(b, length, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    grid = (triton.cdiv(length, block_l), b)
    _ln2d_fwd_kernel[grid](x, weight, bias, y, mean, rstd, c, length, stride_c, stride_l, eps, SINGLE=single,
                           BLOCK_C=block_c, BLOCK_L=block_l, num_warps=NUM_WARPS)
    return y, mean, rstd


def backward(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, channels_last: bool = False):
    """dx (x's dtype), dweight, dbias (float32) of :func:`forward` (dy contiguous, of x's shape)."""
    b, c, length, stride_c, stride_l = _layout(x, channels_last)
    single, block_c, block_l = tiles(c, length, TILE_ELEMENTS // 2, SINGLE_MAX_C_BWD)
    n_split = _split(b, triton.cdiv(length, block_l))
    dx = torch.empty_like(x)
    parts = torch.empty if single else torch.zeros  # the chunked path adds into its rows
    dw_part = parts(b * n_split, c, dtype=torch.float32, device=x.device)
    db_part = parts(b * n_split, c, dtype=torch.float32, device=x.device)
    _ln2d_bwd_kernel[(n_split, b)](x, weight, dy, mean, rstd, dx, dw_part, db_part, c, length, stride_c, stride_l,
                                   n_split, SINGLE=single, BLOCK_C=block_c, BLOCK_L=block_l, num_warps=NUM_WARPS)
    return dx, dw_part.sum(0), db_part.sum(0)
