"""VMamba v2: SS2D, a selective scan over four directions of the image.

Paper: "VMamba: Visual State Space Model", Y. Liu, Y. Tian, Y. Zhao, H. Yu, L. Xie, Y. Wang, Q. Ye, J. Jiao,
Y. Liu, arXiv 2401.10166 (NeurIPS 2024). Design re-implemented from https://github.com/MzeroMiko/VMamba (MIT) @ 2ed52ea,
forward type ``v05_noz`` (the T[s1l8], S[s2l15], B[s2l15] configs): channel-first maps with LayerNorm2d, patch
embedding "v2", downsampling "v3", no gate branch. Module and parameter names follow upstream so that its
checkpoints load unchanged (see ``tools/model_converters/vmamba_to_vssm.py``, which also renames the legacy v0 keys).

Differences from upstream: runs on CPU (pure-PyTorch reference ops, no Triton), a single forward type instead of a
string-parsed variant zoo, a strict constructor, and one backbone class for classification, detection and
segmentation.

Shape legend: B batch, C block width, H/W height/width, L = H*W, K = 4 scan directions, D inner width, N state
size, R dt_rank.
"""
import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks import DropPath
from mmpretrain.registry import MODELS
from torch import Tensor, nn

from ..ops import add_residual, cross_selective_scan, dwconv2d, gather_tokens, inverse_permutation, scatter_tokens
from ..ops._backend import is_cacheable
from ..ops.bias_gelu import kernel_runs as bias_gelu_runs
from ..ops.residual import kernel_runs as residual_runs
from .layers import (
    LayerNorm2d,
    Linear2d,
    StagedBackbone,
    gelu_linear,
    init_A_logs,
    init_Ds,
    init_dt_bias,
    init_dt_weight,
    init_x_proj_weight,
    normed_linear,
    parse_arch,
    to_classifier_keys,
    trunc_normal_linear_init,
    unwrap_state_dict,
)

__all__ = ['VMamba', 'convert_upstream_state_dict', 'cross_scan', 'cross_merge', 'cross_scan_index']


_INDEX_CACHE: 'OrderedDict[Tuple[int, int, torch.device], Tuple[Tensor, Tensor]]' = OrderedDict()
_INDEX_CACHE_SIZE = 32  # shapes (detection's multi-scale inputs make many: 4 per input size)


