"""What every vssm backbone shares: ``out_indices`` handling, frozen stages, ``norm_eval``, and the optional CUDA-graph
replay of inference (``inference_graphs``).

A backbone built on :class:`StagedBackbone` has a stem ``patch_embed``, a ``ModuleList`` of stages ``layers`` and one
output norm ``outnorm{i}`` per returned stage (the upstream detection/segmentation wrappers' names, so their
checkpoints load unchanged).
"""
import itertools
import os.path as osp
import re
from typing import Hashable, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import print_log
from mmpretrain.models.backbones.base_backbone import BaseBackbone
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...fileio import (
    CheckpointFileError,
    CheckpointMismatchError,
    MissingFileError,
    is_readable_checkpoint,
    register_safe_globals,
)
from ...ops._backend import check_backend_name, describe_backends, triton_fusions_enabled
from ...ops.cuda_graph import CudaGraphCache
from .norm import LayerNorm2d

# Inference graphs: inputs of up to 4 M elements (one 1344 x 800 image; 27 images of 224 x 224) are captured, larger
# ones run eagerly (they keep the GPU busy without help, and a graph's memory pool would hold their intermediates).
GRAPH_MAX_INPUT = 1 << 22


class StagedBackbone(BaseBackbone):
    """Base of the backbones: set ``patch_embed``, ``layers`` and ``dims`` in ``__init__``, define ``_forward`` (the
    images to the tuple of returned maps), then call :meth:`_finish_init`.

    ``inference_graphs=True``: in eval mode with autograd off (``torch.no_grad()`` or ``torch.inference_mode()``, as
    the libraries' test loops and Inferencers run), CUDA inputs of up to ``GRAPH_MAX_INPUT`` elements go through one
    CUDA graph per input shape, dtype and autocast state (:class:`~vssm.ops.cuda_graph.CudaGraphCache`: captured the
    second time a shape is seen, 4 kept): the hundreds of kernel launches of a forward become one, which is what
    batch-1 detection and segmentation inference is bound by. Training, gradients, CPU tensors, ``torch.compile``
    and larger inputs run eagerly. Replacing the weights (``.to()``, ``.half()``) drops the graphs; loading values in
    place is seen at the next replay. A family whose forward synchronizes with the host in every call sets
    ``graph_capture_blocker`` to the reason, and ``inference_graphs=True`` is refused with it (a capture that fails
    midway can leave CUDA's random-number state unusable for the rest of the process).
    """
    num_stages = 4
    graph_capture_blocker: Optional[str] = None

    def __init__(self, out_indices: Union[int, Sequence[int]], frozen_stages: int, norm_eval: bool, ops_backend: str,
                 init_cfg: Optional[Union[dict, List[dict]]], inference_graphs: bool = False) -> None:
        super().__init__(init_cfg=init_cfg)
        name = type(self).__name__
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'{name}: frozen_stages must be in [-1, {self.num_stages}], got {frozen_stages}.')
        self.out_indices = self._normalize_out_indices(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.ops_backend = check_backend_name(ops_backend)
        self._logged_device = None
        if not isinstance(inference_graphs, bool):
            raise TypeError(f'{name}: inference_graphs must be True or False, got {inference_graphs!r}.')
        if inference_graphs and self.graph_capture_blocker:
            raise ValueError(f'{name}: inference_graphs=True is not supported: {self.graph_capture_blocker}. Leave '
                             f'inference_graphs off (model.backbone.inference_graphs=False) for this backbone.')
        # Not a submodule and not state: deepcopy (EMA) and pickling give an empty cache bound to the copy.
        self.inference_graphs = CudaGraphCache(self._forward, max_elements=GRAPH_MAX_INPUT, enabled=inference_graphs,
                                               state=self._graph_state)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Images (B, C, H, W) -> the maps of the stages in ``out_indices``."""
        if self.inference_graphs.enabled and not (self.training or torch.is_grad_enabled() or torch.jit.is_tracing()):
            return self.inference_graphs(x)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        raise NotImplementedError

    def _graph_state(self) -> Hashable:
        """What a captured graph depends on besides its input: the addresses of the weights and buffers, and the
        Triton kernels' switch (read at call time by the ops)."""
        return (tuple(t.data_ptr() for t in itertools.chain(self.parameters(), self.buffers())),
                triton_fusions_enabled())

    def init_weights(self) -> None:
        """mmengine's initialisation, except that ``init_cfg=dict(type='Pretrained', ...)`` loads strictly.

        mmengine's ``Pretrained`` initializer loads with ``strict=False`` and only logs missing keys, so a checkpoint
        of another family or size "loads" and trains from noise. Here every parameter and buffer must come from the
        checkpoint with its shape, except the output norms ``outnorm{i}`` that a classifier checkpoint does not have
        (it holds only the last stage's). ``strict=False`` in the init_cfg allows a partial load (logged).
        """
        cfg = self.init_cfg
        if not (isinstance(cfg, dict) and cfg.get('type') == 'Pretrained'):
            return super().init_weights()
        self.init_cfg = None  # the parent's init (trunc-normal etc.) first, then the checkpoint over it
        try:
            super().init_weights()
        finally:
            self.init_cfg = cfg
        self.load_pretrained(cfg['checkpoint'], prefix=cfg.get('prefix'), strict=cfg.get('strict', True))

    def load_pretrained(self, checkpoint: str, prefix: Optional[str] = None, strict: bool = True) -> None:
        """Load ``checkpoint`` (a file, or an mmengine URI such as ``torchvision://`` or ``https://``) into this
        backbone, keeping the keys under ``prefix`` (e.g. ``'backbone.'``); see :meth:`init_weights`."""
        from mmengine.runner.checkpoint import _load_checkpoint

        name = type(self).__name__
        if '://' not in checkpoint:
            if not osp.isfile(checkpoint):
                raise MissingFileError(f'{name}: pretrained checkpoint {checkpoint!r} does not exist (init_cfg). '
                                       'Give the path of a checkpoint of ours or of a converted upstream one '
                                       '(tools/model_converters/), or set init_cfg=None to start from scratch.')
            if not is_readable_checkpoint(checkpoint):
                raise CheckpointFileError(f'{name}: {checkpoint!r} is not a complete checkpoint (truncated or corrupt: '
                                          'not a readable torch zip archive). Copy or download it again.')
        register_safe_globals()
        state = _load_checkpoint(checkpoint, map_location='cpu')
        state = state.get('state_dict', state.get('model', state)) if isinstance(state, dict) else state
        if prefix:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not state:
                raise ValueError(f'{name}: {checkpoint!r} has no keys under prefix {prefix!r} (init_cfg.prefix).')
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}' for k in own
                  if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        new_norms = [k for k in missing if re.match(r'outnorm\d+\.', k)]
        missing = [k for k in missing if k not in new_norms]
        if (missing or unexpected or shapes) and strict:
            def head(keys):
                return ', '.join(keys[:8]) + (f' ... ({len(keys)} in all)' if len(keys) > 8 else '')
            from ..identify import identify_backbone
            held = identify_backbone(state)
            held = f'It holds {held.describe()}. ' if held else ''
            raise CheckpointMismatchError(
                f'{name}: {checkpoint!r} does not fit this backbone (another family or size?). {held}'
                f'missing keys: {head(missing) or "none"}; unexpected keys: {head(unexpected) or "none"}; '
                f'shape mismatches: {head(shapes) or "none"}. Upstream checkpoints need '
                "tools/model_converters/<family>_to_vssm.py first; set init_cfg=dict(..., strict=False) to load what "
                'fits anyway.')
        for key in shapes:
            state.pop(key.split(':')[0])
        self.load_state_dict(state, strict=False)
        print_log(f'{name}: loaded {checkpoint} ({len(state) - len(unexpected)} tensors'
                  + (f'; new output norms kept initialised: {new_norms}' if new_norms else '')
                  + (f'; NOT loaded (strict=False): missing {missing}, unexpected {unexpected}, shapes {shapes}'
                     if missing or unexpected or shapes else '') + ')', logger='current')

    def _normalize_out_indices(self, out_indices: Union[int, Sequence[int]]) -> Tuple[int, ...]:
        if isinstance(out_indices, int):
            out_indices = (out_indices, )
        result = []
        for i in out_indices:
            j = i + self.num_stages if i < 0 else i
            if not 0 <= j < self.num_stages:
                raise ValueError(f'{type(self).__name__}: out_indices must be in [-{self.num_stages}, '
                                 f'{self.num_stages - 1}], got {tuple(out_indices)}.')
            result.append(j)
        return tuple(sorted(set(result)))

    def _finish_init(self, norm_layer: type) -> None:
        """Add ``outnorm{i}`` for the returned stages, give every ``LayerNorm2d`` the backbone's ``ops_backend`` and
        apply the freezing."""
        for i in self.out_indices:
            self.add_module(f'outnorm{i}', norm_layer(self.dims[i]))
        for module in self.modules():
            if isinstance(module, LayerNorm2d):
                module.backend = self.ops_backend
        self._freeze_stages()

    @property
    def out_channels(self) -> Tuple[int, ...]:
        """Channels of each returned feature map (in ``out_indices`` order)."""
        return tuple(self.dims[i] for i in self.out_indices)

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules = [self.patch_embed]
        for i in range(self.frozen_stages):
            modules.append(self.layers[i])
            if i in self.out_indices:
                modules.append(getattr(self, f'outnorm{i}'))
        return modules

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'StagedBackbone':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def _check_input(self, x: Tensor, in_channels: int) -> None:
        """Validate the images and log, once per device, which op implementations run."""
        if x.dim() != 4 or x.shape[1] != in_channels:
            raise ValueError(f'{type(self).__name__}: expected images (B, {in_channels}, H, W), '
                             f'got shape {tuple(x.shape)}.')
        if self._logged_device != x.device and not torch.compiler.is_compiling():  # no graph break under compile
            self._logged_device = x.device
            print_log(f'{type(self).__name__} on {x.device}: {describe_backends(self.ops_backend, x)}',
                      logger='current')
