"""Which backbone a checkpoint holds, read from its keys and shapes alone (no model is built).

Used to turn "this checkpoint does not fit" into "this checkpoint holds a VMamba-T; this config builds a
Spatial-Mamba-T": the family from a key only that family has, the widths from one norm per stage, the depths from
the block indices, the size from the family's ``arch_zoo``.
"""
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

from mmengine.config import ConfigDict

from .spatial_mamba import SpatialMamba
from .spectral_vmamba import SpectralVMamba
from .vmamba import VMamba

__all__ = ['BackboneInfo', 'identify_backbone', 'configured_backbone', 'backbone_keys', 'checkpoint_task',
           'FAMILY_CLASSES', 'SCOPE_TASKS']

FAMILY_CLASSES = {'SpatialMamba': SpatialMamba, 'VMamba': VMamba, 'SpectralVMamba': SpectralVMamba}

# family -> (a key only that family's backbone has, the key of one norm weight per stage i, whose length is dims[i]).
# SpectralVMamba is tested before VMamba: both name their block norms alike, only one has the ResNet stem.
_SIGNATURES = (
    ('SpectralVMamba', 'model_patchification.conv1.weight', 'layers.{i}.blocks.0.norm.weight'),
    ('SpatialMamba', 'patch_embed.conv1.conv.weight', 'layers.{i}.blocks.0.ln_1.weight'),
    ('VMamba', 'patch_embed.0.weight', 'layers.{i}.blocks.0.norm.weight'),
)
_BLOCK = re.compile(r'^layers\.(\d+)\.blocks\.(\d+)\.')

# Top-level key prefixes of each library's models (mmpretrain ImageClassifier, mmdet two-stage detectors,
# mmseg encoder-decoders), most specific first.
_TASK_PREFIXES = (
    ('detection', ('rpn_head.', 'roi_head.', 'bbox_head.')),
    ('segmentation', ('decode_head.', 'auxiliary_head.')),
    ('classification', ('head.', )),
)
SCOPE_TASKS = {'mmpretrain': 'classification', 'mmdet': 'detection', 'mmseg': 'segmentation'}


@dataclass(frozen=True)
class BackboneInfo:
    """A backbone as a checkpoint or a config describes it.

    Args:
        family: The registered class name, e.g. ``'VMamba'``.
        dims: Width of each stage.
        depths: Blocks per stage.
        sizes: The names in the family's ``arch_zoo`` with these widths and depths (``('small', 'base')`` for
            SpectralVMamba, whose S and B differ only in drop path); empty for a custom arch.
    """
    family: str
    dims: Tuple[int, ...]
    depths: Tuple[int, ...]
    sizes: Tuple[str, ...] = ()

    def describe(self) -> str:
        """E.g. ``"VMamba arch='tiny' (dims [96, 192, 384, 768], depths [2, 2, 8, 2])"``."""
        size = ' or '.join(f'arch={s!r}' for s in self.sizes) or 'with a custom arch'
        return f'{self.family} {size} (dims {list(self.dims)}, depths {list(self.depths)})'

    def same_network(self, other: 'BackboneInfo') -> bool:
        return (self.family, self.dims, self.depths) == (other.family, other.dims, other.depths)


def _sizes(family: str, dims: Tuple[int, ...], depths: Tuple[int, ...]) -> Tuple[str, ...]:
    zoo = FAMILY_CLASSES[family].arch_zoo
    return tuple(name for name, arch in zoo.items()
                 if len(name) > 1 and tuple(arch['dims']) == dims and tuple(arch['depths']) == depths)


def _strip(state_dict: Dict, prefix: str) -> Dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def backbone_keys(state_dict: Dict) -> Dict:
    """The backbone's entries of a whole-model state dict (``backbone.*``, ``module.`` of wrapped models removed),
    or the state dict itself when it has no ``backbone.`` keys (a bare backbone or an upstream checkpoint)."""
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    inner = _strip(state, 'backbone.')
    return inner or state


def identify_backbone(state_dict: Dict) -> Optional[BackboneInfo]:
    """The vssm backbone whose weights ``state_dict`` holds (a whole model's or a bare backbone's), or None."""
    state = backbone_keys(state_dict)
    for family, marker, norm in _SIGNATURES:
        if marker not in state:
            continue
        depths: Dict[int, int] = {}
        for key in state:
            match = _BLOCK.match(key)
            if match:
                stage, block = int(match.group(1)), int(match.group(2))
                depths[stage] = max(depths.get(stage, 0), block + 1)
        stages = range(max(depths) + 1) if depths else range(0)
        dims = tuple(int(state[norm.format(i=i)].shape[0]) for i in stages if norm.format(i=i) in state)
        depth_list = tuple(depths.get(i, 0) for i in stages)
        if len(dims) != len(depth_list):
            return BackboneInfo(family, dims, depth_list)
        return BackboneInfo(family, dims, depth_list, _sizes(family, dims, depth_list))
    return None


def configured_backbone(backbone_cfg: Union[dict, ConfigDict, None]) -> Optional[BackboneInfo]:
    """The vssm backbone a config's ``model.backbone`` builds, or None for other backbones (or an unknown arch)."""
    if not backbone_cfg:
        return None
    family = str(backbone_cfg.get('type', '')).split('.')[-1]
    if family not in FAMILY_CLASSES:
        return None
    arch = backbone_cfg.get('arch', 'tiny')
    if isinstance(arch, str):
        settings = FAMILY_CLASSES[family].arch_zoo.get(arch.lower())
        if settings is None:
            return None
        dims, depths = list(settings['dims']), list(settings['depths'])
    else:
        dims, depths = arch.get('dims'), arch.get('depths')
        if dims is None or depths is None:
            return None
        if isinstance(dims, int):
            dims = [dims * 2**i for i in range(len(depths))]
    dims, depths = tuple(int(d) for d in dims), tuple(int(d) for d in depths)
    return BackboneInfo(family, dims, depths, _sizes(family, dims, depths))


def checkpoint_task(state_dict: Dict) -> Optional[str]:
    """``'classification'``, ``'detection'`` or ``'segmentation'`` from a whole model's top-level keys; ``'backbone'``
    for ``backbone.*`` keys without a head; None without ``backbone.*`` keys (an upstream layout or a bare backbone)."""
    keys = [k[len('module.'):] if k.startswith('module.') else k for k in state_dict]
    if not any(k.startswith('backbone.') for k in keys):
        return None
    for task, prefixes in _TASK_PREFIXES:
        if any(k.startswith(prefixes) for k in keys):
            return task
    return 'backbone'