def cross_scan_index(height: int, width: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """The four directions as index maps: ``index[0, k, i]`` is the raster position (h * W + w) that direction k
    reads at step i (row-major, column-major, and both reversed), and ``inverse`` (1, K, L) its inverse permutations.
    Cached per device for the last 32 shapes (not for the fake tensors of tracers and meta devices)."""
    key = (height, width, torch.device(device))
    cached = _INDEX_CACHE.get(key)
    if cached is not None:
        _INDEX_CACHE.move_to_end(key)
        return cached
    raster = torch.arange(height * width, device=device).view(height, width)
    rows, cols = raster.flatten(), raster.t().flatten()
    index = torch.stack([rows, cols, rows.flip(0), cols.flip(0)])[None]  # (1, K, L)
    cached = index, inverse_permutation(index)
    if is_cacheable(index):
        _INDEX_CACHE[key] = cached
        if len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
            _INDEX_CACHE.popitem(last=False)
    return cached


def cross_scan(x: Tensor) -> Tensor:
    """(B, D, H, W) -> (B, 4, D, L): row-major, column-major, and both reversed (one gather; the backward is
    :func:`cross_merge` of the gradient)."""
    return gather_tokens(x, *cross_scan_index(*x.shape[-2:], x.device))


def cross_merge(y: Tensor, height: int, width: int) -> Tensor:
    """(B, 4, D, L) -> (B, D, H, W): the four directions added back onto their raster positions (the adjoint of
    :func:`cross_scan`, which is its backward)."""
    index, inverse = cross_scan_index(height, width, y.device)
    return scatter_tokens(y, index, height * width, inverse).view(y.shape[0], y.shape[2], height, width)


class SS2D(nn.Module):
    """2-D selective scan (upstream key prefix ``op``), forward type ``v05_noz``.

    in_proj -> depthwise 3x3 -> SiLU -> cross-scan (K = 4) -> projections -> one selective scan over K*D channels
    -> cross-merge -> LayerNorm2d -> out_proj.
    """

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 2.0, dt_rank: Union[int, str] = 'auto',
                 d_conv: int = 3, num_directions: int = 4, backend: str = 'auto') -> None:
        super().__init__()
        d_inner = int(ssm_ratio * dim)
        k = num_directions
        self.dt_rank = math.ceil(dim / 16) if dt_rank == 'auto' else int(dt_rank)
        self.d_state, self.d_inner, self.num_directions = d_state, d_inner, k
        self.backend = backend
        # Registration order = upstream's state-dict order.
        self.x_proj_weight = nn.Parameter(torch.empty(k, self.dt_rank + 2 * d_state, d_inner))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        self.out_norm = LayerNorm2d(d_inner)
        self.in_proj = Linear2d(dim, d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=d_conv // 2, groups=d_inner, bias=False)
        self.act = nn.SiLU()
        self.out_proj = Linear2d(d_inner, dim, bias=False)
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self) -> None:
        for i in range(self.num_directions):
            init_x_proj_weight(self.x_proj_weight[i])
            init_dt_weight(self.dt_projs_weight[i], self.dt_rank)
            init_dt_bias(self.dt_projs_bias[i])
        init_A_logs(self.A_logs)
        init_Ds(self.Ds)

    def scan(self, x: Tensor, index: Tensor, inverse: Optional[Tensor] = None,
             merge: Optional[Tensor] = None) -> Tensor:
        """The SSM over the K sequences of ``index``: (B, D, L) -> (B, D, L) float32, the sequences' outputs added
        back onto their tokens (:func:`~vssm.ops.cross_selective_scan`)."""
        return cross_selective_scan(x, index, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias,
                                    -torch.exp(self.A_logs.float()), self.Ds.float(), inverse=inverse, merge=merge,
                                    backend=self.backend)

    def forward(self, x: Tensor, norm: Optional[LayerNorm2d] = None) -> Tensor:
        """x: (B, C, H, W); ``norm``: the block's LayerNorm2d, applied to x first (and recomputed in the backward
        instead of saving its output)."""
        height, width = x.shape[-2:]
        x = normed_linear(x, norm, self.in_proj)
        # The depthwise conv through vssm.ops.dwconv2d (the kernel: 2.1x cuDNN's forward, 2.7x its forward+backward
        # at stage 1 in fp32 and bf16, docs/benchmarks.md); same function and parameters as the nn.Conv2d.
        x = self.act(dwconv2d(x, self.conv2d.weight, self.conv2d.bias, backend=self.backend))  # (B, D, H, W)
        y = self.scan(x.flatten(2), *cross_scan_index(height, width, x.device))  # (B, D, L), float32
        # out_proj(out_norm(y)), saving only y
        return normed_linear(y.view(y.shape[0], -1, height, width), self.out_norm, self.out_proj, x.dtype)


class Mlp2d(nn.Module):
    """Linear2d C -> rC, GELU, Linear2d rC -> C; GELU's output is recomputed in the backward, not saved."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear2d(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear2d(hidden, dim)

    def forward(self, x: Tensor, norm: Optional[LayerNorm2d] = None, with_bias: bool = True) -> Tensor:
        """``norm``: applied to x first (and recomputed in the backward instead of saving its output);
        ``with_bias``: False leaves out fc2's bias (for a caller that adds it in its next pass)."""
        # fc1's bias added in GELU's pass where that is one kernel (vssm.ops.bias_gelu), not in a pass of its own
        backend = norm.backend if norm is not None else 'auto'
        fold = self.fc1.bias is not None and bias_gelu_runs(x, backend)
        h = normed_linear(x, norm, self.fc1, with_bias=not fold)
        return gelu_linear(h, self.fc2, channels_first=True, in_bias=self.fc1.bias if fold else None,
                           with_bias=with_bias, backend=backend)


