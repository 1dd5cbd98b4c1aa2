"""Models to measure, built from configs with random weights: nothing is loaded or downloaded.

* :func:`prepare_config`: a config file (repository-relative, absolute, or ``'mmdet::<path>'`` inside an installed
  library's configs) with ``--cfg-options`` applied, SyncBN as BN on a machine without CUDA, and every
  ``Pretrained`` ``init_cfg`` and ``*_pretrained`` argument cleared.
* :func:`build_model` / :func:`build_backbone`: the whole model or only its backbone, in the config's scope.
* :func:`backbone_state_dict`: the backbone's weights from a classifier, detector, segmentor or backbone checkpoint.
* :data:`MODEL_SPECS`: our T/S/B models and the peers (mmpretrain's Swin-T and ConvNeXt-T) with their
  classification, Mask R-CNN and UPerNet configs, as the benchmarks name them (``'vmamba-t'``, ``'swin-t'``, ...).

``init_weights()`` is never called here: the weights are the constructors' random initialisation.
"""
import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from mmengine.config import Config, ConfigDict
from torch import nn

from ..engine.launch import clear_pretrained, prepare_for_device

__all__ = ['REPO_ROOT', 'TASKS', 'config_file', 'prepare_config', 'build_model', 'build_backbone',
           'backbone_state_dict', 'ModelSpec', 'MODEL_SPECS', 'build_spec_model']

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = ('cls', 'det', 'seg')  # ImageNet classifier, Mask R-CNN, UPerNet


def config_file(path: str, root: Optional[Path] = None) -> Path:
    """The file of a config: ``'<package>::<path>'`` inside that package's ``.mim/configs``, else ``path`` itself
    when it exists, else ``path`` relative to ``root`` (default: the repository)."""
    if '::' in path:
        package, relative = path.split('::', 1)
        return Path(importlib.import_module(package).__file__).parent / '.mim' / 'configs' / relative
    if Path(path).is_file():
        return Path(path)
    return Path(root or REPO_ROOT) / path


def prepare_config(config: str, cfg_options: Optional[dict] = None, root: Optional[Path] = None) -> Config:
    """Read ``config`` (see :func:`config_file`) and make its model buildable here without weights.

    Args:
        config: the config path.
        cfg_options: ``--cfg-options``-style overrides (``{'model.backbone.arch': 'small'}``), applied first.
        root: the folder relative paths start from (default: the repository).
    """
    file = config_file(config, root)
    if not file.is_file():
        raise FileNotFoundError(f'config file {config!r} does not exist (looked at {file}).')
    cfg = Config.fromfile(str(file))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    prepare_for_device(cfg, 'none')
    clear_pretrained(cfg.model)
    return cfg


def _scope(cfg: Union[Config, dict], scope: Optional[str]) -> str:
    return scope or (cfg.get('default_scope') if isinstance(cfg, Config) else None) or 'mmpretrain'


def _build(module_cfg: ConfigDict, scope: str) -> nn.Module:
    from mmengine.registry import MODELS, DefaultScope

    import vssm  # noqa: F401  (registers the backbones)
    with DefaultScope.overwrite_default_scope(scope):
        return MODELS.build(module_cfg)


def build_model(cfg: Union[Config, dict], scope: Optional[str] = None, ops_backend: Optional[str] = None) -> nn.Module:
    """Build ``cfg.model`` (a :class:`Config`; with its top-level ``data_preprocessor`` where the model has none,
    as the Runner builds it) or a model dict, in ``scope`` (default: the config's ``default_scope``, else mmpretrain).

    Args:
        cfg: a config from :func:`prepare_config`, or a model dict; neither is modified.
        scope: the registry scope.
        ops_backend: the backbone's ``ops_backend`` (``'torch'``, ``'cuda'``, ``'auto'``); default: the config's.
    """
    model_cfg = ConfigDict(cfg.model if isinstance(cfg, Config) else cfg)  # a copy
    if isinstance(cfg, Config) and cfg.get('data_preprocessor') and 'data_preprocessor' not in model_cfg:
        model_cfg.data_preprocessor = cfg.data_preprocessor  # as mmengine's Runner does
    if ops_backend is not None:
        model_cfg.backbone.ops_backend = ops_backend
    return _build(model_cfg, _scope(cfg, scope))


