"""Triton kernels of :func:`vssm.ops.bias_gelu`: ``gelu(h + bias[c])`` over a contiguous (B, C, L) map.

A program takes a tile of consecutive pixels of one or more (image, channel) rows (:func:`row_tiles`): one read of
h, one write of the output, the bias loaded once per row. The sum is rounded to h's dtype before the GELU (as the
reference's 16-bit add is), the GELU computed in float32 and rounded once.

The backward reads h and the output's gradient once and writes h's gradient (rounded as ATen's ``gelu_backward``
rounds its result); the bias gradient comes as per-program float32 partial sums, (B * C, programs per row), reduced
on the host side: no second pass over the gradient.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import low_precision, round_to, row_tile, row_tiles


@triton.jit
def _biased(h_ptr, b_ptr, rows, mask_r, offs, mask, n_c, LOW: tl.constexpr):
    """h + bias of the tile in float32, rounded to h's dtype when 16-bit."""
    bias = tl.load(b_ptr + rows % n_c, mask=mask_r, other=0.).to(h_ptr.dtype.element_ty).to(tl.float32)
    h = tl.load(h_ptr + offs, mask=mask, other=0.).to(tl.float32)
    return round_to(h + bias[:, None], LOW, h_ptr.dtype.element_ty)


@triton.jit
def _bias_gelu_fwd(h_ptr, b_ptr, out_ptr, n_rows, n_c, length, LOW: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK: tl.constexpr):
    _, rows, mask_r, mask, offs = row_tile(n_rows, length, ROWS, BLOCK)
    t = _biased(h_ptr, b_ptr, rows, mask_r, offs, mask, n_c, LOW)
    out = 0.5 * t * (1. + tl.math.erf(t * 0.7071067811865476))
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd(g_ptr, h_ptr, b_ptr, dh_ptr, db_ptr, n_rows, n_c, length, n_blocks, LOW: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid_l, rows, mask_r, mask, offs = row_tile(n_rows, length, ROWS, BLOCK)
    t = _biased(h_ptr, b_ptr, rows, mask_r, offs, mask, n_c, LOW)
    g = tl.load(g_ptr + offs, mask=mask, other=0.).to(tl.float32)
    cdf = 0.5 * (1. + tl.math.erf(t * 0.7071067811865476))
    pdf = tl.exp(-0.5 * t * t) * 0.3989422804014327
    dh = round_to(g * (cdf + t * pdf), LOW, dh_ptr.dtype.element_ty)
    tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + rows * n_blocks + pid_l, tl.sum(tl.where(mask, dh, 0.), 1), mask=mask_r)


def forward(h: Tensor, bias: Tensor) -> Tensor:
    """h (B, C, L) contiguous, bias (C,) -> gelu(h + bias) (B, C, L) in h's dtype."""
    b, c, length = h.shape
    out = torch.empty_like(h)
    n_rows, block, grid, warps = row_tiles(b * c, length)
    _bias_gelu_fwd[grid](h, bias, out, b * c, c, length, LOW=low_precision(h), ROWS=n_rows, BLOCK=block,
                         num_warps=warps)
    return out


def backward(grad: Tensor, h: Tensor, bias: Tensor):
    """grad, h (B, C, L) contiguous -> (dh in h's dtype, dbias (C,) float32)."""
    b, c, length = h.shape
    dh = torch.empty_like(h)
    n_rows, block, grid, warps = row_tiles(b * c, length)
    partial = torch.empty(b, c, grid[1], dtype=torch.float32, device=h.device)
    _bias_gelu_bwd[grid](grad, h, bias, dh, partial, b * c, c, length, grid[1], LOW=low_precision(h), ROWS=n_rows,
                         BLOCK=block, num_warps=warps)
    return dh, partial.sum((0, 2))
