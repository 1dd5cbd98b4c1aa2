"""Spatial-Mamba: structure-aware state fusion over a unidirectional selective scan.

Paper: "Spatial-Mamba: Effective Visual State Space Models via Structure-aware State Fusion",
C. Xiao, M. Li, Z. Zhang, D. Meng, L. Zhang, arXiv 2410.15091 (ICLR 2025).
Design re-implemented from https://github.com/EdwardChasel/Spatial-Mamba (Apache-2.0) @ 71221eb;
module and parameter names follow it so that its checkpoints load unchanged (see
``tools/model_converters/spatial_mamba_to_vssm.py``).

Differences from upstream, all deliberate:

* State fusion computes the same function in training and eval (three dilated 3x3 depthwise convs
  on replicate-padded states) and caches nothing, so eval never uses a stale merged kernel.
  ``eval_fusion_padding='zeros'`` reproduces upstream's eval path (its merged 11x11 kernel with
  zero padding), which is what its published accuracies were measured with.
* Runs on CPU (pure-PyTorch reference ops) and dispatches to the CUDA kernels when they are built.
* One backbone class serves classification, detection and segmentation (``out_indices``).

Shape legend: B batch, C block width, H/W height/width, L = H*W, D inner width (2C), N state size (1),
R dt_rank.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks import DropPath
from mmpretrain.registry import MODELS
from torch import Tensor, nn

from ..ops import observe_gate, selective_scan_low_rank, state_fusion
from .layers import (
    StagedBackbone,
    gelu_linear,
    init_A_logs,
    init_Ds,
    init_dt_bias,
    init_dt_weight,
    init_x_proj_weight,
    normed_linear,
    parse_arch,
    recompute_enabled,
    to_classifier_keys,
    trunc_normal_linear_init,
    unwrap_state_dict,
)

__all__ = ['SpatialMamba', 'convert_upstream_state_dict']


class ConvNormAct(nn.Module):
    """Conv2d, then an optional BatchNorm2d and an optional ReLU (keys ``conv.*``, ``norm.*``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = False, norm: bool = True, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups,
                              bias=bias)
        self.norm = nn.BatchNorm2d(out_channels) if norm else None
        self.act = nn.ReLU(inplace=True) if act else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class StemLayer(nn.Module):
    """Stride-4 convolutional stem: (B, 3, H, W) -> channels-last (B, H/4, W/4, C)."""

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        half = embed_dim // 2
        self.conv1 = ConvNormAct(in_channels, half, 3, stride=2)
        self.conv2 = nn.Sequential(ConvNormAct(half, half, 3), ConvNormAct(half, half, 3, act=False))
        self.conv3 = nn.Sequential(ConvNormAct(half, 4 * embed_dim, 3, stride=2),
                                   ConvNormAct(4 * embed_dim, embed_dim, 1, act=False))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = x + self.conv2(x)
        x = self.conv3(x)
        # Channels-last in memory, not only in shape: the blocks' LayerNorms and Linears then read it without a
        # copy, their residual adds are vectorized, and cuDNN's NHWC depthwise kernels take the cpe convs (a
        # permuted NCHW map went through a copy before every LayerNorm and a strided add after every branch).
        return x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)


