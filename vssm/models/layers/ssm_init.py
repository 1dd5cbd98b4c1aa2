"""Initialisation of the selective-scan parameters, the recipe all three upstream families share.

* ``dt_projs_weight``: uniform in [-R^-0.5, R^-0.5] (R = dt_rank).
* ``dt_projs_bias``: inverse softplus of dt, dt = exp(U[log dt_min, log dt_max]) clamped at dt_floor.
* ``A_logs``: log(1..N) for every channel, so A = -(1..N).
* ``Ds``: ones.
* ``x_proj_weight``: PyTorch's default ``nn.Linear`` init (kaiming-uniform, bound 1/sqrt(fan_in)).
* Every ``nn.Linear``: trunc_normal(std 0.02), zero bias; every LayerNorm: weight 1, bias 0.
"""
import math

import torch
from torch import nn


@torch.no_grad()
def init_dt_weight(weight: torch.Tensor, dt_rank: int) -> torch.Tensor:
    """Uniform in [-R^-0.5, R^-0.5] for a (..., D, R) weight."""
    bound = dt_rank**-0.5
    return weight.uniform_(-bound, bound)


@torch.no_grad()
def init_dt_bias(bias: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_floor: float = 1e-4) -> torch.Tensor:
    """Inverse softplus of a log-uniform dt, so that softplus(bias) starts in [dt_min, dt_max]."""
    dt = torch.exp(torch.rand_like(bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    return bias.copy_(dt + torch.log(-torch.expm1(-dt)))


@torch.no_grad()
def init_A_logs(A_logs: torch.Tensor) -> torch.Tensor:
    """log(1..N) along the last dim of a (channels, N) tensor."""
    n = A_logs.shape[-1]
    return A_logs.copy_(torch.log(torch.arange(1, n + 1, dtype=A_logs.dtype)).expand_as(A_logs))


@torch.no_grad()
def init_Ds(Ds: torch.Tensor) -> torch.Tensor:
    return Ds.fill_(1.0)


@torch.no_grad()
def init_x_proj_weight(weight: torch.Tensor) -> torch.Tensor:
    """What ``nn.Linear`` does to its weight: uniform in +-1/sqrt(fan_in), fan_in = last dim."""
    bound = 1.0 / math.sqrt(weight.shape[-1])
    return weight.uniform_(-bound, bound)


def trunc_normal_linear_init(module: nn.Module) -> None:
    """Model-wide init applied with ``model.apply``: Linear trunc_normal(0.02), LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
