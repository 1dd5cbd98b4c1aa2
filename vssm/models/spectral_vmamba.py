"""Spectral VMamba: VMamba v2 scanning patches in orders taken from the graph-Laplacian spectrum of their features.

Paper: "Spectral State Space Model for Rotation-Invariant Visual Representation Learning", S. Dastani et al.,
arXiv 2503.06369 (CVPR 2025). Design re-implemented from https://github.com/Sahardastani/spectral_vmamba (MIT)
@ 389a8be. It differs from VMamba v2 in three places, which is all this file holds:

* the Rotational Feature Normalizer (RFN) replaces the patch embedding: a frozen ResNet-18 trunk (conv1..layer3,
  stride 16) runs on the four 90-degree rotations of the image; the maps are rotated back and max-pooled;
* the SS2D scans eight sequences: the tokens sorted by each of the Laplacian eigenvectors 2..5 of a k-NN graph over
  the tokens' features, and the same four reversed; the outputs are scattered back (inverse permutations) and summed;
* the downsampling is a 1x1 conv, a stride-2 pooling and LayerNorm2d.

Two behaviours, chosen by ``upstream_compat``:

* ``True`` reproduces upstream exactly, so its checkpoints give its outputs: sigma of the graph weights over the whole
  batch, its per-token eigenvector sign fix, the order computed once (stage 0) and carried to later stages through the
  pooling indices with its re-indexing (which assumes the previous grid is exactly twice as wide, so after an odd
  width the "order" is not a permutation), the stride-2 subsampling of the top-left pixel, rotations on a fixed canvas
  (corners cut for non-square inputs), train-mode BatchNorm in the frozen ResNet, and upstream's sort calls (not
  stable: tied keys, e.g. eigenvectors that vanish on one component of the graph, are ordered as the sort
  implementation breaks the tie, so CPU and GPU may differ there, as upstream's do). Its gradients are exact for
  every order, permutation or not (the scan's backward scatter-adds, and the merge's is derived from upstream's).
* ``False`` (default) fixes it: sigma per image, a sign per eigenvector from its third moment, a small uniform edge
  weight that keeps the graph connected, the spectrum still computed once (stage 0, as upstream) but carried to later
  stages by pooling the eigenvector fields like the features and sorting them again (a valid permutation for every
  input size, one eigensolve per forward), rotation-equivariant pooling (2x2 windows on even sides, 3x3 stride-2
  windows centred on the even pixels of odd sides), exact rotations with ``torch.rot90`` (non-square inputs keep
  their corners) and the frozen ResNet always in eval mode, stable sorts (ties keep raster order). A classifier is
  then invariant to 90/180/270-degree rotations of square inputs.

The order lives in the forward's own state and is passed block to block (upstream keeps it in a module-level global,
which breaks with EMA teachers, threads and gradient checkpointing). It is integer-valued: no gradient reaches it.

Shape legend: B batch, C block width, H/W height/width, L = H*W tokens, K = 8 sequences, T = 4 eigenvectors (top_k),
D inner width.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmpretrain.models.backbones import ResNet
from mmpretrain.registry import MODELS
from torch import Tensor, nn

from ..ops import add_residual, gather_tokens, layer_norm_2d, scatter_tokens
from ..ops.cuda_graph import CudaGraphCache
from ..ops.spectral_order import (
    EIGENSOLVERS,
    ScanIndex,
    equivariant_pool,
    pooled_order,
    propagate_order_upstream,
    scan_index,
    solver_graphs,
    spectral_order,
)
from .layers import (
    LayerNorm2d,
    StagedBackbone,
    normed_linear,
    parse_arch,
    to_classifier_keys,
    trunc_normal_linear_init,
    unwrap_state_dict,
)
from .vmamba import SS2D, VSSBlock

__all__ = ['SpectralVMamba', 'convert_upstream_state_dict', 'spectral_scan', 'spectral_merge']

RFN_CHANNELS = 256  # ResNet-18 layer3
RFN_STRIDE = 16


def _hub_checkpoint_dir() -> str:
    import os.path as osp
    return osp.join(torch.hub.get_dir(), 'checkpoints')


# ---------------------------------------------------------------------------------------------------------------------
# The spectral traversal (the orders themselves: vssm.ops.spectral_order)
# ---------------------------------------------------------------------------------------------------------------------
def spectral_scan(x: Tensor, index: ScanIndex) -> Tensor:
    """(B, D, H, W) -> (B, 2T, D, L): the tokens in each order, then each order reversed (one gather)."""
    return gather_tokens(x, index.scan, index.inverse if index.exact_inverse else None)


def spectral_merge(y: Tensor, index: ScanIndex, height: int, width: int) -> Tensor:
    """(B, 2T, D, L) -> (B, D, H, W): every sequence added back onto raster positions (one gather and a sum)."""
    return scatter_tokens(y, index.merge, height * width, index.inverse).view(y.shape[0], y.shape[2], height, width)


# ---------------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------------
class SpectralSS2D(SS2D):
    """SS2D over the K = 2T spectral sequences (no depthwise conv)."""

    def __init__(self, dim: int, d_state: int, ssm_ratio: float, dt_rank: Union[int, str], top_k: int,
                 backend: str) -> None:
        super().__init__(dim, d_state, ssm_ratio, dt_rank, d_conv=1, num_directions=2 * top_k, backend=backend)
        del self.conv2d

    def graph_features(self, x: Tensor) -> Tensor:
        """The features the graph is built on: in_proj, then SiLU."""
        return self.act(self.in_proj(x))

    def forward(self, x: Tensor, index: ScanIndex) -> Tensor:
        height, width = x.shape[-2:]
        x = self.graph_features(x)  # (B, D, H, W)
        merge = None if index.exact_inverse else index.merge
        y = self.scan(x.flatten(2), index.scan, index.inverse, merge)  # (B, D, L), float32
        # out_proj(out_norm(y)), saving only y
        return normed_linear(y.view(y.shape[0], -1, height, width), self.out_norm, self.out_proj, x.dtype)


class SpectralBlock(VSSBlock):
    """VSSBlock whose SS2D takes the stage's scan order (:func:`scan_index`)."""

    def _forward(self, x: Tensor, index: ScanIndex) -> Tensor:
        x = add_residual(x, self.op(self.norm(x), index), self.drop_path, backend=self.norm.backend)
        return self._add_mlp(x)

    def forward(self, x: Tensor, index: ScanIndex) -> Tensor:
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, index, use_reentrant=False)
        return self._forward(x, index)

    def order_from_features(self, x: Tensor, top_k: int, knn: int, upstream_compat: bool,
                            eigensolver: str = 'auto', return_details: bool = False,
                            graphs: Optional[CudaGraphCache] = None):
        # The norm on the reference op whatever the backend: an order is a discontinuous function of the features
        # (a sort), so it must not depend on the ops backend or the Triton switch (rounding differences of 1e-7
        # would change it, and with it every gradient).
        norm = self.norm
        with torch.no_grad():
            normed = layer_norm_2d(x, norm.weight, norm.bias, norm.eps, backend='torch')
            return spectral_order(self.op.graph_features(normed), top_k, knn, upstream_compat,
                                  return_details=return_details, eigensolver=eigensolver, graphs=graphs)


