"""LayerNorm over the channels of a channels-first (B, C, H, W) map, as VMamba's and Spectral VMamba's LayerNorm2d.

``F.layer_norm`` normalizes the last dimension, so the reference permutes the map to (B, H, W, C), which
``F.layer_norm`` copies to a contiguous tensor, and permutes the result back (channels-last strides that the next op may
copy again): three passes over the map where one read and one write suffice. The kernel (Triton, on CUDA tensors)
normalizes the (B, C, L) map in place of its layout: one read and one write (two reads above 256 channels), float32
statistics, and the output written directly in the dtype the next GEMM runs in (``out_dtype``).

``layer_norm_last`` is the same kernel over rows of channels ((..., C) contiguous, as Spatial-Mamba's channels-last
maps), where ATen's LayerNorm gives each row a thread block of its own, far from the bandwidth on narrow rows. The
models do not call it: in Spatial-Mamba-T it measured slower than ATen's LayerNorm (kernels/README.md).

Output dtype: by default what ``F.layer_norm`` gives, float32 under autocast and x's dtype otherwise; ``out_dtype``
casts it in the same pass (the value is the float32 result rounded once).

Shape legend: B batch, C channels, H/W height/width, L = H*W.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import triton_kernel_runs, try_import_extension

__all__ = ['layer_norm_2d', 'layer_norm_2d_ref', 'layer_norm_last', 'kernel_available']

_KERNEL = try_import_extension(f'{__package__}._triton_layer_norm')  # None without Triton (CPU-only torch installs)


def kernel_available() -> bool:
    """Whether the Triton kernel can run (Triton importable; the tensors must also be on a CUDA device)."""
    return _KERNEL is not None


def _default_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype


def layer_norm_2d_ref(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                      out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Pure-PyTorch reference: (B, C, H, W) -> normalized over C, as a (B, C, H, W) view of a channels-last tensor."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1], ), weight, bias, eps).permute(0, 3, 1, 2)
    return y if out_dtype is None else y.to(out_dtype)


class _LayerNorm2d(torch.autograd.Function):
    """The kernel's forward and backward; saves x, the weight and the (B, L) float32 statistics. (Under
    ``torch.compile`` the reference runs instead, for inductor to fuse, so no custom op is registered.)"""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
        y, mean, rstd = _KERNEL.forward(x.flatten(2), weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _KERNEL.backward(dy.contiguous().flatten(2), x.flatten(2), weight, mean, rstd)
        return dx.view(x.shape), dw.to(weight.dtype), db.to(weight.dtype), None, None


# Where the kernel is faster than the reference (kernels/README.md, one H100): the forward on every map (one read and
# one write in the map's layout, where the reference permutes and copies); forward and backward together (training)
# on maps of up to 192 channels and at least 1024 pixels per image (stage 1 of the T models at 224x224). On wider or
# smaller maps the backward is launch-bound and the reference's is faster.
KERNEL_MAX_CHANNELS = 192
KERNEL_MIN_PIXELS = 1024


def _pays(x: Tensor, weight: Tensor, bias: Tensor) -> bool:
    # The models' norms before a projection (``normed_linear``) run their forward inside an autograd.Function, without
    # gradients: the kernel on every map; the backward's recomputation of the norm has gradients and takes the
    # reference where the kernel's backward does not pay (the two forwards agree to float32 rounding).
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)):
        return True
    return x.shape[1] <= KERNEL_MAX_CHANNELS and x.shape[2] * x.shape[3] >= KERNEL_MIN_PIXELS


def _use_kernel(backend: str, x: Tensor, weight: Tensor, bias: Tensor, channels_first: bool = True) -> bool:
    """Whether the kernel runs (:func:`~vssm.ops._backend.triton_kernel_runs`: the switch, the backend, a CUDA tensor,
    not compiling or tracing); for channels-first maps also where it pays (:func:`_pays`)."""
    name = 'layer_norm_2d' if channels_first else 'layer_norm_last'
    if not triton_kernel_runs(name, _KERNEL, x, backend):
        return False  # under torch.compile inductor fuses the reference with its neighbours itself
    return _pays(x, weight, bias) if channels_first else True


def layer_norm_2d(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, out_dtype: Optional[torch.dtype] = None,
                  *, backend: str = 'auto') -> Tensor:
    """LayerNorm over the channels of ``x``.

    Args:
        x: (B, C, H, W).
        weight, bias: (C,).
        eps: added to the variance.
        out_dtype: the output's dtype (default: float32 under autocast, else x's dtype, as ``F.layer_norm``).
        backend: one of :data:`~vssm.ops.BACKENDS`; ``'auto'`` and ``'cuda'`` run the Triton kernel on CUDA tensors
            unless ``VSSM_TRITON_FUSIONS=0`` (:func:`~vssm.ops._backend.triton_fusions_enabled`): without gradients on
            every map, with gradients where its backward is faster too (``KERNEL_MAX_CHANNELS``,
            ``KERNEL_MIN_PIXELS``); the reference otherwise.

    Returns:
        (B, C, H, W): contiguous from the kernel, a channels-last view from the reference.
    """
    if x.dim() != 4 or weight.shape != (x.shape[1], ) or bias is None or bias.shape != weight.shape:
        raise ValueError(f'layer_norm_2d: expected x (B, C, H, W) and weight, bias (C,), got {tuple(x.shape)}, '
                         f'{tuple(weight.shape)}, {None if bias is None else tuple(bias.shape)}.')
    if not _use_kernel(backend, x, weight, bias):
        return layer_norm_2d_ref(x, weight, bias, eps, out_dtype)
    return _LayerNorm2d.apply(x.contiguous(), weight.contiguous(), bias.contiguous(), float(eps),
                              out_dtype or _default_dtype(x))


class _LayerNormLast(torch.autograd.Function):
    """The kernel over rows of C channels ((N, L, C) contiguous: channels-last maps, token sequences); saves x, the
    weight and the (N, L) float32 statistics."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
        rows = x.view(1, -1, x.shape[-1])
        y, mean, rstd = _KERNEL.forward(rows, weight, bias, eps, out_dtype, channels_last=True)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        c = x.shape[-1]
        dx, dw, db = _KERNEL.backward(dy.contiguous().view(1, -1, c), x.view(1, -1, c), weight, mean, rstd,
                                      channels_last=True)
        return dx.view(x.shape), dw.to(weight.dtype), db.to(weight.dtype), None, None


