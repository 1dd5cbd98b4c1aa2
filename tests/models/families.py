"""What the model tests need to know about each family: class, a small arch, upstream sizes and fixtures; and
:func:`on_meta` and :func:`meta_model`, for building the full-size models without allocating their weights."""
import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Tuple

import torch
from mmengine.registry import DefaultScope
from mmpretrain.registry import MODELS
from torch import nn
from torch.overrides import TorchFunctionMode

from vssm.models import spatial_mamba, spectral_vmamba, vmamba


@dataclass
class Family:
    name: str  # registered backbone type
    module: object  # the family's module (convert_upstream_state_dict)
    manifest: str  # prefix of the reference manifests
    small_arch: dict
    params: Dict[str, Tuple[int, int]]  # size -> (classifier, backbone with out_indices 0-3)
    gflops: Dict[str, float]
    fixtures: List[str]
    fixture_arch: Callable[[dict], dict]  # upstream constructor kwargs -> our arch dict
    converter: str  # tools/model_converters script
    fixture_modes: Dict[str, dict] = field(default_factory=dict)  # mode -> backbone kwargs
    strides: Tuple[int, ...] = (4, 8, 16, 32)
    odd_sizes: Tuple[Tuple[int, int], ...] = ((33, 47), (7, 9), (1, 1))  # inputs that must run
    int_dims: int = 8  # a first-stage width for the "dims as an int" arch test (0: skip)
    num_classes: int = 1000  # classes of the upstream classifier configs

    @property
    def cls(self):
        return MODELS.get(self.name)

    def convert(self, state_dict):
        return self.module.convert_upstream_state_dict(state_dict)


FAMILIES = [
    Family('SpatialMamba', spatial_mamba, 'spatial_mamba', dict(dims=[8, 16, 32, 64], depths=[1, 1, 2, 1]),
           {'tiny': (26_748_862, 26_236_758), 'small': (43_074_280, 42_562_176), 'base': (95_745_592, 94_977_936)},
           {'tiny': 4.468, 'small': 7.117, 'base': 15.801}, ['spatial_mamba_a', 'spatial_mamba_b'],
           lambda kw: dict(dims=kw['dims'], depths=kw['depths']), 'spatial_mamba_to_vssm.py',
           # 'eval' is upstream's inference path (merged kernel, zero padding); the other two are our default.
           {'eval': dict(eval_fusion_padding='zeros'), 'train': {}, 'eval_replicate_fusion': {}}),
    Family('VMamba', vmamba, 'vmamba', dict(dims=[8, 16, 32, 64], depths=[1, 1, 2, 1], ssm_ratio=1.0),
           {'tiny': (30_249_064, 29_481_408), 'small': (50_147_752, 49_380_096), 'base': (88_557_800, 87_534_592)},
           {'tiny': 4.906, 'small': 8.716, 'base': 15.359}, ['vmamba_a', 'vmamba_b'],
           lambda kw: dict(dims=kw['dims'], depths=kw['depths'], ssm_ratio=kw['ssm_ratio']), 'vmamba_to_vssm.py',
           {'eval': {}, 'train': {}}),
    Family('SpectralVMamba', spectral_vmamba, 'spectral_vmamba', dict(dims=[256, 32, 64, 128], depths=[1, 1, 2, 1]),
           {'tiny': (215_677_580, 215_476_264), 'small': (363_430_540, 363_229_224),
            'base': (363_430_540, 363_229_224)}, {}, ['spectral_vmamba_a', 'spectral_vmamba_b'],
           lambda kw: dict(dims=kw['dims'], depths=kw['depths']), 'spectral_vmamba_to_vssm.py',
           # the fixtures record upstream: batch-wide sigma, propagated orders, ...
           {'eval': dict(upstream_compat=True), 'train': dict(upstream_compat=True)},
           strides=(16, 32, 64, 128), odd_sizes=((16, 16), (80, 80), (112, 80), (48, 208)), int_dims=0,
           num_classes=100),  # upstream's configs are mini-ImageNet
]
BY_NAME = {f.name: f for f in FAMILIES}


def expected_shapes(family: Family, dims, height: int, width: int, out_indices):
    """(C, H, W) of each returned stage: ceil-halving after the stem's stride."""
    shapes = []
    h, w = -(-height // family.strides[0]), -(-width // family.strides[0])
    for i in range(4):
        if i in out_indices:
            shapes.append((dims[i], h, w))
        h, w = -(-h // 2), -(-w // 2)
    return shapes


def build_classifier(family: Family, arch, num_classes: int = 1000, **backbone_kwargs):
    dim = family.cls.arch_zoo[arch]['dims'][-1] if isinstance(arch, str) else arch['dims'][-1]
    with DefaultScope.overwrite_default_scope('mmpretrain'):  # other tests may have set mmdet/mmseg
        return MODELS.build(
            dict(type='ImageClassifier', backbone=dict(type=family.name, arch=arch, **backbone_kwargs),
                 neck=dict(type='GlobalAveragePooling'),
                 head=dict(type='LinearClsHead', num_classes=num_classes, in_channels=dim)))


class _LinspaceOnCPU(TorchFunctionMode):
    """Creates ``torch.linspace`` tensors on the CPU whatever the default device: the OpenMMLab backbones
    (mmpretrain's ResNet, Spectral VMamba's RFN, and its SwinTransformer) read their drop-path rates from one with
    ``.item()``, which a meta tensor cannot answer."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.linspace:
            kwargs = {**kwargs, 'device': 'cpu'}
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build models on ``torch.device('meta')``: parameters and buffers have shapes and dtypes but no data, so the
    full-size models (up to 365 M parameters) build in a second, for counting parameters and checking key layouts."""
    with torch.device('meta'), _LinspaceOnCPU():
        yield


@functools.lru_cache(maxsize=None)
def meta_model(family_name: str, size: str, kind: str) -> nn.Module:
    """A full-size model built once per session on the meta device (:func:`on_meta`): ``kind`` ``'backbone'`` (every
    stage returned, the det/seg layout) or ``'classifier'`` (the upstream configs' class count). Loading a state dict
    into it checks keys and shapes and changes nothing, so the tests can share it."""
    family = BY_NAME[family_name]
    with on_meta():
        if kind == 'backbone':
            return family.cls(size, out_indices=(0, 1, 2, 3))
        return build_classifier(family, size, family.num_classes)
