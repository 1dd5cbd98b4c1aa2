"""Triton kernels of :func:`vssm.ops.add_residual`: ``x + drop_path(y + bias[c])`` over contiguous (B, C, L) maps.

A program takes a tile of consecutive pixels of one or more (image, channel) rows (:func:`row_tiles`): one read of x
and of y, one write of the sum, the bias and the image's DropPath factor loaded once per row. Each step is rounded as
the reference's ops round it: the bias added in y's dtype, the division by the keep probability in y's dtype (as
ATen's CUDA division by a scalar: a multiplication by its float32 inverse), the mask (0 or 1) exact, the sum in the
output's dtype.

The backward reads the output's gradient once and writes y's (the chain of the reference's backward: the cast to
y's dtype, the mask, the division, each rounded); the bias gradient comes as per-program float32 partial sums,
(B * C, programs per row), reduced on the host side. x's gradient is the output's, no kernel.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import low_precision, round_to, row_tile, row_tiles


def _inverse(keep_prob: float) -> float:
    """1 / keep_prob in float32, as ATen divides a tensor by a scalar on CUDA (a multiplication by the inverse)."""
    return (torch.tensor(1., dtype=torch.float32) / torch.tensor(keep_prob, dtype=torch.float32)).item()


@triton.jit
def _branch(t, b_ptr, m_ptr, rows, mask_r, n_c, inv_keep, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
            LOW_Y: tl.constexpr, y_ty: tl.constexpr):
    """drop_path(y + bias) of the tile (y as float32), each step rounded to y's dtype when 16-bit."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + rows % n_c, mask=mask_r, other=0.).to(y_ty).to(tl.float32)
        t = round_to(t + bias[:, None], LOW_Y, y_ty)
    if HAS_MASK:
        keep = tl.load(m_ptr + rows // n_c, mask=mask_r, other=0.).to(tl.float32)
        t = round_to(t * inv_keep, LOW_Y, y_ty) * keep[:, None]
    return t


@triton.jit
def _residual_fwd(x_ptr, y_ptr, b_ptr, m_ptr, out_ptr, n_rows, n_c, length, inv_keep, HAS_BIAS: tl.constexpr,
                  HAS_MASK: tl.constexpr, LOW_Y: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    _, rows, mask_r, mask, offs = row_tile(n_rows, length, ROWS, BLOCK)
    y_ty = y_ptr.dtype.element_ty
    t = tl.load(y_ptr + offs, mask=mask, other=0.).to(tl.float32)
    t = _branch(t, b_ptr, m_ptr, rows, mask_r, n_c, inv_keep, HAS_BIAS, HAS_MASK, LOW_Y, y_ty)
    out = tl.load(x_ptr + offs, mask=mask, other=0.).to(tl.float32) + t
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_bwd(g_ptr, m_ptr, dy_ptr, db_ptr, n_rows, n_c, length, n_blocks, inv_keep, HAS_BIAS: tl.constexpr,
                  HAS_MASK: tl.constexpr, LOW_Y: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid_l, rows, mask_r, mask, offs = row_tile(n_rows, length, ROWS, BLOCK)
    y_ty = dy_ptr.dtype.element_ty
    g = round_to(tl.load(g_ptr + offs, mask=mask, other=0.).to(tl.float32), LOW_Y, y_ty)
    if HAS_MASK:  # the mask then the division, each rounded (the reference's backward: mul's, then div's)
        keep = tl.load(m_ptr + rows // n_c, mask=mask_r, other=0.).to(tl.float32)
        g = round_to(g * keep[:, None], LOW_Y, y_ty)
        g = round_to(g * inv_keep, LOW_Y, y_ty)
    tl.store(dy_ptr + offs, g.to(y_ty), mask=mask)
    if HAS_BIAS:
        tl.store(db_ptr + rows * n_blocks + pid_l, tl.sum(tl.where(mask, g, 0.), 1), mask=mask_r)


def forward(x: Tensor, y: Tensor, bias, keep_mask, keep_prob: float) -> Tensor:
    """x, y (B, C, L) contiguous, bias (C,) or None, keep_mask (B,) in y's dtype or None -> (B, C, L) in the dtype
    of ``x + y``."""
    b, c, length = y.shape
    out = torch.empty(y.shape, dtype=torch.result_type(x, y), device=y.device)
    n_rows, block, grid, warps = row_tiles(b * c, length)
    _residual_fwd[grid](x, y, y if bias is None else bias, y if keep_mask is None else keep_mask, out, b * c, c, length,
                        _inverse(keep_prob), HAS_BIAS=bias is not None, HAS_MASK=keep_mask is not None,
                        LOW_Y=low_precision(y), ROWS=n_rows, BLOCK=block, num_warps=warps)
    return out


def backward(grad: Tensor, y_dtype: torch.dtype, has_bias: bool, keep_mask, keep_prob: float):
    """grad (B, C, L) contiguous -> (dy in ``y_dtype``, dbias (C,) float32 or None)."""
    b, c, length = grad.shape
    dy = torch.empty(grad.shape, dtype=y_dtype, device=grad.device)
    n_rows, block, grid, warps = row_tiles(b * c, length)
    partial = torch.empty(b, c, grid[1], dtype=torch.float32, device=grad.device) if has_bias else dy
    _residual_bwd[grid](grad, grad if keep_mask is None else keep_mask, dy, partial, b * c, c, length, grid[1],
                        _inverse(keep_prob), HAS_BIAS=has_bias, HAS_MASK=keep_mask is not None, LOW_Y=low_precision(dy),
                        ROWS=n_rows, BLOCK=block, num_warps=warps)
    return dy, (partial.sum((0, 2)) if has_bias else None)