def build_backbone(cfg: Config, ops_backend: Optional[str] = None, **overrides) -> nn.Module:
    """Build only ``cfg.model.backbone`` in the config's scope (det/seg configs name it ``'mmpretrain.<Name>'``);
    ``overrides`` replace its keys, e.g. ``out_indices=(3, )``."""
    if not cfg.model.get('backbone') or 'type' not in cfg.model.backbone:
        raise ValueError(f'{cfg.filename}: the config has no model.backbone to build.')
    backbone_cfg = ConfigDict(cfg.model.backbone)  # a copy
    backbone_cfg.update(overrides)
    if ops_backend is not None:
        backbone_cfg.ops_backend = ops_backend
    return _build(backbone_cfg, _scope(cfg, None))


def backbone_state_dict(checkpoint: str) -> Dict[str, torch.Tensor]:
    """The weights of a checkpoint with the backbone's own key names.

    Whole models (a classifier, detector or segmentor: ``backbone.*`` keys, ``module.`` prefixes of a wrapped model
    removed) give their backbone's keys; a backbone checkpoint is returned as it is. Loaded with
    ``weights_only=True`` and the classes mmengine checkpoints hold (:func:`vssm.fileio.load_checkpoint_file`).
    """
    from ..fileio import load_checkpoint_file
    state = load_checkpoint_file(checkpoint)  # a missing, truncated or foreign file: one message that says so
    state = state.get('state_dict', state)
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    if any(k.startswith('backbone.') for k in state):
        state = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    return state


# --- the benchmarks' models --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One model of the benchmarks.

    Args:
        name: the command-line name, e.g. ``'vmamba-t'``.
        title: the name in tables, e.g. ``'VMamba-T'``.
        classifier: our classification config (relative to the repository), or a function of the image size that
            returns a model dict (the peers).
        detector: the Mask R-CNN config, relative to the repository or ``'mmdet::<path>'`` in mmdet's configs.
        segmentor: the UPerNet config, likewise (``'mmseg::<path>'``).
        family: our backbone class (which takes ``ops_backend``); ``None`` for the peers.
        reference: the peer its ratios compare with (``'swin-t'``, ``'swin-s'``, ``'swin-b'``: Swin of its size).
        detector_options: ``--cfg-options``-style overrides of the detector config (a Swin size mmdet has no
            Mask R-CNN 1x config for).
    """
    name: str
    title: str
    classifier: Union[str, Callable[[int], dict]]
    detector: str
    segmentor: str
    family: Optional[str] = None
    reference: str = 'swin-t'
    detector_options: Optional[dict] = None

    @property
    def ours(self) -> bool:
        return self.family is not None

    @property
    def supports_inference_graphs(self) -> bool:
        """Whether our backbone takes ``inference_graphs=True`` (see ``StagedBackbone.graph_capture_blocker``)."""
        from mmpretrain.registry import MODELS
        return self.ours and not MODELS.get(self.family).graph_capture_blocker

    def config(self, task: str) -> str:
        """The config of ``task`` (``'det'`` or ``'seg'``; ``'cls'`` for ours)."""
        if task == 'cls' and not self.ours:
            raise ValueError(f'{self.name}: the classifier is built from a dict, not a config file.')
        return dict(cls=self.classifier, det=self.detector, seg=self.segmentor)[task]


def _cls_head(in_channels: int) -> dict:
    return dict(type='LinearClsHead', num_classes=1000, in_channels=in_channels,
                loss=dict(type='CrossEntropyLoss', loss_weight=1.0), cal_acc=False)


# Swin sizes: mmpretrain arch, drop path of its ImageNet config, width of the last stage, depths and heads (for the
# Mask R-CNN of the sizes mmdet has no 1x config for: Swin-T's with the backbone and the FPN's inputs resized)
SWIN_SIZES = {
    't': ('tiny', 0.2, 96, [2, 2, 6, 2], [3, 6, 12, 24]),
    's': ('small', 0.3, 96, [2, 2, 18, 2], [3, 6, 12, 24]),
    'b': ('base', 0.5, 128, [2, 2, 18, 2], [4, 8, 16, 32]),
}


def _swin(size_key: str) -> Callable[[int], dict]:
    """mmpretrain's Swin ImageNet classifier of one size (configs/_base_/models/swin_transformer/<arch>_224.py);
    ``pad_small_map=True`` so that sizes below 224 run too."""
    arch, drop_path, width = SWIN_SIZES[size_key][:3]

    def classifier(size: int) -> dict:
        return dict(type='ImageClassifier',
                    backbone=dict(type='SwinTransformer', arch=arch, img_size=size, drop_path_rate=drop_path,
                                  pad_small_map=True),
                    neck=dict(type='GlobalAveragePooling'), head=_cls_head(8 * width))

    return classifier


def _swin_detector_options(size_key: str) -> Optional[dict]:
    if size_key == 't':
        return None
    _, drop_path, width, depths, heads = SWIN_SIZES[size_key]
    return {'model.backbone.embed_dims': width, 'model.backbone.depths': depths, 'model.backbone.num_heads': heads,
            'model.backbone.drop_path_rate': drop_path, 'model.neck.in_channels': [width * 2**i for i in range(4)]}


def _convnext_t(size: int) -> dict:
    """mmpretrain's ConvNeXt-T ImageNet classifier (configs/_base_/models/convnext/convnext-tiny.py)."""
    return dict(type='ImageClassifier', backbone=dict(type='ConvNeXt', arch='tiny', drop_path_rate=0.1),
                head=_cls_head(768))


