"""``gelu(h + bias)`` over the channels of a channels-first (B, C, H, W) map: an MLP's first projection's bias and
its activation in one pass.

Linear2d's batched-GEMM form (:func:`vssm.models.layers.recompute.linear_2d`) adds its bias as a separate broadcast
pass over the (B, 4C, H, W) hidden map, which GELU then reads and writes again. The kernel (Triton, on CUDA tensors)
reads h once and writes the activation once, and its backward gives h's and the bias's gradients from one read of h
and of the output's gradient. The reference is the plain composition; under ``torch.compile`` it runs, for inductor to
fuse with its neighbours.

Values are those of the reference: the sum rounded to h's dtype (the bias cast to it first), the GELU (erf form)
computed in float32 and rounded once.

Shape legend: B batch, C channels, H/W height/width.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import triton_kernel_runs, try_import_extension

__all__ = ['bias_gelu', 'bias_gelu_ref', 'kernel_available', 'kernel_runs']

_KERNEL = try_import_extension(f'{__package__}._triton_bias_gelu')  # None without Triton (CPU-only torch installs)


def kernel_available() -> bool:
    """Whether the Triton kernel can run (Triton importable; the tensors must also be on a CUDA device)."""
    return _KERNEL is not None


def bias_gelu_ref(h: Tensor, bias: Tensor) -> Tensor:
    """The plain composition: see :func:`bias_gelu`."""
    return F.gelu(h + bias.to(h.dtype)[:, None, None])


class _BiasGelu(torch.autograd.Function):
    """The kernel's forward and backward; saves h and the bias (the sum and the GELU are recomputed)."""

    @staticmethod
    def forward(ctx, h: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(h, bias)
        return _KERNEL.forward(h.flatten(2), bias).view(h.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, bias = ctx.saved_tensors
        dh, db = _KERNEL.backward(grad.contiguous().flatten(2), h.flatten(2), bias)
        return dh.view(h.shape), db.to(bias.dtype)


def kernel_runs(h: Tensor, backend: str = 'auto') -> bool:
    """Whether :func:`bias_gelu` of ``h`` runs the kernel: the switch on, the backend allows it, a CUDA tensor in
    float32/bfloat16/float16, not compiling or tracing. (Callers that fold a bias into the GELU only where the kernel
    runs ask this with the map the GELU will see, or one of the same device, dtype and layout.)"""
    return triton_kernel_runs('bias_gelu', _KERNEL, h, backend)


def bias_gelu(h: Tensor, bias: Tensor, *, backend: str = 'auto') -> Tensor:
    """``F.gelu(h + bias[:, None, None])``, the bias cast to h's dtype.

    Args:
        h: (B, C, H, W).
        bias: (C,).
        backend: one of :data:`~vssm.ops.BACKENDS`; ``'auto'`` and ``'cuda'`` run the Triton kernel on CUDA tensors
            (:func:`kernel_runs`) unless ``VSSM_TRITON_FUSIONS=0``; the reference otherwise.

    Returns:
        (B, C, H, W) in h's dtype (contiguous from the kernel).
    """
    if h.dim() != 4 or bias is None or bias.shape != (h.shape[1], ):
        raise ValueError(f'bias_gelu: expected h (B, C, H, W) and bias (C,), got {tuple(h.shape)}, '
                         f'{None if bias is None else tuple(bias.shape)}.')
    if not kernel_runs(h, backend) or h.numel() == 0:
        return bias_gelu_ref(h, bias)
    return _BiasGelu.apply(h.contiguous(), bias.contiguous())
