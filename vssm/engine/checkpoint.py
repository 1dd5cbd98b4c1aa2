"""A checkpoint against the model of a config: one short message that names the model the weights fit and the config
to use, instead of mmengine's list of every missing and unexpected key.

* ``check_checkpoint_for_config``: before the Runner (tools/test.py, tools/train.py's ``--resume``/``load_from``,
  demo/image_demo.py). Reads only the keys and shapes (memory-mapped): the file is complete, the task (classification,
  detection, segmentation) and the vssm backbone (family, widths, depths) are those of the config.
* ``check_state_fits``: inside ``StrictRunner.load_checkpoint``, against the built model: every key and shape.
"""
import os.path as osp
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config

from ..fileio import CheckpointMismatchError, check_checkpoint_file, load_checkpoint_file, register_safe_globals
from ..models.identify import (
    SCOPE_TASKS,
    BackboneInfo,
    backbone_keys,
    checkpoint_task,
    configured_backbone,
    identify_backbone,
)

__all__ = ['CheckpointMismatchError', 'check_checkpoint_for_config', 'check_state_fits', 'suggest_configs',
           'read_checkpoint_keys']

REPO_ROOT = Path(__file__).resolve().parents[2]
_TASKS = ('classification', 'detection', 'segmentation')  # also the top-level folder of each task's configs
_KEYS_SHOWN = 3


# task -> (the checkpoint's classifier weight, whose rows count the classes; the config keys of num_classes under
# model). mmdet's softmax box classifier has one more row (background).
_HEADS = {
    'classification': ('head.fc.weight', ('head', 'num_classes')),
    'detection': ('roi_head.bbox_head.fc_cls.weight', ('roi_head', 'bbox_head', 'num_classes')),
    'segmentation': ('decode_head.conv_seg.weight', ('decode_head', 'num_classes')),
}


def _class_counts(task: str, state: Dict[str, torch.Tensor], model_cfg: dict) -> Optional[Tuple[int, int, str]]:
    """(classes of the checkpoint's head, classes of the config's head, the config key) when both are known."""
    key, path = _HEADS[task]
    node = model_cfg
    for name in path[:-1]:
        node = node.get(name) if isinstance(node, dict) else None
    configured = node.get(path[-1]) if isinstance(node, dict) else None
    if key not in state or not isinstance(configured, int):
        return None
    rows = int(state[key].shape[0])
    if task == 'detection' and not (node.get('loss_cls') or {}).get('use_sigmoid', False):
        rows -= 1
    return rows, configured, 'model.' + '.'.join(path)


def _family_names(family: str) -> Tuple[str, str]:
    """``'SpatialMamba'`` -> (``'spatial_mamba'``, ``'spatial-mamba'``): the config folder and file-name word."""
    snake = re.sub(r'(?<=[a-z])(?=[A-Z])', '_', family).lower().replace('v_mamba', 'vmamba')
    return snake, snake.replace('_', '-')


def suggest_configs(task: str, info: BackboneInfo, repo_root: Path = REPO_ROOT) -> List[str]:
    """Configs of the repository for ``task`` that build the backbone ``info`` describes (by the file-name
    convention ``<family>-<size>``, e.g. ``mask-rcnn_vmamba-t_fpn_1x_coco.py``), relative to ``repo_root``."""
    if task not in _TASKS or not info.sizes:
        return []
    folder, word = _family_names(info.family)
    sizes = '|'.join(sorted(set(info.sizes) | {s[0] for s in info.sizes}))
    pattern = re.compile(rf'(^|_){word}-({sizes})(_|$)')
    root = Path(repo_root) / task / 'configs' / folder
    found = sorted(p for p in root.glob('*.py') if pattern.search(p.stem))
    return [str(p.relative_to(repo_root)) for p in found]


def _trained_with(checkpoint: dict, repo_root: Path) -> Optional[str]:
    """The config a Runner checkpoint was trained with: its path in the repository when one has that name, else the
    name (``meta.experiment_name`` is ``<config name>_<timestamp>``)."""
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    name = (meta or {}).get('experiment_name')
    if not isinstance(name, str):
        return None
    name = re.sub(r'_\d{8}_\d{6}$', '', name)
    matches = sorted(Path(repo_root).glob(f'*/configs/*/{name}.py'))
    return str(matches[0].relative_to(repo_root)) if matches else f'{name}.py'