class Downsample(nn.Module):
    """Inverted-bottleneck stride-2 downsampling C -> 2C, channels-last in and out."""

    def __init__(self, dim: int, out_dim: int, expansion: int = 8) -> None:
        super().__init__()
        hidden = expansion * dim
        self.conv = nn.Sequential(
            ConvNormAct(dim, hidden, 1, bias=True, norm=False),
            ConvNormAct(hidden, hidden, 3, stride=2, groups=hidden, bias=True, norm=False),
            ConvNormAct(hidden, out_dim, 1, bias=True, act=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()  # a no-op copy for NHWC convs


class StateFusion(nn.Module):
    """Structure-aware state fusion: three dilated (1, 3, 5) 3x3 depthwise convs, weighted by alpha.

    Training and eval compute the same function (``padding`` is replicate in training); nothing is
    cached. ``eval_padding='zeros'`` reproduces upstream's eval path (merged 11x11 kernel with zero
    padding) for parity with its published accuracies.
    """

    def __init__(self, dim: int, eval_padding: str = 'replicate', backend: str = 'auto') -> None:
        super().__init__()
        self.kernel_3 = nn.Parameter(torch.ones(dim, 1, 3, 3))
        self.kernel_3_1 = nn.Parameter(torch.ones(dim, 1, 3, 3))
        self.kernel_3_2 = nn.Parameter(torch.ones(dim, 1, 3, 3))
        self.alpha = nn.Parameter(torch.ones(3))
        self.eval_padding = eval_padding
        self.backend = backend

    def forward(self, h: Tensor) -> Tensor:
        padding = 'replicate' if self.training else self.eval_padding
        return state_fusion(h, self.kernel_3, self.kernel_3_1, self.kernel_3_2, self.alpha, padding_mode=padding,
                            backend=self.backend)


class StructureAwareSSM(nn.Module):
    """The SSM mixer of a Spatial-Mamba block (upstream key prefix ``self_attention``).

    in_proj -> (x, z); x: depthwise 3x3 + SiLU -> raster scan returning the states h -> state fusion
    -> y = h * C + D * u -> LayerNorm -> y * SiLU(z) -> out_proj.
    """

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 2.0, dt_rank: Union[int, str] = 'auto',
                 eval_fusion_padding: str = 'replicate', backend: str = 'auto') -> None:
        super().__init__()
        d_inner = int(ssm_ratio * dim)
        self.dt_rank = math.ceil(dim / 16) if dt_rank == 'auto' else int(dt_rank)
        self.d_state = d_state
        self.backend = backend
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=True)
        self.act = nn.SiLU()
        self.x_proj_weight = nn.Parameter(torch.empty(self.dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(d_inner))
        self.A_logs = nn.Parameter(torch.empty(d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(d_inner))
        self.state_fusion = StateFusion(d_inner, eval_fusion_padding, backend)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self) -> None:
        init_x_proj_weight(self.x_proj_weight)
        init_dt_weight(self.dt_projs_weight, self.dt_rank)
        init_dt_bias(self.dt_projs_bias)
        init_A_logs(self.A_logs)
        init_Ds(self.Ds)

    def _observe_gate(self, states: Tensor, C: Tensor, u: Tensor, z: Tensor) -> Tensor:
        """out_norm(fusion(states) * C + D * u) * SiLU(z), (B, H, W, D): out_proj's input."""
        b, h, w, _ = z.shape
        fused = self.state_fusion(states.view(b, -1, h, w)).flatten(2)  # (B, D, L) float32
        norm = self.out_norm
        return observe_gate(fused, C, self.Ds, u, z, norm.weight, norm.bias, norm.eps, backend=self.backend)

    def forward(self, x: Tensor, norm: Optional[nn.LayerNorm] = None) -> Tensor:
        """x: (B, H, W, C); ``norm``: the block's LayerNorm, applied to x first (and recomputed in the backward
        instead of saving its output)."""
        b, h, w, _ = x.shape
        x, z = normed_linear(x, norm, self.in_proj).chunk(2, dim=-1)  # (B, H, W, D) each
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2)))  # (B, D, H, W)
        u = x.flatten(2).contiguous()  # (B, D, L), raster order (one copy, shared by the scan and x_proj's backward)
        # (B, R + 2N, L) as a 1x1 conv1d: its backward keeps u itself (the scan saves it too), where the einsum's bmm
        # kept a transposed copy (0.65 GiB for the T model at batch 128).
        x_dbl = F.conv1d(u, self.x_proj_weight[:, :, None])
        dt_raw, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        # the step sizes dt_proj(dt_raw) (B, D, L) as one batched GEMM (an einsum's backward was 2.7x slower,
        # docs/benchmarks.md), recomputed in the scan's backward instead of saved
        A = -torch.exp(self.A_logs.float())  # (D, N)
        states = selective_scan_low_rank(u, dt_raw[:, None], self.dt_projs_weight[None], A, B,
                                         delta_bias=self.dt_projs_bias.float(), delta_softplus=True,
                                         backend=self.backend)  # (B, D, 1, L), float32
        if recompute_enabled() and torch.is_grad_enabled() and states.requires_grad:
            # Nothing between the scan and out_proj is kept for the backward but the inputs: the fusion (one fast
            # kernel), the observation, the norm and the gate run again there (autograd would keep the fused states,
            # the fp32 norm input and output, SiLU(z) and the product: about 3.7 GiB for the T model at batch 128).
            gated = cp.checkpoint(self._observe_gate, states, C, u, z, use_reentrant=False, preserve_rng_state=False)
        else:
            gated = self._observe_gate(states, C, u, z)
        return self.out_proj(gated)


