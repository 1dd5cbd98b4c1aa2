"""Channel-first layers of the VMamba-based families: LayerNorm over C of an NCHW map, and a 1x1 conv whose
weight is stored 2-D ``(out, in)`` like ``nn.Linear`` (upstream's ``LayerNorm2d`` and ``Linear2d``), and
``normed_linear``: a linear layer of a LayerNorm's output that recomputes the norm in the backward."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .recompute import recomputed_linear


def layer_norm_2d(x: Tensor, normalized_shape, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the channel axis of a (B, C, H, W) map (functional form of :class:`LayerNorm2d`)."""
    x = F.layer_norm(x.permute(0, 2, 3, 1), normalized_shape, weight, bias, eps)  # over C of (B, H, W, C)
    return x.permute(0, 3, 1, 2)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, H, W) map."""

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm_2d(x, self.normalized_shape, self.weight, self.bias, self.eps)


def normed_linear(x: Tensor, norm: Optional[nn.LayerNorm], fc: nn.Linear,
                  dtype: Optional[torch.dtype] = None) -> Tensor:
    """``fc(norm(x).to(dtype))`` saving only ``x`` for the backward (the norm runs again there); ``fc(x)`` when
    ``norm`` is None. A ``LayerNorm2d`` takes (B, C, H, W) maps and ``fc`` is then a ``Linear2d``; an
    ``nn.LayerNorm`` takes channels-last inputs and an ``nn.Linear``. ``dtype``: cast of the normalized input."""
    if norm is None:
        return fc(x)
    shape, eps = norm.normalized_shape, norm.eps
    channels_first = isinstance(norm, LayerNorm2d)
    layer_norm = layer_norm_2d if channels_first else F.layer_norm

    def normalize(t: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        t = layer_norm(t, shape, weight, bias, eps)
        return t if dtype is None else t.to(dtype)

    return recomputed_linear(normalize, fc, x, norm.weight, norm.bias, channels_first=channels_first)


class Linear2d(nn.Linear):
    """A 1x1 convolution of (B, C, H, W) maps with an ``nn.Linear`` weight (out, in); the model-wide Linear init
    applies to it. 4-D ``(out, in, 1, 1)`` weights in a checkpoint are accepted too."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + 'weight'
        if key in state_dict and state_dict[key].dim() == 4:
            state_dict[key] = state_dict[key].flatten(1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
