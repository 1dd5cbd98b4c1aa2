"""Triton kernels of :func:`vssm.ops.layer_norm_2d`: LayerNorm over the channels of a contiguous (B, C, L) map.

Tiling as in :mod:`vssm.ops._triton_common`: one read of x and one write of y up to 256 channels, two reads above.
Statistics are float32 whatever the dtype. The backward gives dx per pixel and per-program partial sums of the weight
and bias gradients, reduced over programs on the host side.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import NUM_WARPS, chan_merge, flat_pixels, tiles


@triton.jit
def _load(ptr, offs_c, base, mask_l, n_c, length):
    """A [channels, pixels] tile as float32, with its mask."""
    mask_c = offs_c < n_c
    mask = mask_c[:, None] & mask_l[None, :]
    return tl.load(ptr + offs_c[:, None] * length + base[None, :], mask=mask, other=0.).to(tl.float32), mask, mask_c


@triton.jit
def _write(y_ptr, w_ptr, b_ptr, x, mask, mask_c, offs_c, base, mean, rstd, length):
    w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
    b = tl.load(b_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
    y = (x - mean[None, :]) * rstd[None, :] * w[:, None] + b[:, None]
    tl.store(y_ptr + offs_c[:, None] * length + base[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ln2d_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_c, length, n_pixels, eps,
                     SINGLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    offs_p, mask_l, _batch, _pixel, base = flat_pixels(tl.program_id(0), n_c, length, n_pixels, BLOCK_L)
    zeros = tl.zeros([BLOCK_L], dtype=tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    x, mask, mask_c = _load(x_ptr, offs_c, base, mask_l, n_c, length)
    count, mean, m2 = chan_merge(zeros, zeros, zeros, x, mask)
    if not SINGLE:
        for c0 in range(BLOCK_C, n_c, BLOCK_C):
            xb, maskb, _mask_cb = _load(x_ptr, c0 + tl.arange(0, BLOCK_C), base, mask_l, n_c, length)
            count, mean, m2 = chan_merge(count, mean, m2, xb, maskb)
    rstd = 1. / tl.sqrt(m2 / n_c + eps)
    if SINGLE:  # the tile is still in registers: one read of x in all
        _write(y_ptr, w_ptr, b_ptr, x, mask, mask_c, offs_c, base, mean, rstd, length)
    else:
        for c0 in range(0, n_c, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            xb, maskb, mask_cb = _load(x_ptr, offs_c, base, mask_l, n_c, length)
            _write(y_ptr, w_ptr, b_ptr, xb, maskb, mask_cb, offs_c, base, mean, rstd, length)
    tl.store(mean_ptr + offs_p, mean, mask=mask_l)
    tl.store(rstd_ptr + offs_p, rstd, mask=mask_l)


@triton.jit
def _bwd_tile(x_ptr, dy_ptr, w_ptr, offs_c, base, mask_l, mean, rstd, n_c, length):
    x, mask, mask_c = _load(x_ptr, offs_c, base, mask_l, n_c, length)
    dy, _dy_mask, _dy_mask_c = _load(dy_ptr, offs_c, base, mask_l, n_c, length)
    w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
    xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.)
    return dy, dy * w[:, None], xhat, mask, mask_c


@triton.jit
def _ln2d_bwd_kernel(x_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr, n_c, length,
                     n_pixels, SINGLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)  # row of the partial sums
    offs_p, mask_l, _batch, _pixel, base = flat_pixels(tl.program_id(0), n_c, length, n_pixels, BLOCK_L)
    mean = tl.load(mean_ptr + offs_p, mask=mask_l, other=0.)
    rstd = tl.load(rstd_ptr + offs_p, mask=mask_l, other=0.)
    c1 = tl.zeros([BLOCK_L], dtype=tl.float32)
    c2 = tl.zeros([BLOCK_L], dtype=tl.float32)
    n_chunks = 1 if SINGLE else tl.cdiv(n_c, BLOCK_C)
    for chunk in range(0, n_chunks):
        offs_c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
        _dy, g, xhat, _mask, _mask_c = _bwd_tile(x_ptr, dy_ptr, w_ptr, offs_c, base, mask_l, mean, rstd, n_c, length)
        c1 += tl.sum(g * xhat, 0)
        c2 += tl.sum(g, 0)
    c1 = c1 / n_c
    c2 = c2 / n_c
    for chunk in range(0, n_chunks):
        offs_c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
        dy, g, xhat, mask, mask_c = _bwd_tile(x_ptr, dy_ptr, w_ptr, offs_c, base, mask_l, mean, rstd, n_c, length)
        dx = (g - c2[None, :] - xhat * c1[None, :]) * rstd[None, :]
        tl.store(dx_ptr + offs_c[:, None] * length + base[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_part_ptr + program * n_c + offs_c, tl.sum(dy * xhat, 1), mask=mask_c)
        tl.store(db_part_ptr + program * n_c + offs_c, tl.sum(dy, 1), mask=mask_c)


def forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype):
    """x (B, C, L) contiguous -> y (B, C, L) of ``out_dtype``, mean and rstd (B, L) float32."""
    b, c, length = x.shape
    single, block_c, block_l = tiles(c, 8192)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(b, length, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    grid = (triton.cdiv(b * length, block_l), )
    _ln2d_fwd_kernel[grid](x, weight, bias, y, mean, rstd, c, length, b * length, eps, SINGLE=single,
                           BLOCK_C=block_c, BLOCK_L=block_l, num_warps=NUM_WARPS)
    return y, mean, rstd


def backward(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor):
    """dx (x's dtype), dweight, dbias (float32) of :func:`forward`."""
    b, c, length = x.shape
    single, block_c, block_l = tiles(c, 4096)
    grid = (triton.cdiv(b * length, block_l), )
    dx = torch.empty_like(x)
    dw_part = torch.empty(grid[0], c, dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part)
    _ln2d_bwd_kernel[grid](x, weight, dy, mean, rstd, dx, dw_part, db_part, c, length, b * length, SINGLE=single,
                           BLOCK_C=block_c, BLOCK_L=block_l, num_warps=NUM_WARPS)
    return dx, dw_part.sum(0), db_part.sum(0)
