"""Every config under the three task trees parses and builds its model, as is and with --demo.

The models are built on the meta device (:func:`models.families.on_meta`): every constructor runs with the config's
arguments, without the memory and the initialisation time of the full-size weights (Spectral VMamba-S/B: 365 M
parameters). The configs in ``<task>/configs/baselines/`` use other libraries' backbones (mmpretrain's Swin-T) for
comparisons."""
import copy
import functools
import glob
import os

import pytest
from conftest import REPO_ROOT
from mmengine.config import Config
from mmengine.registry import init_default_scope
from models.families import on_meta

CONFIGS = sorted(p for task in ('classification', 'detection', 'segmentation')
                 for p in glob.glob(str(REPO_ROOT / task / 'configs' / '*' / '*.py'))
                 if os.sep + '_base_' + os.sep not in p)
OUR_BACKBONES = ('SpatialMamba', 'VMamba', 'SpectralVMamba')
BASELINE_BACKBONES = ('SwinTransformer', )
DEMO_OVERRIDE = {'mmpretrain': 'classification', 'mmdet': 'detection', 'mmseg': 'segmentation'}


def _registry(scope):
    init_default_scope(scope)
    if scope == 'mmdet':
        import mmdet.models  # noqa: F401
        from mmdet.registry import MODELS
    elif scope == 'mmseg':
        import mmseg.models  # noqa: F401
        from mmseg.registry import MODELS
    else:
        from mmpretrain.registry import MODELS
    return MODELS


@functools.lru_cache(maxsize=None)
def _parsed(path: str) -> Config:
    """The config as parsed once per session (a second parse of the mmdet/mmseg bases costs as much as a build)."""
    return Config.fromfile(path)


def _config(path: str) -> Config:
    return copy.deepcopy(_parsed(path))


def test_there_are_configs_for_every_task():
    tasks = {os.path.relpath(p, REPO_ROOT).split(os.sep)[0] for p in CONFIGS}
    assert tasks == {'classification', 'detection', 'segmentation'}


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_builds(path):
    import vssm  # noqa: F401
    cfg = _config(path)
    assert cfg.custom_imports['imports'] == ['vssm']
    backbone = cfg.model.backbone
    baseline = os.path.basename(os.path.dirname(path)) == 'baselines'
    assert backbone['type'].split('.')[-1] in (BASELINE_BACKBONES if baseline else OUR_BACKBONES)
    if cfg.default_scope != 'mmpretrain':
        assert backbone['type'].startswith('mmpretrain.') and backbone['out_indices'] == (0, 1, 2, 3)
        assert backbone['init_cfg']['prefix'] == 'backbone.'
    registry = _registry(cfg.default_scope)
    with on_meta():
        model = registry.build(cfg.model)
    assert type(model.backbone).__name__ == backbone['type'].split('.')[-1]
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_with_demo_override_builds(path):
    from vssm.engine.launch import apply_demo_override
    cfg = _config(path)
    apply_demo_override(cfg, REPO_ROOT)
    assert 'data/demo' in str(cfg.train_dataloader.dataset)
    assert cfg.model.backbone.init_cfg is None
    assert all(cfg.model.backbone[k] is None for k in cfg.model.backbone if k.endswith('_pretrained'))
    registry = _registry(cfg.default_scope)
    with on_meta():
        registry.build(cfg.model)