class VSSBlock(nn.Module):
    """x + DropPath(op(norm(x))); x + DropPath(mlp(norm2(x))), channel-first; each residual added in one pass
    (:func:`vssm.ops.add_residual`)."""

    def __init__(self, dim: int, drop_path: float, mlp_ratio: float, with_cp: bool, op: nn.Module) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.norm = LayerNorm2d(dim)
        self.op = op
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm2d(dim)
        self.mlp = Mlp2d(dim, int(dim * mlp_ratio))

    def _forward(self, x: Tensor) -> Tensor:
        x = add_residual(x, self.op(x, self.norm), self.drop_path, backend=self.norm.backend)
        return self._add_mlp(x)

    def _add_mlp(self, x: Tensor) -> Tensor:
        """x + drop_path(mlp(norm2(x))); fc2's bias added in the residual's pass where that is one kernel
        (:func:`vssm.ops.add_residual`), not in a pass of its own."""
        backend = self.norm2.backend
        fold = self.mlp.fc2.bias is not None and residual_runs(x, backend)
        y = self.mlp(x, self.norm2, with_bias=not fold)
        return add_residual(x, y, self.drop_path, self.mlp.fc2.bias if fold else None, backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class VMambaStage(nn.Module):
    """Blocks of one stage, then (except for the last stage) conv 3x3 stride 2 + LayerNorm2d to the next width."""

    def __init__(self, blocks: Sequence[nn.Module], dim: int, out_dim: Optional[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = None
        if out_dim is not None:  # upstream indices: 0 and 2 are permutes (identities channel-first)
            self.downsample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, out_dim, 3, 2, 1), nn.Identity(),
                                            LayerNorm2d(out_dim))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Returns (this stage's output, the input of the next stage)."""
        for block in self.blocks:
            x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


@MODELS.register_module()
class VMamba(StagedBackbone):
    """VMamba v2 backbone (classification, detection and segmentation), forward type ``v05_noz``.

    Args:
        arch: ``'tiny'`` (T[s1l8]), ``'small'`` (S[s2l15]), ``'base'`` (B[s2l15]) (or ``'t'``, ``'s'``, ``'b'``), or a
            dict with ``dims`` (per stage, or the first stage's width), ``depths`` and optionally ``ssm_ratio``.
        in_channels: input image channels.
        out_indices: stages whose outputs are returned (each through LayerNorm2d ``outnorm{i}``).
        frozen_stages: -1 freezes nothing; k >= 0 freezes the stem and the first k stages.
        drop_path_rate: stochastic depth, linearly increasing from 0 over all blocks.
        mlp_ratio: MLP hidden width / block width.
        d_state: SSM state size N.
        dt_rank: rank of the step-size projection, ``'auto'`` = ceil(C / 16).
        ops_backend: ``'auto'``, ``'torch'`` or ``'cuda'`` for the selective scan.
        norm_eval: keep BatchNorm layers in eval mode while training (VMamba has none; kept for the common contract).
        with_cp: gradient checkpointing of every block.
        inference_graphs: on CUDA, replay inference (eval mode, autograd off) as one CUDA graph per input shape
            (see :class:`~vssm.models.layers.StagedBackbone`); for batch-1 detection and segmentation.
        init_cfg: mmengine init config, e.g. ``dict(type='Pretrained', checkpoint=..., prefix='backbone.')``.
    """
    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], {'dims': [96, 192, 384, 768], 'depths': [2, 2, 8, 2], 'ssm_ratio': 1.0}),
        **dict.fromkeys(['s', 'small'], {'dims': [96, 192, 384, 768], 'depths': [2, 2, 15, 2], 'ssm_ratio': 2.0}),
        **dict.fromkeys(['b', 'base'], {'dims': [128, 256, 512, 1024], 'depths': [2, 2, 15, 2], 'ssm_ratio': 2.0}),
    }

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 out_indices: Sequence[int] = (3, ),
                 frozen_stages: int = -1,
                 drop_path_rate: float = 0.0,
                 mlp_ratio: float = 4.0,
                 d_state: int = 1,
                 dt_rank: Union[int, str] = 'auto',
                 ops_backend: str = 'auto',
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 inference_graphs: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(out_indices, frozen_stages, norm_eval, ops_backend, init_cfg, inference_graphs)
        settings = parse_arch(type(self).__name__, arch, self.arch_zoo, required=('dims', 'depths'),
                              optional=('ssm_ratio', ))
        self.dims, self.depths = settings['dims'], settings['depths']
        ssm_ratio = float(settings.get('ssm_ratio', 2.0))
        self.in_channels = in_channels
        half = self.dims[0] // 2
        # Upstream patch embedding "v2" (indices 1, 3, 6 are permutes, identities channel-first; 4 is the GELU).
        self.patch_embed = nn.Sequential(
            nn.Conv2d(in_channels, half, 3, 2, 1), nn.Identity(), LayerNorm2d(half), nn.Identity(), nn.GELU(),
            nn.Conv2d(half, self.dims[0], 3, 2, 1), nn.Identity(), LayerNorm2d(self.dims[0]))
        # On the CPU whatever the default device: a meta tensor, say, has no values to list.
        drop_paths = torch.linspace(0, drop_path_rate, sum(self.depths), device='cpu').tolist()
        self.layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(self.dims, self.depths)):
            start = sum(self.depths[:i])
            blocks = [
                VSSBlock(dim, drop_paths[start + j], mlp_ratio, with_cp,
                         SS2D(dim, d_state, ssm_ratio, dt_rank, backend=self.ops_backend)) for j in range(depth)
            ]
            self.layers.append(VMambaStage(blocks, dim, self.dims[i + 1] if i + 1 < self.num_stages else None))
        self.apply(trunc_normal_linear_init)
        self._finish_init(LayerNorm2d)

    def _forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        self._check_input(x, self.in_channels)
        x = self.patch_embed(x)  # (B, C, H/4, W/4)
        outs = []
        for i, layer in enumerate(self.layers):
            feat, x = layer(x)
            if i in self.out_indices:
                outs.append(getattr(self, f'outnorm{i}')(feat).contiguous())
        return tuple(outs)