class Mlp(nn.Module):
    """Linear C -> rC, GELU, Linear rC -> C (channels-last); GELU's output is recomputed in the backward, not saved."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, norm: Optional[nn.LayerNorm] = None) -> Tensor:
        """``norm``: applied to x first (and recomputed in the backward instead of saving its output)."""
        return gelu_linear(normed_linear(x, norm, self.fc1), self.fc2)


class SpatialMambaBlock(nn.Module):
    """x + cpe1(x); x + SASSM(LN(x)); x + cpe2(x); x + MLP(LN(x)), channels-last."""

    def __init__(self, dim: int, drop_path: float, mlp_ratio: float, d_state: int, ssm_ratio: float,
                 dt_rank: Union[int, str], eval_fusion_padding: str, backend: str, with_cp: bool) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = StructureAwareSSM(dim, d_state, ssm_ratio, dt_rank, eval_fusion_padding, backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    @staticmethod
    def _cpe(conv: nn.Conv2d, x: Tensor) -> Tensor:
        return x + conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def _forward(self, x: Tensor) -> Tensor:
        x = self._cpe(self.cpe1, x)
        x = x + self.drop_path(self.self_attention(x, self.ln_1))
        x = self._cpe(self.cpe2, x)
        return x + self.drop_path(self.mlp(x, self.ln_2))

    def forward(self, x: Tensor) -> Tensor:
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class SpatialMambaStage(nn.Module):
    """Blocks of one stage, then (except for the last stage) the downsampling to the next width."""

    def __init__(self, dim: int, depth: int, out_dim: Optional[int], drop_paths: Sequence[float], **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList([SpatialMambaBlock(dim, dp, **block_kwargs) for dp in drop_paths[:depth]])
        self.downsample = Downsample(dim, out_dim) if out_dim is not None else None

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Returns (this stage's output, the input of the next stage)."""
        for block in self.blocks:
            x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