def _our_specs() -> List[ModelSpec]:
    families = (  # (name prefix, title, config folder, backbone class)
        ('spatial-mamba', 'Spatial-Mamba', 'spatial_mamba', 'SpatialMamba'),
        ('vmamba', 'VMamba', 'vmamba', 'VMamba'),
        ('spectral-vmamba', 'Spectral VMamba', 'spectral_vmamba', 'SpectralVMamba'),
    )
    specs = []
    for size, arch in (('t', 'tiny'), ('s', 'small'), ('b', 'base')):
        for prefix, title, folder, family in families:
            specs.append(ModelSpec(
                name=f'{prefix}-{size}', title=f'{title}-{size.upper()}', family=family,
                classifier=f'classification/configs/{folder}/{prefix}-{arch}_8xb128_in1k.py',
                detector=f'detection/configs/{folder}/mask-rcnn_{prefix}-{size}_fpn_1x_coco.py',
                segmentor=f'segmentation/configs/{folder}/{prefix}-{arch}_upernet_8xb2-160k_ade20k-512x512.py',
                reference=f'swin-{size}'))
    return specs


def _swin_specs() -> List[ModelSpec]:
    return [ModelSpec(f'swin-{size}', f'Swin-{size.upper()}', _swin(size),
                      'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
                      f'mmseg::swin/swin-{arch}-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
                      reference=f'swin-{size}', detector_options=_swin_detector_options(size))
            for size, (arch, *_) in SWIN_SIZES.items()]


MODEL_SPECS: Dict[str, ModelSpec] = {spec.name: spec for spec in _our_specs() + _swin_specs() + [
    ModelSpec('convnext-t', 'ConvNeXt-T', _convnext_t,
              'mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py',
              'mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py'),
]}


def model_name_type(names: Sequence[str]) -> Callable[[str], str]:
    """An argparse ``type`` accepting one of ``names`` (keys of :data:`MODEL_SPECS`), listing them when it is not."""
    def check(value: str) -> str:
        if value not in names:
            raise argparse.ArgumentTypeError(f'unknown model {value!r}; choose from {", ".join(names)}')
        return value

    return check


def build_spec_model(spec: ModelSpec, task: str, ops_backend: Optional[str] = None, size: int = 224) -> nn.Module:
    """The classifier (``task='cls'``; the peers' for images of side ``size``), Mask R-CNN (``'det'``) or UPerNet
    (``'seg'``) of ``spec``; ``ops_backend`` applies to our backbones only."""
    if task not in TASKS:
        raise ValueError(f'build_spec_model: task must be one of {TASKS}, got {task!r}.')
    backend = ops_backend if spec.ours else None
    if task == 'cls' and not spec.ours:
        return build_model(spec.classifier(size), 'mmpretrain')
    options = spec.detector_options if task == 'det' else None
    return build_model(prepare_config(spec.config(task), options), ops_backend=backend)
