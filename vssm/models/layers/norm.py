"""Channel-first layers of the VMamba-based families: LayerNorm over C of an NCHW map, and a 1x1 conv whose
weight is stored 2-D ``(out, in)`` like ``nn.Linear`` (upstream's ``LayerNorm2d`` and ``Linear2d``), and
``normed_linear``: a linear layer of a LayerNorm's output that recomputes the norm in the backward."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import layer_norm_2d
from .recompute import linear, linear_2d, recomputed_linear


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, H, W) map (:func:`vssm.ops.layer_norm_2d`).

    ``backend`` picks the op's implementation (the backbones set their ``ops_backend``): under ``'auto'`` and
    ``'cuda'`` the Triton kernel on CUDA tensors where it is faster (:func:`vssm.ops.layer_norm_2d`), unless
    ``VSSM_TRITON_FUSIONS=0``."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, backend: str = 'auto') -> None:
        super().__init__(normalized_shape, eps=eps)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm_2d(x, self.weight, self.bias, self.eps, backend=self.backend)


def normed_linear(x: Tensor, norm: Optional[nn.LayerNorm], fc: nn.Linear, dtype: Optional[torch.dtype] = None,
                  with_bias: bool = True) -> Tensor:
    """``fc(norm(x).to(dtype))`` saving only ``x`` for the backward (the norm runs again there); ``fc(x)`` when
    ``norm`` is None. A ``LayerNorm2d`` takes (B, C, H, W) maps and ``fc`` is then a ``Linear2d``; an
    ``nn.LayerNorm`` takes channels-last inputs and an ``nn.Linear``. ``dtype``: cast of the normalized input.
    ``with_bias``: False leaves out ``fc``'s bias (for a caller that adds it in its next pass)."""
    if norm is None:
        return linear(x, fc, isinstance(fc, Linear2d), with_bias)
    shape, eps, channels_first = norm.normalized_shape, norm.eps, isinstance(norm, LayerNorm2d)
    backend = norm.backend if channels_first else 'auto'

    def normalize(t: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        if not channels_first:
            # ATen's LayerNorm over rows of channels: faster in Spatial-Mamba-T than vssm.ops.layer_norm_last's
            # kernel on an H100 (kernels/README.md)
            t = F.layer_norm(t, shape, weight, bias, eps)
            return t if dtype is None else t.to(dtype)
        # Written directly in the dtype the projection runs in (autocast's, when on): one pass, same values.
        device = t.device.type
        out_dtype = dtype or (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        return layer_norm_2d(t, weight, bias, eps, out_dtype, backend=backend)

    return recomputed_linear(normalize, fc, x, norm.weight, norm.bias, channels_first=channels_first,
                             with_bias=with_bias)


class Linear2d(nn.Linear):
    """A 1x1 convolution of (B, C, H, W) maps with an ``nn.Linear`` weight (out, in); the model-wide Linear init
    applies to it. 4-D ``(out, in, 1, 1)`` weights in a checkpoint are accepted too."""

    def forward(self, x: Tensor) -> Tensor:
        return linear_2d(x, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + 'weight'
        if key in state_dict and state_dict[key].dim() == 4:
            state_dict[key] = state_dict[key].flatten(1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
