"""Triton kernels of :func:`vssm.ops.layer_norm_2d`: LayerNorm over the channels of a contiguous (B, C, L) map.

A program takes ``BLOCK_L`` consecutive pixels of the flattened (B * L) pixel axis (runs of consecutive addresses per
channel, across image boundaries, so small maps still give many programs). Channels up to ``SINGLE_MAX_C`` are held in registers
(one read of x, one write of y); wider maps are reduced in chunks of ``BLOCK_C`` channels with Chan's merge of
(mean, M2) (numerically stable, two reads of x). Statistics are float32 whatever the dtype. The backward gives dx per
pixel and per-program partial sums of the weight and bias gradients, reduced over programs on the host side.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

SINGLE_MAX_C = 256  # channels held in registers in one tile (padded to a power of two)


def _tiles(channels: int, elements: int):
    """(single pass, BLOCK_C, BLOCK_L) for a channel count: about ``elements`` per tile and 16 to 64 pixels per row
    (enough programs for small maps; 64+ contiguous bytes per channel row)."""
    if channels <= SINGLE_MAX_C:
        block_c = triton.next_power_of_2(channels)
        return True, block_c, min(64, max(16, elements // block_c))
    return False, 64, 32


FWD_ELEMENTS, BWD_ELEMENTS, NUM_WARPS = 8192, 4096, 8


@triton.jit
def _pixels(pid, n_c, length, n_pixels, BLOCK_L: tl.constexpr):
    """The program's pixels: their flat index (B * L axis), a mask, and the offset of channel 0 of each."""
    offs_p = pid.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_p = offs_p < n_pixels
    base = (offs_p // length) * n_c * length + offs_p % length
    return offs_p, mask_p, base


@triton.jit
def _stats_single(x_ptr, offs_c, base, mask, length, n_c):
    x = tl.load(x_ptr + offs_c[:, None] * length + base[None, :], mask=mask, other=0.).to(tl.float32)
    mean = tl.sum(x, 0) / n_c
    xc = tl.where(mask, x - mean[None, :], 0.)
    var = tl.sum(xc * xc, 0) / n_c
    return xc, mean, var


@triton.jit
def _ln2d_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_c, length, n_pixels, eps,
                     SINGLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    offs_p, mask_l, base = _pixels(tl.program_id(0), n_c, length, n_pixels, BLOCK_L)
    if SINGLE:
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < n_c
        mask = mask_c[:, None] & mask_l[None, :]
        xc, mean, var = _stats_single(x_ptr, offs_c, base, mask, length, n_c)
        rstd = 1. / tl.sqrt(var + eps)
        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
        b = tl.load(b_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
        y = xc * rstd[None, :] * w[:, None] + b[:, None]
        tl.store(y_ptr + offs_c[:, None] * length + base[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        count = tl.zeros([BLOCK_L], dtype=tl.float32)
        mean = tl.zeros([BLOCK_L], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_L], dtype=tl.float32)
        for c0 in range(0, n_c, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = (offs_c < n_c)[:, None] & mask_l[None, :]
            x = tl.load(x_ptr + offs_c[:, None] * length + base[None, :], mask=mask, other=0.).to(tl.float32)
            n_b = tl.sum(mask.to(tl.float32), 0)
            mean_b = tl.sum(x, 0) / tl.maximum(n_b, 1.)
            xc = tl.where(mask, x - mean_b[None, :], 0.)
            m2_b = tl.sum(xc * xc, 0)
            total = count + n_b
            delta = mean_b - mean
            mean += delta * n_b / tl.maximum(total, 1.)
            m2 += m2_b + delta * delta * count * n_b / tl.maximum(total, 1.)
            count = total
        rstd = 1. / tl.sqrt(m2 / n_c + eps)
        for c0 in range(0, n_c, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < n_c
            mask = mask_c[:, None] & mask_l[None, :]
            ptrs = offs_c[:, None] * length + base[None, :]
            x = tl.load(x_ptr + ptrs, mask=mask, other=0.).to(tl.float32)
            w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
            b = tl.load(b_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
            y = (x - mean[None, :]) * rstd[None, :] * w[:, None] + b[:, None]
            tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + offs_p, mean, mask=mask_l)
    tl.store(rstd_ptr + offs_p, rstd, mask=mask_l)


@triton.jit
def _ln2d_bwd_kernel(x_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr, n_c, length,
                     n_pixels, SINGLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)  # row of the partial sums
    offs_p, mask_l, base = _pixels(tl.program_id(0), n_c, length, n_pixels, BLOCK_L)
    mean = tl.load(mean_ptr + offs_p, mask=mask_l, other=0.)
    rstd = tl.load(rstd_ptr + offs_p, mask=mask_l, other=0.)
    if SINGLE:
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < n_c
        mask = mask_c[:, None] & mask_l[None, :]
        ptrs = offs_c[:, None] * length + base[None, :]
        x = tl.load(x_ptr + ptrs, mask=mask, other=0.).to(tl.float32)
        dy = tl.load(dy_ptr + ptrs, mask=mask, other=0.).to(tl.float32)
        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
        xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.)
        g = dy * w[:, None]
        c1 = tl.sum(g * xhat, 0) / n_c
        c2 = tl.sum(g, 0) / n_c
        dx = (g - c2[None, :] - xhat * c1[None, :]) * rstd[None, :]
        tl.store(dx_ptr + ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_part_ptr + program * n_c + offs_c, tl.sum(dy * xhat, 1), mask=mask_c)
        tl.store(db_part_ptr + program * n_c + offs_c, tl.sum(dy, 1), mask=mask_c)
    else:
        c1 = tl.zeros([BLOCK_L], dtype=tl.float32)
        c2 = tl.zeros([BLOCK_L], dtype=tl.float32)
        for c0 in range(0, n_c, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < n_c
            mask = mask_c[:, None] & mask_l[None, :]
            ptrs = offs_c[:, None] * length + base[None, :]
            x = tl.load(x_ptr + ptrs, mask=mask, other=0.).to(tl.float32)
            dy = tl.load(dy_ptr + ptrs, mask=mask, other=0.).to(tl.float32)
            w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
            xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.)
            g = dy * w[:, None]
            c1 += tl.sum(g * xhat, 0)
            c2 += tl.sum(g, 0)
        c1 = c1 / n_c
        c2 = c2 / n_c
        for c0 in range(0, n_c, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < n_c
            mask = mask_c[:, None] & mask_l[None, :]
            ptrs = offs_c[:, None] * length + base[None, :]
            x = tl.load(x_ptr + ptrs, mask=mask, other=0.).to(tl.float32)
            dy = tl.load(dy_ptr + ptrs, mask=mask, other=0.).to(tl.float32)
            w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
            xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.)
            dx = (dy * w[:, None] - c2[None, :] - xhat * c1[None, :]) * rstd[None, :]
            tl.store(dx_ptr + ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(dw_part_ptr + program * n_c + offs_c, tl.sum(dy * xhat, 1), mask=mask_c)
            tl.store(db_part_ptr + program * n_c + offs_c, tl.sum(dy, 1), mask=mask_c)


def forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype):
    """x (B, C, L) contiguous -> y (B, C, L) of ``out_dtype``, mean and rstd (B, L) float32."""
    b, c, length = x.shape
    single, block_c, block_l = _tiles(c, FWD_ELEMENTS)
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
    single, block_c, block_l = _tiles(c, BWD_ELEMENTS)
    grid = (triton.cdiv(b * length, block_l), )
    dx = torch.empty_like(x)
    dw_part = torch.empty(grid[0], c, dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part)
    _ln2d_bwd_kernel[grid](x, weight, dy, mean, rstd, dx, dw_part, db_part, c, length, b * length, SINGLE=single,
                           BLOCK_C=block_c, BLOCK_L=block_l, num_warps=NUM_WARPS)
    return dx, dw_part.sum(0), db_part.sum(0)
