"""Channel-first layers of the VMamba-based families: LayerNorm over C of an NCHW map, and a 1x1 conv whose
weight is stored 2-D ``(out, in)`` like ``nn.Linear`` (upstream's ``LayerNorm2d`` and ``Linear2d``)."""
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

    def project(self, y: Tensor, fc: nn.Linear, dtype: torch.dtype) -> Tensor:
        """``fc(self(y).to(dtype))`` with ``fc`` a ``Linear2d``, saving only ``y`` for the backward (the normalized
        map is recomputed there): the SS2D output projection."""
        shape, eps = self.normalized_shape, self.eps
        return recomputed_linear(lambda t, w, b: layer_norm_2d(t, shape, w, b, eps).to(dtype), fc, y, self.weight,
                                 self.bias, channels_first=True)


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
