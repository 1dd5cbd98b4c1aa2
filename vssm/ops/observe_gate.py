"""Spatial-Mamba's observation, output norm and gate as one op::

    y   = fused * C + D * u            (B, D, L): the fused states observed, plus the skip term
    out = LayerNorm(y) * SiLU(z)       (B, H, W, D): over the channels of each pixel, gated; out_proj's input

The reference is the plain composition (an ``addcmul``, a transpose to channels-last with a cast to z's dtype, the
norm, the gate): five passes over (B, D, L) maps, some in float32. The Triton kernel reads fused, u and z once and
writes out once (in z's dtype), and its backward recomputes y, the norm and the gate from the inputs it saves (fused,
C, u, z; the (B, L) statistics), so nothing of the norm or the gate is kept for the backward. It runs
on CUDA tensors unless ``VSSM_TRITON_FUSIONS=0`` (see :func:`~vssm.ops._backend.triton_fusions_enabled`).

Shape legend: B batch, D channels, H/W height/width, L = H*W; one state per channel (N = 1) and one group of C.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import check_backend_name, plain_autograd_enabled, triton_fusions_enabled, try_import_extension

__all__ = ['observe_gate', 'observe_gate_ref', 'kernel_available']

_KERNEL = try_import_extension(f'{__package__}._triton_observe_gate')  # None without Triton (CPU-only torch installs)


def kernel_available() -> bool:
    """Whether the Triton kernel can run (Triton importable; the tensors must also be on a CUDA device)."""
    return _KERNEL is not None


def observe_gate_ref(fused: Tensor, C: Tensor, Ds: Tensor, u: Tensor, z: Tensor, weight: Tensor, bias: Tensor,
                     eps: float) -> Tensor:
    """The plain composition: see :func:`observe_gate`."""
    b, h, w, d = z.shape
    # Ds (fp32) * u promotes to fp32 without saving an fp32 copy of u for the backward.
    y = torch.addcmul(Ds.float()[:, None] * u, fused, C.float())  # (B, D, L) float32
    y = y.transpose(1, 2).reshape(b, h, w, d).to(z.dtype)
    return F.layer_norm(y, (d, ), weight, bias, eps) * F.silu(z)


class _ObserveGate(torch.autograd.Function):

    @staticmethod
    def forward(ctx, fused, C, Ds, u, z, weight, bias, eps):
        b, h, w, d = z.shape
        z_flat = z.view(b, h * w, d) if z.stride(1) == w * z.stride(2) else z.reshape(b, h * w, d)
        out, mean, rstd = _KERNEL.forward(fused, C, u, Ds, z_flat, weight, bias, eps)
        ctx.save_for_backward(fused, C, Ds, u, z_flat, weight, bias, mean, rstd)
        ctx.z_shape = z.shape
        return out.view(b, h, w, d)

    @staticmethod
    def backward(ctx, grad):
        fused, C, Ds, u, z_flat, weight, bias, mean, rstd = ctx.saved_tensors
        b, h, w, d = ctx.z_shape
        dfused, dc, du, dz, dds, dw, db = _KERNEL.backward(grad.contiguous().view(b, h * w, d), fused, C, u, Ds,
                                                           z_flat, weight, bias, mean, rstd)
        return (dfused, dc.to(C.dtype), dds.to(Ds.dtype), du, dz.view(b, h, w, d), dw.to(weight.dtype),
                db.to(bias.dtype), None)


def _use_kernel(backend: str, fused: Tensor) -> bool:
    check_backend_name(backend)
    if backend == 'torch' or plain_autograd_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False  # under torch.compile inductor fuses the reference itself
    return _KERNEL is not None and fused.is_cuda and triton_fusions_enabled()


def observe_gate(fused: Tensor, C: Tensor, Ds: Tensor, u: Tensor, z: Tensor, weight: Tensor, bias: Tensor,
                 eps: float = 1e-5, *, backend: str = 'auto') -> Tensor:
    """``LayerNorm(fused * C + Ds * u) * SiLU(z)``, channels-last.

    Args:
        fused: (B, D, L) float32, the fused states (one per channel).
        C: (B, 1, L), the observation (one group, N = 1).
        Ds: (D,), the skip weights.
        u: (B, D, L), the scan's input.
        z: (B, H, W, D), the gate branch (L = H * W; a channels-last view such as a chunk of in_proj's output).
        weight, bias: (D,), the norm's affine parameters; ``eps`` its epsilon.
        backend: ``'torch'`` for the reference; otherwise the Triton kernel where it may run (module docstring).

    Returns:
        (B, H, W, D): the reference's dtype (float32 under autocast), or z's dtype from the kernel (the same values:
        the float32 result rounded once, as the projection that follows would).
    """
    b, d, length = fused.shape
    if z.dim() != 4 or z.shape[0] != b or z.shape[3] != d or z.shape[1] * z.shape[2] != length:
        raise ValueError(f'observe_gate: z must be (B, H, W, D) with B, D, H * W of fused (B, D, L) = '
                         f'{tuple(fused.shape)}, got {tuple(z.shape)}.')
    if C.shape != (b, 1, length) or u.shape != fused.shape or Ds.shape != (d, ):
        raise ValueError(f'observe_gate: expected C (B, 1, L), u (B, D, L), Ds (D,) for fused {tuple(fused.shape)}, '
                         f'got {tuple(C.shape)}, {tuple(u.shape)}, {tuple(Ds.shape)}.')
    if not _use_kernel(backend, fused) or z.stride(-1) != 1:
        return observe_gate_ref(fused, C, Ds, u, z, weight, bias, eps)
    C = C if C.stride(-1) == 1 else C.contiguous()
    return _ObserveGate.apply(fused.contiguous(), C, Ds, u.contiguous(), z, weight, bias, float(eps))