class SpectralDownsample(nn.Sequential):
    """1x1 conv C -> 2C, stride-2 pooling, LayerNorm2d (upstream's indices: 1 is the conv, 4 the norm).

    ``upstream_compat``: max-pooling with kernel 1 (the top-left pixel of every 2x2 block), returning the kept flat
    indices. Otherwise rotation-equivariant average pooling (see the module docstring).
    """

    def __init__(self, dim: int, out_dim: int, upstream_compat: bool) -> None:
        super().__init__(nn.Identity(), nn.Conv2d(dim, out_dim, 1), nn.Identity(), nn.Identity(), LayerNorm2d(out_dim))
        self.upstream_compat = upstream_compat

    def forward(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Returns the pooled map and, in upstream mode, the kept flat indices (B, H/2 * W/2)."""
        x = self[1](x)
        kept = None
        if self.upstream_compat:
            x, indices = F.max_pool2d(x, kernel_size=1, stride=2, return_indices=True)
            kept = indices[:, 0].flatten(1)
        else:
            x = equivariant_pool(x)
        return self[4](x), kept


class SpectralStage(nn.Module):
    """Blocks of one stage (the first one decides the stage's order), then the downsampling."""

    def __init__(self, blocks: Sequence[SpectralBlock], downsample: Optional[SpectralDownsample]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


@MODELS.register_module()
class SpectralVMamba(StagedBackbone):
    """Spectral VMamba backbone (classification, detection and segmentation).

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` (or ``'t'``, ``'s'``, ``'b'``), or a dict with ``dims`` (the first
            must be 256, the RFN's width) and ``depths``.
        out_indices: stages whose outputs are returned (each through LayerNorm2d ``outnorm{i}``); strides 16..128.
        frozen_stages: -1 freezes nothing; k >= 0 freezes the stem (the RFN) and the first k stages.
        drop_path_rate: stochastic depth, linearly increasing from 0 over all blocks.
        mlp_ratio: MLP hidden width / block width.
        ssm_ratio: SSM inner width D / block width.
        d_state: SSM state size N.
        dt_rank: rank of the step-size projection, ``'auto'`` = ceil(C / 16).
        top_k: eigenvectors (orders) per image; the SSM scans 2 * top_k sequences.
        knn: neighbours per token in the graph.
        upstream_compat: reproduce upstream exactly (see the module docstring) instead of the fixed behaviour.
        eigensolver: ``'auto'`` (dense ``eigh`` up to 32 tokens, Chebyshev-filtered subspace iteration above: the
            cost that matters at detection/segmentation sizes), ``'dense'`` or ``'iterative'``; see
            :func:`spectral_order`. Upstream mode always uses the dense solver.
        cuda_graphs: on CUDA, replay the iterative solver's launches as one CUDA graph per input shape (captured
            the second time a shape is seen, up to 4 shapes, inputs up to 512x512 at batch 8; larger inputs run
            eagerly). Same results; ``False`` always runs eagerly.
        rfn_pretrained: checkpoint for the frozen ResNet-18, e.g. ``'torchvision://resnet18'`` (downloaded by
            ``init_weights()`` when online, never at construction). ``None`` keeps random weights (with a warning)
            unless the whole backbone is loaded from a checkpoint, which holds them.
        rfn_frozen: keep the RFN's ResNet-18 frozen (upstream: its parameters never train; in the fixed mode its
            BatchNorms stay in eval mode). ``False`` trains it with the rest (BatchNorms follow ``train()``), for
            training without ImageNet weights for it: a frozen *random* trunk keeps the model near chance level on
            the demo data (the learning runs in docs/benchmarks.md). Rotation invariance does not depend on the
            weights; in training mode the BatchNorm statistics of square inputs are taken over the four rotations
            together, so they are rotation-invariant too.
        ops_backend: ``'auto'``, ``'torch'`` or ``'cuda'`` for the selective scan.
        norm_eval: keep this backbone's BatchNorm layers (the RFN's) in eval mode while training.
        with_cp: gradient checkpointing of every block.
        inference_graphs: not supported (``graph_capture_blocker``): ``True`` raises an error saying why.
        init_cfg: mmengine init config of the whole backbone.
    """
    graph_capture_blocker = ('its spectral ordering solves an eigenproblem in every forward (torch.linalg.eigh, '
                             'which waits for the GPU to check for errors), and a CUDA graph cannot hold a host '
                             'synchronization; the sync-free part of the ordering is replayed as CUDA graphs already '
                             '(cuda_graphs=True)')
    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], {'dims': [256, 512, 1024, 2048], 'depths': [2, 2, 5, 2]}),
        **dict.fromkeys(['s', 'small'], {'dims': [256, 512, 1024, 2048], 'depths': [2, 2, 15, 2]}),
        **dict.fromkeys(['b', 'base'], {'dims': [256, 512, 1024, 2048], 'depths': [2, 2, 15, 2]}),
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
                 top_k: int = 4,
                 knn: int = 5,
                 upstream_compat: bool = False,
                 eigensolver: str = 'auto',
                 cuda_graphs: bool = True,
                 rfn_pretrained: Optional[str] = None,
                 rfn_frozen: bool = True,
                 ops_backend: str = 'auto',
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 inference_graphs: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(out_indices, frozen_stages, norm_eval, ops_backend, init_cfg, inference_graphs)
        settings = parse_arch(type(self).__name__, arch, self.arch_zoo, required=('dims', 'depths'))
        self.dims, self.depths = settings['dims'], settings['depths']
        if self.dims[0] != RFN_CHANNELS:
            raise ValueError(f'SpectralVMamba: the first width must be {RFN_CHANNELS} (the RFN\'s ResNet-18 layer3 '
                             f'output), got dims={self.dims}.')
        if in_channels != 3:
            raise ValueError(f'SpectralVMamba: the RFN\'s ResNet-18 takes RGB images, got in_channels={in_channels}.')
        if not 1 <= top_k <= 8:
            raise ValueError(f'SpectralVMamba: top_k must be in 1..8, got {top_k}.')
        if knn < 1:
            raise ValueError(f'SpectralVMamba: knn must be >= 1, got {knn}.')
        self.in_channels = in_channels
        self.top_k, self.knn = top_k, knn
        self.upstream_compat = upstream_compat
        if eigensolver not in EIGENSOLVERS:
            raise ValueError(f'SpectralVMamba: eigensolver must be one of {EIGENSOLVERS}, got {eigensolver!r}.')
        self.eigensolver = eigensolver
        self.order_graphs = solver_graphs(knn, enabled=cuda_graphs)  # not state: deepcopy/pickle give an empty cache
        self.rfn_pretrained = rfn_pretrained
        self.rfn_frozen = rfn_frozen
        # The RFN trunk, with upstream's keys (torchvision's ResNet-18 layout, layer4 and fc included so that
        # upstream checkpoints load strictly; only conv1..layer3 run, so layer4 and fc never train).
        self.model_patchification = ResNet(depth=18, out_indices=(2, ))
        self.model_patchification.fc = nn.Linear(512, 1000)
        r = self.model_patchification
        for name, param in r.named_parameters():
            param.requires_grad = not rfn_frozen and not name.startswith(('layer4.', 'fc.'))
        # On the CPU whatever the default device: a meta tensor, say, has no values to list.
        drop_paths = torch.linspace(0, drop_path_rate, sum(self.depths), device='cpu').tolist()
        self.layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(self.dims, self.depths)):
            start = sum(self.depths[:i])
            blocks = [
                SpectralBlock(dim, drop_paths[start + j], mlp_ratio, with_cp,
                              SpectralSS2D(dim, d_state, ssm_ratio, dt_rank, top_k, self.ops_backend))
                for j in range(depth)
            ]
            downsample = SpectralDownsample(dim, self.dims[i + 1], upstream_compat) if i + 1 < self.num_stages else None
            self.layers.append(SpectralStage(blocks, downsample))
        self.apply(trunc_normal_linear_init)
        self._finish_init(LayerNorm2d)

    def init_weights(self) -> None:
        super().init_weights()
        if isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained':
            return  # a whole-backbone checkpoint holds the RFN's weights too
        if self.rfn_pretrained is None:
            if self.rfn_frozen:
                print_log('SpectralVMamba: the frozen RFN ResNet-18 keeps random weights (no rfn_pretrained and no '
                          "checkpoint); set rfn_pretrained='torchvision://resnet18' (or a local ResNet-18 file), load "
                          'a checkpoint of the whole backbone through init_cfg, or train the RFN too with '
                          'rfn_frozen=False.', logger='current', level=30)
            return
        from mmengine.runner import load_checkpoint
        remote = self.rfn_pretrained.startswith(('torchvision://', 'http://', 'https://'))
        try:
            load_checkpoint(self.model_patchification, self.rfn_pretrained, map_location='cpu', strict=True)
        except OSError as error:  # URLError and socket errors included: offline and not in the torch hub cache
            if not remote:
                raise
            print_log(f'SpectralVMamba: could not fetch the RFN weights {self.rfn_pretrained!r} ({error}); the RFN '
                      'ResNet-18 keeps random weights. Offline, put torchvision\'s resnet18-f37072fd.pth into '
                      f'{_hub_checkpoint_dir()} or pass a local path as rfn_pretrained.', logger='current', level=30)

    def train(self, mode: bool = True) -> 'SpectralVMamba':
        super().train(mode)
        # A frozen RFN's BatchNorms follow train() only in upstream mode (upstream's behaviour).
        if self.rfn_frozen and not self.upstream_compat:
            self.model_patchification.eval()
        return self

    @property
    def patch_embed(self) -> nn.Module:
        """The stem: the RFN's ResNet-18."""
        return self.model_patchification

    # --- the RFN -------------------------------------------------------------------------------------------------
    def _trunk(self, x: Tensor) -> Tensor:
        """The ResNet-18 to layer3 on channels-last maps (cuDNN's and oneDNN's convolutions run NHWC natively; an
        NCHW map is transposed around each convolution). :meth:`rfn` makes its result contiguous again."""
        r = self.model_patchification
        x = r.maxpool(r.relu(r.bn1(r.conv1(x.contiguous(memory_format=torch.channels_last)))))
        return r.layer3(r.layer2(r.layer1(x)))

    def rfn(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 256, H/16, W/16): max over the four rotations' rotated-back feature maps."""
        if self.upstream_compat:
            import torchvision.transforms.functional as TF
            b, c, h, w = x.shape
            rotated = torch.stack([TF.rotate(x, angle) for angle in (0, 90, 180, 270)]).view(-1, c, h, w)
            maps = self._trunk(rotated).view(4, b, RFN_CHANNELS, h // RFN_STRIDE, w // RFN_STRIDE)
            back = [TF.rotate(maps[i], -angle) for i, angle in enumerate((0, 90, 180, 270))]
            return torch.stack(back).max(dim=0).values
        if x.shape[-1] == x.shape[-2]:  # square: one trunk call over the 4 rotations
            b = x.shape[0]
            maps = self._trunk(torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)]))
            return torch.stack([torch.rot90(maps[k * b:(k + 1) * b], -k, dims=(2, 3)) for k in range(4)]).amax(0) \
                .contiguous()
        upright = self._trunk(torch.cat([x, torch.rot90(x, 2, dims=(2, 3))]))  # 0 and 180 degrees
        turned = self._trunk(torch.cat([torch.rot90(x, 1, dims=(2, 3)), torch.rot90(x, 3, dims=(2, 3))]))
        b = x.shape[0]
        back = [upright[:b], torch.rot90(upright[b:], -2, dims=(2, 3)), torch.rot90(turned[:b], -1, dims=(2, 3)),
                torch.rot90(turned[b:], -3, dims=(2, 3))]
        return torch.stack(back).amax(0).contiguous()

    # --- forward -----------------------------------------------------------------------------------------------------
    def _forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        return self.forward_with_orders(x)[0]

    def forward_with_orders(self, x: Tensor) -> Tuple[Tuple[Tensor, ...], List[Tensor]]:
        """The outputs, and the order used at each stage ((B, L_i, top_k) int64, raster indices of stage i's grid)."""
        self._check_input(x, self.in_channels)
        if x.shape[-2] % RFN_STRIDE or x.shape[-1] % RFN_STRIDE:
            raise ValueError(f'SpectralVMamba: image sides must be multiples of {RFN_STRIDE} (the RFN\'s stride), got '
                             f'{tuple(x.shape[-2:])}; pad or resize the inputs (e.g. size_divisor={RFN_STRIDE}).')
        x = self.rfn(x)  # (B, 256, H/16, W/16)
        outs, orders, kept, fields = [], [], None, None
        for i, layer in enumerate(self.layers):
            if i == 0:  # the spectrum of the first stage's graph
                order, details = layer.blocks[0].order_from_features(x, self.top_k, self.knn, self.upstream_compat,
                                                                     self.eigensolver, return_details=True,
                                                                     graphs=self.order_graphs)
                fields = details['eigenvectors'].transpose(1, 2).reshape(x.shape[0], self.top_k, *x.shape[-2:])
            elif self.upstream_compat:  # upstream: the previous order through the pooling indices (re-indexed)
                order = propagate_order_upstream(orders[-1], kept, x.shape[-1])
            else:  # fixed: the eigenvector fields pooled like the features, then sorted (a valid permutation)
                order, fields = pooled_order(fields)
            orders.append(order)
            index = scan_index(order, self.upstream_compat)
            for block in layer.blocks:
                x = block(x, index)
            if i in self.out_indices:
                outs.append(getattr(self, f'outnorm{i}')(x).contiguous())
            if layer.downsample is not None:
                x, kept = layer.downsample(x)
        return tuple(outs), orders


def convert_upstream_state_dict(state_dict: dict) -> dict:
    """Map an upstream Spectral VMamba state dict to the keys of an mmpretrain ``ImageClassifier``: the trunk (the
    ResNet-18 under ``model_patchification`` included) under ``backbone.``, ``classifier.norm`` as
    ``backbone.outnorm3`` and ``classifier.head`` as ``head.fc``."""
    last = SpectralVMamba.num_stages - 1
    return to_classifier_keys(unwrap_state_dict(state_dict), [('classifier.norm.', f'backbone.outnorm{last}.'),
                                                              ('classifier.head.', 'head.fc.')])
