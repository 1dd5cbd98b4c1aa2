"""The one naive oracle of each op: its definition as plain loops, in the inputs' dtype (tests pass float64).

* :func:`naive_scan`: the selective scan one time step at a time (the recurrence in the module docstring of
  ``vssm.ops.selective_scan``).
* :func:`naive_dwconv`: a depthwise convolution as an explicit sum over its taps, on a padded copy.
* :func:`naive_state_fusion`: Spatial-Mamba's state fusion, the alpha-weighted sum of three dilated 3x3 depthwise
  convolutions (dilations 1, 3 and 5, as upstream), each a :func:`naive_dwconv`.

Nothing here calls the ops under test, so the ops' tests and the property-based fuzzing compare against code that
shares none of their tricks (log-depth scans, merged kernels, hand-written backwards). Autograd through these loops
gives the reference gradients.

Shape legend: Bt batch, D channels, N state size, L length, G groups of B/C, C channels of a feature map.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

STATE_FUSION_DILATIONS = (1, 3, 5)  # kernel_3, kernel_3_1, kernel_3_2


def naive_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Optional[Tensor] = None, D: Optional[Tensor] = None,
               delta_bias: Optional[Tensor] = None, delta_softplus: bool = True) -> Tensor:
    """Selective scan, one step at a time: all states (Bt, D, N, L) without C, else the outputs (Bt, D, L).

    Args:
        u, delta: (Bt, D, L).
        A: (D, N), or (L, Bt, D, N) given per step and batch element, so that autograd returns every term of A's
            gradient separately (the fuzzing bounds its error by their magnitudes).
        B, C: (Bt, G, N, L), or (Bt, N, L) for one group shared by all channels.
        D, delta_bias: (D, ).

    The sequences are split once with ``unbind``: indexing ``[..., t]`` at every step would make autograd build a
    full-size gradient per step, quadratic in L.
    """
    B = B.unsqueeze(1) if B.dim() == 3 else B  # (Bt, G, N, L)
    C = C.unsqueeze(1) if C is not None and C.dim() == 3 else C
    bt, d, length = u.shape
    group = torch.arange(d) // (d // B.shape[1])  # the B/C group of each channel
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    dt = F.softplus(delta, threshold=20) if delta_softplus else delta
    a_steps = A.unbind(0) if A.dim() == 4 else [A] * length  # L x (Bt, D, N) or (D, N)
    b_steps = B[:, group].unbind(-1)  # L x (Bt, D, N)
    c_steps = None if C is None else C[:, group].unbind(-1)
    h = u.new_zeros(bt, d, A.shape[-1])
    outs = []
    for t, (u_t, dt_t) in enumerate(zip(u.unbind(-1), dt.unbind(-1))):
        h = torch.exp(dt_t[..., None] * a_steps[t]) * h + (dt_t * u_t)[..., None] * b_steps[t]
        if C is None:
            outs.append(h)
        else:
            y = (h * c_steps[t]).sum(-1)
            outs.append(y if D is None else y + D * u_t)
    return torch.stack(outs, -1)


def naive_dwconv(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int, padding_mode: str) -> Tensor:
    """Depthwise convolution with 'same' output size: x (B, C, H, W), weight (C, 1, k, k) with k odd, bias (C, ) or
    None; ``padding_mode`` 'zeros' or 'replicate'. Each output is the sum of its k * k taps on a padded copy."""
    k = weight.shape[-1]
    pad = dilation * (k // 2)
    xp = F.pad(x, (pad, ) * 4, mode='replicate' if padding_mode == 'replicate' else 'constant')
    height, width = x.shape[-2:]
    out = torch.zeros_like(x)
    for i in range(k):
        for j in range(k):
            patch = xp[..., i * dilation:i * dilation + height, j * dilation:j * dilation + width]
            out = out + patch * weight[:, 0, i, j][None, :, None, None]
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out


def naive_state_fusion(h: Tensor, kernel_3: Tensor, kernel_3_1: Tensor, kernel_3_2: Tensor, alpha: Tensor,
                       padding_mode: str = 'replicate') -> Tensor:
    """Spatial-Mamba's state fusion of h (B, C, H, W): sum_i alpha_i * dwconv(h, kernel_i, dilation_i), with the
    3x3 kernels (C, 1, 3, 3) at dilations 1, 3, 5 and alpha (3, )."""
    kernels = (kernel_3, kernel_3_1, kernel_3_2)
    return sum(alpha[i] * naive_dwconv(h, kernel, None, dilation, padding_mode)
               for i, (dilation, kernel) in enumerate(zip(STATE_FUSION_DILATIONS, kernels)))
