"""Depthwise 2-D convolution with large or dilated kernels, and Spatial-Mamba's state fusion.

``dwconv2d`` is a stride-1 depthwise convolution with an odd kernel, a dilation, an optional bias and
"same" padding with zeros or by replicating the border. ``state_fusion`` is Spatial-Mamba's
structure-aware state fusion: three 3x3 depthwise convolutions with dilations 1, 3 and 5 over the
hidden states, weighted by ``alpha`` and summed::

    out = alpha0 * dw(h, k3, dil=1) + alpha1 * dw(h, k3_1, dil=3) + alpha2 * dw(h, k3_2, dil=5)

Training upstream pads each branch by replicating the border; its eval path merges the branches
into one 11x11 kernel applied with zero padding. Both are linear, so the merged kernel gives the
same function as the branches whenever the padding is the same: ``padding_mode`` picks it here,
for training and eval alike, and nothing is cached.

Shape legend: B batch, C channels, H/W height/width.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import is_cacheable, resolve_backend, try_import_extension

__all__ = ['dwconv2d', 'dwconv2d_ref', 'state_fusion', 'state_fusion_ref', 'merge_state_fusion_kernels',
           'kernel_available', 'FUSION_DILATIONS', 'KERNEL_DTYPES']

_EXT_NAME = 'vssm_dwconv2d'
_EXT = try_import_extension(_EXT_NAME)
PADDING_MODES = ('zeros', 'replicate')
FUSION_DILATIONS = (1, 3, 5)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_MAX_SIZE = 31
# The kernel convolves with groups of (kernel size, dilation, skip the centre tap): the state fusion's 25 distinct taps
# are a dense 3x3 plus the 8 outer taps of the 3x3 kernels dilated by 3 and by 5.
_FUSION_GROUPS = tuple((3, dil, i > 0) for i, dil in enumerate(FUSION_DILATIONS))


def kernel_available() -> bool:
    """Whether the compiled ``vssm_dwconv2d`` extension is installed."""
    return _EXT is not None


def _check_padding_mode(padding_mode: str) -> None:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f'Unknown padding_mode {padding_mode!r}: use one of {PADDING_MODES}.')


def _pad(x: Tensor, pad: int, padding_mode: str) -> Tensor:
    if pad == 0:
        return x
    if padding_mode == 'replicate':
        return F.pad(x, (pad, pad, pad, pad), mode='replicate')
    return F.pad(x, (pad, pad, pad, pad))


def _check_dw(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int) -> None:
    if x.dim() != 4:
        raise ValueError(f'dwconv2d: x must be (B, C, H, W), got shape {tuple(x.shape)}.')
    c = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f'dwconv2d: weight must be (C, 1, k, k) with C={c}, got {tuple(weight.shape)}.')
    if weight.shape[-1] % 2 == 0:
        raise ValueError(f'dwconv2d: the kernel size must be odd for "same" padding, got {weight.shape[-1]}.')
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f'dwconv2d: bias must be ({c},), got {tuple(bias.shape)}.')
    if dilation < 1:
        raise ValueError(f'dwconv2d: dilation must be >= 1, got {dilation}.')


def dwconv2d_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, dilation: int = 1,
                 padding_mode: str = 'zeros') -> Tensor:
    """Reference depthwise conv (``F.conv2d`` with ``groups=C``); arguments as :func:`dwconv2d`."""
    _check_padding_mode(padding_mode)
    _check_dw(x, weight, bias, dilation)
    pad = dilation * (weight.shape[-1] // 2)
    weight = weight.to(x.dtype)  # as the kernel: fp16/bf16 inputs with fp32 parameters (outside autocast)
    bias = None if bias is None else bias.to(x.dtype)
    if padding_mode == 'replicate':
        return F.conv2d(_pad(x, pad, 'replicate'), weight, bias, dilation=dilation, groups=x.shape[1])
    return F.conv2d(x, weight, bias, padding=pad, dilation=dilation, groups=x.shape[1])


def _register_kernel_ops() -> None:
    """Fake implementations and autograd for the operators of the compiled extension (torch.library)."""
    lib = _EXT_NAME

    @torch.library.register_fake(f'{lib}::fwd')
    def _fwd_fake(x, weight, bias, kernel_sizes, dilations, skip_center, replicate):
        return torch.empty_like(x)

    @torch.library.register_fake(f'{lib}::bwd')
    def _bwd_fake(dout, x, weight, kernel_sizes, dilations, skip_center, replicate, need_bias_grad):
        return (torch.empty_like(x), torch.empty_like(weight),
                weight.new_empty((x.shape[1], ) if need_bias_grad else (0, )))

    def setup_context(ctx, inputs, output):
        x, weight, bias, kernel_sizes, dilations, skip_center, replicate = inputs
        ctx.taps = (kernel_sizes, dilations, skip_center, replicate)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)

    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        dx, dweight, dbias = torch.ops.vssm_dwconv2d.bwd(dout.contiguous(), x, weight, *ctx.taps, ctx.has_bias)
        return dx, dweight, dbias if ctx.has_bias else None, None, None, None, None

    torch.library.register_autograd(f'{lib}::fwd', backward, setup_context=setup_context)


if _EXT is not None:
    _register_kernel_ops()


def _tap_conv_cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor], groups, replicate: bool) -> Tensor:
    """The kernel path: x (B, C, H, W) in its dtype, weight (C, taps) and bias in float32."""
    kernel_sizes, dilations, skip_center = (list(v) for v in zip(*groups))
    return torch.ops.vssm_dwconv2d.fwd(x.contiguous(), weight.float().contiguous(),
                                       None if bias is None else bias.float().contiguous(), kernel_sizes, dilations,
                                       skip_center, replicate)


def _use_kernel(backend: str, x: Tensor, ksize: int, what: str) -> bool:
    """Whether this call runs on the kernel; unsupported inputs go to the reference unless 'cuda' was demanded."""
    if resolve_backend(backend, _EXT, _EXT_NAME, 'dwconv2d', x) != 'cuda':
        return False
    if x.dtype in KERNEL_DTYPES and ksize <= KERNEL_MAX_SIZE:
        return True
    if backend == 'cuda':
        raise ValueError(f'{what}: the CUDA kernel takes {KERNEL_DTYPES} and kernel sizes up to {KERNEL_MAX_SIZE}, '
                         f"got {x.dtype} and {ksize}; use backend='torch' (or 'auto').")
    return False


def dwconv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, dilation: int = 1,
             padding_mode: str = 'zeros', backend: str = 'auto') -> Tensor:
    """Depthwise conv, stride 1, "same" output size.

    Args:
        x: input, (B, C, H, W).
        weight: (C, 1, k, k), k odd.
        bias: (C,) or ``None``.
        dilation: spacing between kernel taps.
        padding_mode: ``'zeros'`` or ``'replicate'`` (border values repeated).
        backend: ``'auto'``, ``'torch'`` or ``'cuda'``.

    Returns:
        (B, C, H, W), the dtype of ``x``.
    """
    _check_padding_mode(padding_mode)
    _check_dw(x, weight, bias, dilation)
    ksize = weight.shape[-1]
    if _use_kernel(backend, x, ksize, 'dwconv2d'):
        return _tap_conv_cuda(x, weight.reshape(weight.shape[0], -1), bias, ((ksize, dilation, False), ),
                              padding_mode == 'replicate')
    return dwconv2d_ref(x, weight, bias, dilation, padding_mode)


def _check_fusion(h: Tensor, kernels, alpha: Tensor) -> None:
    if h.dim() != 4:
        raise ValueError(f'state_fusion: h must be (B, C, H, W), got shape {tuple(h.shape)}.')
    for i, k in enumerate(kernels):
        if tuple(k.shape) != (h.shape[1], 1, 3, 3):
            raise ValueError(f'state_fusion: kernel {i} must be ({h.shape[1]}, 1, 3, 3), got {tuple(k.shape)}.')
    if tuple(alpha.shape) != (3,):
        raise ValueError(f'state_fusion: alpha must be (3,), got {tuple(alpha.shape)}.')


def state_fusion_ref(h: Tensor, kernel_3: Tensor, kernel_3_1: Tensor, kernel_3_2: Tensor, alpha: Tensor,
                     padding_mode: str = 'replicate') -> Tensor:
    """Reference state fusion: pad once by 5, then three dilated 3x3 depthwise convs on windows of it."""
    _check_padding_mode(padding_mode)
    kernels = (kernel_3, kernel_3_1, kernel_3_2)
    _check_fusion(h, kernels, alpha)
    reach = max(FUSION_DILATIONS)
    hp = _pad(h, reach, padding_mode)  # (B, C, H + 10, W + 10)
    height, width = h.shape[-2:]
    out = None
    for i, (dil, k) in enumerate(zip(FUSION_DILATIONS, kernels)):
        start = reach - dil
        window = hp[..., start:start + height + 2 * dil, start:start + width + 2 * dil]
        branch = F.conv2d(window, k.to(h.dtype), dilation=dil, groups=h.shape[1]) * alpha[i].to(h.dtype)
        out = branch if out is None else out + branch
    return out


def state_fusion(h: Tensor, kernel_3: Tensor, kernel_3_1: Tensor, kernel_3_2: Tensor, alpha: Tensor, *,
                 padding_mode: str = 'replicate', backend: str = 'auto') -> Tensor:
    """Spatial-Mamba's structure-aware state fusion (same function in training and eval).

    Args:
        h: hidden states, (B, C, H, W).
        kernel_3, kernel_3_1, kernel_3_2: (C, 1, 3, 3) kernels of the dilation-1, 3 and 5 branches.
        alpha: (3,) branch weights.
        padding_mode: ``'replicate'`` (upstream training, our default everywhere) or ``'zeros'``
            (upstream's merged-kernel eval path, for parity with its published accuracies).
        backend: ``'auto'``, ``'torch'`` or ``'cuda'``.

    Returns:
        (B, C, H, W), the dtype of ``h``.
    """
    _check_padding_mode(padding_mode)
    _check_fusion(h, (kernel_3, kernel_3_1, kernel_3_2), alpha)
    if _use_kernel(backend, h, 3, 'state_fusion'):
        weight = _fusion_tap_weights(kernel_3, kernel_3_1, kernel_3_2, alpha)
        return _tap_conv_cuda(h, weight, None, _FUSION_GROUPS, padding_mode == 'replicate')
    return state_fusion_ref(h, kernel_3, kernel_3_1, kernel_3_2, alpha, padding_mode)


_FUSION_MAPS = {}  # device -> (27, 25) float32 map of _fusion_tap_weights


def _fusion_tap_map(device: torch.device) -> Tensor:
    """(27, 25) 0/1 matrix: row 9 * branch + tap (the 3x3 taps row-major) -> the kernel's tap (the dense 3x3 first, its
    centre shared by the three branches, then the 8 outer taps of the dilation-3 and dilation-5 kernels). Cached per
    device (not for the fake tensors of tracers and meta devices)."""
    device = torch.device(device)
    found = _FUSION_MAPS.get(device)
    if found is not None:
        return found
    target = [t if b == 0 or t == 4 else 9 + 8 * (b - 1) + t - (t > 4) for b in range(3) for t in range(9)]
    rows = torch.zeros(27, 25)
    rows[torch.arange(27), torch.tensor(target)] = 1
    found = rows.to(device)
    if is_cacheable(found):
        _FUSION_MAPS[device] = found
    return found


def _fusion_tap_weights(kernel_3: Tensor, kernel_3_1: Tensor, kernel_3_2: Tensor, alpha: Tensor) -> Tensor:
    """The 25 distinct tap weights per channel, (C, 25), in the kernel's order (differentiable, float32).

    Few ops, forward and backward: the op's kernels are fast enough that the host time of this preparation is what
    the op's calls take at small shapes. One product with a constant 0/1 map and a sum (elementwise, so autocast keeps
    float32; deterministic) instead of slices and a cat (whose backward zero-filled and copied once per slice: ~35
    kernels per call).
    """
    c = kernel_3.shape[0]
    k = torch.stack([kernel_3, kernel_3_1, kernel_3_2], dim=1).float().reshape(c, 3, 9) * alpha.float()[None, :, None]
    return (k.reshape(c, 27, 1) * _fusion_tap_map(k.device)).sum(1)


def merge_state_fusion_kernels(kernel_3: Tensor, kernel_3_1: Tensor, kernel_3_2: Tensor, alpha: Tensor) -> Tensor:
    """The equivalent 11x11 depthwise kernel, (C, 1, 11, 11), as upstream builds it for eval.

    Applying it with 5 pixels of padding equals :func:`state_fusion` with the same padding mode.
    """
    c = kernel_3.shape[0]
    merged = kernel_3.new_zeros(c, 1, 11, 11)
    centre = 2 * max(FUSION_DILATIONS) // 2
    for i, (dil, k) in enumerate(zip(FUSION_DILATIONS, (kernel_3, kernel_3_1, kernel_3_2))):
        taps = torch.arange(-1, 2, device=k.device) * dil + centre
        merged[:, :, taps[:, None], taps[None, :]] += alpha[i] * k
    return merged
