"""What every vssm backbone shares: ``out_indices`` handling, frozen stages, ``norm_eval``.

A backbone built on :class:`StagedBackbone` has a stem ``patch_embed``, a ``ModuleList`` of stages ``layers`` and one
output norm ``outnorm{i}`` per returned stage (the upstream detection/segmentation wrappers' names, so their
checkpoints load unchanged).
"""
from typing import List, Optional, Sequence, Tuple, Union

from mmengine.logging import print_log
from mmpretrain.models.backbones.base_backbone import BaseBackbone
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...ops._backend import check_backend_name, describe_backends


class StagedBackbone(BaseBackbone):
    """Base of the backbones: set ``patch_embed``, ``layers`` and ``dims`` in ``__init__``, then call
    :meth:`_finish_init`."""
    num_stages = 4

    def __init__(self, out_indices: Union[int, Sequence[int]], frozen_stages: int, norm_eval: bool, ops_backend: str,
                 init_cfg: Optional[Union[dict, List[dict]]]) -> None:
        super().__init__(init_cfg=init_cfg)
        name = type(self).__name__
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'{name}: frozen_stages must be in [-1, {self.num_stages}], got {frozen_stages}.')
        self.out_indices = self._normalize_out_indices(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.ops_backend = check_backend_name(ops_backend)
        self._logged_device = None

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
        """Add ``outnorm{i}`` for the returned stages and apply the freezing."""
        for i in self.out_indices:
            self.add_module(f'outnorm{i}', norm_layer(self.dims[i]))
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
        if self._logged_device != x.device:
            self._logged_device = x.device
            print_log(f'{type(self).__name__} on {x.device}: {describe_backends(self.ops_backend, x)}',
                      logger='current')