@MODELS.register_module()
class SpatialMamba(StagedBackbone):
    """Spatial-Mamba backbone (classification, detection and segmentation).

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` (or ``'t'``, ``'s'``, ``'b'``), or a dict with ``dims``
            (one width per stage, or the first stage's width) and ``depths``.
        in_channels: input image channels.
        out_indices: stages whose outputs are returned (each through its own LayerNorm ``outnorm{i}``);
            negative values count from the end.
        frozen_stages: -1 freezes nothing; k >= 0 freezes the stem and the first k stages (eval mode,
            no gradients), as mmdet's ResNet and Swin do.
        drop_path_rate: stochastic depth, linearly increasing from 0 over all blocks.
        mlp_ratio: MLP hidden width / block width.
        ssm_ratio: SSM inner width D / block width.
        d_state: SSM state size N; the state fusion works on one state per channel, so it must be 1.
        dt_rank: rank of the step-size projection, ``'auto'`` = ceil(C / 16).
        eval_fusion_padding: ``'replicate'`` (default: eval computes the training function) or
            ``'zeros'`` (upstream's merged-kernel eval path; use it with upstream checkpoints to
            reproduce the published accuracies).
        ops_backend: ``'auto'``, ``'torch'`` or ``'cuda'`` for the scan and the fusion.
        norm_eval: keep the BatchNorm layers in eval mode during training.
        with_cp: gradient checkpointing of every block (saves memory, costs a recompute).
        inference_graphs: on CUDA, replay inference (eval mode, autograd off) as one CUDA graph per input shape
            (see :class:`~vssm.models.layers.StagedBackbone`); for batch-1 detection and segmentation.
        init_cfg: mmengine init config, e.g. ``dict(type='Pretrained', checkpoint=..., prefix='backbone.')``.
    """
    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], {'dims': [64, 128, 256, 512], 'depths': [2, 4, 8, 4]}),
        **dict.fromkeys(['s', 'small'], {'dims': [64, 128, 256, 512], 'depths': [2, 4, 21, 5]}),
        **dict.fromkeys(['b', 'base'], {'dims': [96, 192, 384, 768], 'depths': [2, 4, 21, 5]}),
    }

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 out_indices: Sequence[int] = (3, ),
                 frozen_stages: int = -1,
                 drop_path_rate: float = 0.0,
                 mlp_ratio: float = 4.0,
                 ssm_ratio: float = 2.0,
                 d_state: int = 1,
                 dt_rank: Union[int, str] = 'auto',
                 eval_fusion_padding: str = 'replicate',
                 ops_backend: str = 'auto',
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 inference_graphs: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(out_indices, frozen_stages, norm_eval, ops_backend, init_cfg, inference_graphs)
        settings = parse_arch(type(self).__name__, arch, self.arch_zoo, required=('dims', 'depths'))
        self.dims, self.depths = settings['dims'], settings['depths']
        if d_state != 1:
            raise ValueError(f'SpatialMamba: d_state must be 1 (state fusion mixes one state per channel), '
                             f'got {d_state}.')
        if eval_fusion_padding not in ('replicate', 'zeros'):
            raise ValueError(f"SpatialMamba: eval_fusion_padding must be 'replicate' or 'zeros', "
                             f'got {eval_fusion_padding!r}.')

        self.patch_embed = StemLayer(in_channels, self.dims[0])
        # On the CPU whatever the default device: a meta tensor, say, has no values to list.
        drop_paths = torch.linspace(0, drop_path_rate, sum(self.depths), device='cpu').tolist()
        self.layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(self.dims, self.depths)):
            start = sum(self.depths[:i])
            self.layers.append(
                SpatialMambaStage(
                    dim,
                    depth,
                    out_dim=self.dims[i + 1] if i + 1 < self.num_stages else None,
                    drop_paths=drop_paths[start:start + depth],
                    mlp_ratio=mlp_ratio,
                    d_state=d_state,
                    ssm_ratio=ssm_ratio,
                    dt_rank=dt_rank,
                    eval_fusion_padding=eval_fusion_padding,
                    backend=self.ops_backend,
                    with_cp=with_cp))
        self.apply(trunc_normal_linear_init)
        self._finish_init(nn.LayerNorm)

    def _forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        self._check_input(x, self.patch_embed.conv1.conv.in_channels)
        x = self.patch_embed(x)  # (B, H/4, W/4, C), channels-last
        outs = []
        for i, layer in enumerate(self.layers):
            feat, x = layer(x)
            if i in self.out_indices:
                outs.append(getattr(self, f'outnorm{i}')(feat).permute(0, 3, 1, 2).contiguous())  # (B, C, H, W)
        return tuple(outs)


def convert_upstream_state_dict(state_dict: dict) -> dict:
    """Map an upstream Spatial-Mamba state dict to the keys of an mmpretrain ``ImageClassifier``.

    Upstream classification checkpoints hold ``{'model': state_dict}`` with the trunk at the top level,
    ``norm.*`` (final LayerNorm) and ``head.*``. Here the trunk lives under ``backbone.``, the final
    norm is the backbone's ``outnorm3`` and the head is ``head.fc``. Keys that already start with
    ``backbone.`` (upstream mmdet/mmseg checkpoints, our own files) are returned unchanged.
    """
    last = SpatialMamba.num_stages - 1
    return to_classifier_keys(unwrap_state_dict(state_dict), [('norm.', f'backbone.outnorm{last}.'),
                                                              ('head.', 'head.fc.')])