# Legacy VMamba v0 checkpoints: old names -> v2 names (applied to key segments).
LEGACY_RENAMES = (
    ('patch_embed.proj.', 'patch_embed.0.'),
    ('patch_embed.norm.', 'patch_embed.2.'),
    ('.ln_1.', '.norm.'),
    ('.self_attention.', '.op.'),
)


def convert_upstream_state_dict(state_dict: dict) -> dict:
    """Map an upstream VMamba state dict (v2 keys, or the legacy v0 names) to an mmpretrain ``ImageClassifier``.

    The trunk goes under ``backbone.``; ``classifier.norm`` (v0: ``norm``) becomes ``backbone.outnorm3`` and
    ``classifier.head`` (v0: ``head``) becomes ``head.fc``. Keys already under ``backbone.`` (upstream mmdet/mmseg
    checkpoints) pass through unchanged; 4-D ``(out, in, 1, 1)`` Linear2d weights load as well.
    """
    renamed = {}
    for key, value in unwrap_state_dict(state_dict).items():
        for old, new in LEGACY_RENAMES:
            key = key.replace(old, new)
        renamed[key] = value
    last = VMamba.num_stages - 1
    return to_classifier_keys(renamed, [('classifier.norm.', f'backbone.outnorm{last}.'),
                                        ('classifier.head.', 'head.fc.'), ('norm.', f'backbone.outnorm{last}.'),
                                        ('head.', 'head.fc.')])