def _trained_on_demo(checkpoint: dict) -> bool:
    cfg_text = ((checkpoint.get('meta') or {}).get('cfg') or '') if isinstance(checkpoint, dict) else ''
    return isinstance(cfg_text, str) and 'data/demo/' in cfg_text


def _model_cfg(cfg: Config) -> dict:
    model = cfg.get('model') or {}
    while isinstance(model, dict) and 'module' in model and 'backbone' not in model:  # TTA wrappers
        model = model['module']
    return model


def _state_dict(checkpoint: dict) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint: mmengine's ``state_dict``, an upstream checkpoint's ``model``, or a bare state
    dict."""
    if not isinstance(checkpoint, dict):
        return {}
    state = next((checkpoint[k] for k in ('state_dict', 'model') if isinstance(checkpoint.get(k), dict)), checkpoint)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_checkpoint_keys(path: str, what: str = 'checkpoint', fix: str = 'copy or download it again') -> dict:
    """The checkpoint at ``path`` loaded memory-mapped (tensors are read only when used), with
    :func:`vssm.fileio.load_checkpoint_file`'s errors for missing, truncated or foreign files."""
    check_checkpoint_file(path, what, fix)
    try:
        register_safe_globals()
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError:  # pre-1.6 files cannot be memory-mapped
        return load_checkpoint_file(path, what=what, fix=fix)


def _hint_for(task: Optional[str], info: Optional[BackboneInfo], checkpoint: dict, cfg: Config,
              repo_root: Path) -> str:
    """What to use instead: the config the checkpoint was trained with, else the repository's configs for its task
    and backbone; ``--demo`` when it was trained on the demo data and the config is not."""
    trained = _trained_with(checkpoint, repo_root)
    demo = _trained_on_demo(checkpoint) and 'data/demo/' not in str(cfg.get('test_dataloader'))
    if trained and cfg.filename and osp.realpath(osp.join(repo_root, trained)) == osp.realpath(cfg.filename):
        return (' It was trained from this config with other settings' + (' and --demo' if demo else '')
                + ': test it with the same --cfg-options.')
    options = [trained] if trained else []
    if info is not None and task in _TASKS:
        options += [c for c in suggest_configs(task, info, repo_root) if c not in options]
    if not options:
        return ' It was trained with --demo: add --demo.' if demo else ''
    return f' Use a config of that model{" with --demo" if demo else ""}: {", ".join(options[:3])}.'


def check_checkpoint_for_config(path: str, cfg: Config, what: str = 'checkpoint',
                                fix: str = 'copy or download it again', repo_root: Path = REPO_ROOT) -> Optional[dict]:
    """Fail in one message, before any model is built, when ``path`` is missing or truncated, or holds the weights
    of another task or another backbone than ``cfg`` builds; return the (memory-mapped) checkpoint otherwise.

    Checks only what the keys tell without the model (the rest: :func:`check_state_fits`): configs whose backbone
    is not a vssm family pass the backbone check, and checkpoints in upstream key layouts are named as such. URIs
    (``https://``, ``s3://``, ...) are left to mmengine's loader (returns None).
    """
    if '://' in path:
        return None
    checkpoint = read_checkpoint_keys(path, what, fix)
    state = _state_dict(checkpoint)
    if not state:
        raise CheckpointMismatchError(f'{what} {path!r} holds no weights (no tensors under "state_dict").')
    config_task = SCOPE_TASKS.get(cfg.get('default_scope'))
    task = checkpoint_task(state)
    info = identify_backbone(state)
    expected = configured_backbone(_model_cfg(cfg).get('backbone'))
    if task is None:
        known = info or expected
        converter = f'tools/model_converters/{_family_names(known.family)[0] if known else "<family>"}_to_vssm.py'
        raise CheckpointMismatchError(
            f'{what} {path!r} is not a whole model in mmengine\'s layout (no backbone.* keys): an upstream checkpoint '
            f'(convert it first: python {converter} {path} OUT.pth) or a bare backbone (train from it with '
            f"model.backbone.init_cfg=dict(type='Pretrained', checkpoint={path!r})).")
    if task == 'backbone':
        raise CheckpointMismatchError(
            f'{what} {path!r} holds only backbone weights' + (f' ({info.describe()})' if info else '')
            + ', no heads: test a checkpoint of the whole model, or train from it with model.backbone.init_cfg='
            f"dict(type='Pretrained', checkpoint={path!r}, prefix='backbone.').")
    if config_task and task != config_task:
        model = f' (backbone {info.describe()})' if info else ''
        raise CheckpointMismatchError(
            f'{what} {path!r} holds a {task} model{model}, but the config builds a {config_task} model.'
            + _hint_for(task, info, checkpoint, cfg, repo_root)
            + (f' To start a {config_task} model from its backbone, train with model.backbone.init_cfg='
               f"dict(type='Pretrained', checkpoint={path!r}, prefix='backbone.')." if info else ''))
    if expected is not None and not (info is not None and info.same_network(expected)):
        held = f'the backbone {info.describe()}' if info else \
            f'no {expected.family} backbone (its first keys: {", ".join(list(backbone_keys(state))[:_KEYS_SHOWN])})'
        raise CheckpointMismatchError(
            f'{what} {path!r} holds {held}, but the config builds {expected.describe()}.'
            + _hint_for(task, info, checkpoint, cfg, repo_root))
    counts = _class_counts(task, state, _model_cfg(cfg))
    if counts is not None and counts[0] != counts[1]:
        raise CheckpointMismatchError(
            f'{what} {path!r} holds a head for {counts[0]} classes, but the config has {counts[2]}={counts[1]}.'
            + _hint_for(task, info, checkpoint, cfg, repo_root))
    return checkpoint


