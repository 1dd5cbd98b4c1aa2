"""A residual branch added back: ``x + drop_path(y + bias)``, as one pass (the bias over the channels of (B, C, H, W)
maps; without it any layout).

The blocks' ``x = x + drop_path(branch(x))``, with the branch's last bias (VMamba's fc2 in its batched-GEMM form
adds it as a broadcast pass of its own) and DropPath's per-image factor in training (mmcv's ``drop_path``: a
division and a multiplication, two more passes), is four elementwise passes in the plain ops, the last one mixing
the float32 residual stream with the 16-bit branch. The kernel (Triton, on CUDA tensors) reads x and y once and
writes the sum once; its backward reads the output's gradient once and writes y's, x's gradient being the output's.

The values are those of the plain composition (:func:`add_residual_ref`): the bias added in y's dtype, the division
by the keep probability in y's dtype, the sum in the dtype of ``x + y``. The keep mask is drawn as mmcv draws it
(``keep_prob + rand``, floored, in y's dtype, one number per image), so the random stream is the same too.

Shape legend: B batch, C channels, H/W height/width.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from ._backend import triton_kernel_runs, try_import_extension

__all__ = ['add_residual', 'add_residual_ref', 'drop_path_mask', 'kernel_available', 'kernel_runs']

_KERNEL = try_import_extension(f'{__package__}._triton_residual')  # None without Triton (CPU-only torch installs)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_available() -> bool:
    """Whether the Triton kernel can run (Triton importable; the tensors must also be on a CUDA device)."""
    return _KERNEL is not None


def drop_path_mask(drop_path: nn.Module, y: Tensor):
    """(keep mask (B,) in y's dtype or None, keep probability) of a DropPath module (mmcv's or timm's, with
    ``drop_prob``) or an identity for y: None where it passes y unchanged (eval, zero probability)."""
    prob = float(getattr(drop_path, 'drop_prob', 0.))
    if prob == 0. or not drop_path.training:
        return None, 1.
    keep = 1. - prob
    return (keep + torch.rand((y.shape[0], ), dtype=y.dtype, device=y.device)).floor_(), keep


def add_residual_ref(x: Tensor, y: Tensor, bias: Optional[Tensor] = None, keep_mask: Optional[Tensor] = None,
                     keep_prob: float = 1.) -> Tensor:
    """The plain composition: see :func:`add_residual`."""
    if bias is not None:
        y = y + bias.to(y.dtype)[:, None, None]
    if keep_mask is not None:
        y = y.div(keep_prob) * keep_mask.view((-1, ) + (1, ) * (y.dim() - 1))
    return x + y


class _AddResidual(torch.autograd.Function):
    """The kernel's forward and backward; saves the keep mask only."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, bias: Optional[Tensor], keep_mask: Optional[Tensor], keep_prob: float):
        ctx.save_for_backward(keep_mask)
        ctx.x_dtype, ctx.y_dtype, ctx.keep_prob = x.dtype, y.dtype, keep_prob
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.rows = (y.shape[0], y.shape[1] if bias is not None else 1, -1)  # channel rows where the bias needs them
        return _KERNEL.forward(x.view(ctx.rows), y.view(ctx.rows), bias, keep_mask, keep_prob).view(y.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep_mask, ) = ctx.saved_tensors
        has_bias = ctx.bias_dtype is not None
        dy = db = None
        if ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2]):
            dy, db = _KERNEL.backward(grad.contiguous().view(ctx.rows), ctx.y_dtype, has_bias, keep_mask,
                                      ctx.keep_prob)
            dy, db = dy.view(grad.shape), (db.to(ctx.bias_dtype) if has_bias else None)
        return grad.to(ctx.x_dtype), dy, db, None, None


def kernel_runs(y: Tensor, backend: str = 'auto') -> bool:
    """Whether :func:`add_residual` with a branch output like ``y`` runs the kernel: the switch on, the backend allows
    it, a CUDA tensor in float32/bfloat16/float16, not compiling or tracing."""
    return triton_kernel_runs('add_residual', _KERNEL, y, backend, KERNEL_DTYPES)


def add_residual(x: Tensor, y: Tensor, drop_path: Optional[nn.Module] = None, bias: Optional[Tensor] = None, *,
                 backend: str = 'auto') -> Tensor:
    """``x + drop_path(y + bias[:, None, None])``.

    Args:
        x: (B, C, H, W) with a bias, else (B, ...) of any layout (channels-last maps, tokens): the residual stream
            (float32 under autocast).
        y: the branch's output, x's shape (16-bit under autocast).
        drop_path: the block's DropPath (``drop_prob``, active in training) or an identity; None for none.
        bias: (C,), the branch's last bias where its projection left it out; cast to y's dtype.
        backend: one of :data:`~vssm.ops.BACKENDS`; ``'auto'`` and ``'cuda'`` run the Triton kernel on contiguous
            CUDA maps (:func:`kernel_runs`) unless ``VSSM_TRITON_FUSIONS=0``; the reference otherwise.

    Returns:
        (B, C, H, W) in the dtype of ``x + y``.
    """
    if (x.dim() < 1 or x.shape != y.shape
            or (bias is not None and (x.dim() != 4 or bias.shape != (y.shape[1], )))):
        raise ValueError(f'add_residual: expected x and y of one shape, (B, C, H, W) with a bias (C,), got '
                         f'{tuple(x.shape)}, {tuple(y.shape)}, {None if bias is None else tuple(bias.shape)}.')
    keep_mask, keep_prob = drop_path_mask(drop_path, y) if drop_path is not None else (None, 1.)
    # the kernel computes in float32: a float64 stream (or branch) takes the reference
    if (not kernel_runs(y, backend) or x.dtype not in KERNEL_DTYPES or not (x.is_contiguous() and y.is_contiguous())
            or y.numel() == 0 or x.device != y.device):
        return add_residual_ref(x, y, bias, keep_mask, keep_prob)
    return _AddResidual.apply(x, y, None if bias is None else bias.contiguous(), keep_mask, keep_prob)