# Rows up to this many channels take the kernel: ATen's LayerNorm gives each row one thread block, which leaves
# narrow rows far from the memory bandwidth (Spatial-Mamba-T's 64-channel ln_1/ln_2 at stage 1: 0.61 ms for 26 M
# values on an H100, about 10x one pass over them; kernels/README.md).
KERNEL_MAX_CHANNELS_LAST = 256


def layer_norm_last(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5,
                    out_dtype: Optional[torch.dtype] = None, *, backend: str = 'auto') -> Tensor:
    """``F.layer_norm`` over the last dimension of ``x`` (..., C), e.g. a channels-last (B, H, W, C) map.

    Args:
        x: (..., C).
        weight, bias: (C,).
        eps: added to the variance.
        out_dtype: the output's dtype (default: float32 under autocast, else x's dtype, as ``F.layer_norm``).
        backend: one of :data:`~vssm.ops.BACKENDS`; ``'auto'`` and ``'cuda'`` run the Triton kernel on contiguous CUDA
            tensors of at most ``KERNEL_MAX_CHANNELS_LAST`` channels unless ``VSSM_TRITON_FUSIONS=0``; the reference
            (``F.layer_norm``) otherwise.
    """
    if x.dim() < 1 or weight.shape != (x.shape[-1], ) or bias is None or bias.shape != weight.shape:
        raise ValueError(f'layer_norm_last: expected x (..., C) and weight, bias (C,), got {tuple(x.shape)}, '
                         f'{tuple(weight.shape)}, {None if bias is None else tuple(bias.shape)}.')
    if (not _use_kernel(backend, x, weight, bias, channels_first=False) or not x.is_contiguous()
            or x.shape[-1] > KERNEL_MAX_CHANNELS_LAST or x.numel() == 0):
        y = F.layer_norm(x, (x.shape[-1], ), weight, bias, eps)
        return y if out_dtype is None else y.to(out_dtype)
    return _LayerNormLast.apply(x, weight.contiguous(), bias.contiguous(), float(eps), out_dtype or _default_dtype(x))