def _head(items: Sequence[str]) -> str:
    shown = ', '.join(items[:_KEYS_SHOWN])
    return shown + (f' and {len(items) - _KEYS_SHOWN} more' if len(items) > _KEYS_SHOWN else '')


def check_state_fits(model: torch.nn.Module, checkpoint: dict, path: str, revise_keys: Sequence[Tuple[str, str]],
                     cfg: Optional[Config] = None, repo_root: Path = REPO_ROOT) -> None:
    """Raise :class:`CheckpointMismatchError` with a short summary (a few keys of each kind, the model the weights
    fit and the config to use) when ``checkpoint`` does not load strictly into ``model``.

    Keys are compared after ``revise_keys`` as mmengine's loader applies them; ``num_batches_tracked`` may be
    missing (mmengine's strict loading allows it too). When raw keys differ, a non-strict trial load decides, so
    models that rename old keys in ``_load_from_state_dict`` still load.
    """
    state = _state_dict(checkpoint)
    for pattern, replacement in revise_keys:
        state = {re.sub(pattern, replacement, k): v for k, v in state.items()}
    own = model.state_dict()
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    missing = [k for k in own if k not in state and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state if k not in own]
    if not (shapes or missing or unexpected):
        return
    if missing or unexpected:
        result = model.load_state_dict({k: v for k, v in state.items() if k not in shapes}, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith('num_batches_tracked')]
        unexpected = list(result.unexpected_keys)
        if not (shapes or missing or unexpected):
            return
    parts = []
    if shapes:
        parts.append(f'{len(shapes)} keys of another shape ('
                     + _head([f'{k}: {tuple(state[k].shape)}, here {tuple(own[k].shape)}' for k in shapes]) + ')')
    if missing:
        parts.append(f'{len(missing)} keys missing ({_head(missing)})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected keys ({_head(unexpected)})')
    info = identify_backbone(state)
    own_info = identify_backbone(own)
    held = ''
    if info is not None and (own_info is None or not info.same_network(own_info)):
        held = f' It holds the backbone {info.describe()}; the model here has ' + (
            f'{own_info.describe()}.' if own_info else 'another backbone.')
    elif all(not k.startswith('backbone.') for k in shapes + missing + unexpected):
        held = ' The backbone fits; the heads differ (another number of classes or another head).'
    task = checkpoint_task(state)
    hint = _hint_for(task, info, checkpoint, cfg or Config(), repo_root) if task in _TASKS else ''
    raise CheckpointMismatchError(f'checkpoint {path!r} does not fit the model of the config: {"; ".join(parts)}.'
                                  f'{held}{hint}')

