"""Every config under the three task trees parses and builds its model on CPU, as is and with --demo.

The configs in ``<task>/configs/baselines/`` use other libraries' backbones (mmpretrain's Swin-T) for comparisons."""
import glob
import os

import pytest
from conftest import REPO_ROOT
from mmengine.config import Config
from mmengine.registry import init_default_scope

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


def test_there_are_configs_for_every_task():
    tasks = {os.path.relpath(p, REPO_ROOT).split(os.sep)[0] for p in CONFIGS}
    assert tasks == {'classification', 'detection', 'segmentation'}


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_builds(path):
    import vssm  # noqa: F401
    cfg = Config.fromfile(path)
    assert cfg.custom_imports['imports'] == ['vssm']
    backbone = cfg.model.backbone
    baseline = os.path.basename(os.path.dirname(path)) == 'baselines'
    assert backbone['type'].split('.')[-1] in (BASELINE_BACKBONES if baseline else OUR_BACKBONES)
    if cfg.default_scope != 'mmpretrain':
        assert backbone['type'].startswith('mmpretrain.') and backbone['out_indices'] == (0, 1, 2, 3)
        assert backbone['init_cfg']['prefix'] == 'backbone.'
    model = _registry(cfg.default_scope).build(cfg.model)
    assert type(model.backbone).__name__ == backbone['type'].split('.')[-1]


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_with_demo_override_builds(path):
    from vssm.engine.launch import apply_demo_override
    cfg = Config.fromfile(path)
    apply_demo_override(cfg, REPO_ROOT)
    assert 'data/demo' in str(cfg.train_dataloader.dataset)
    assert cfg.model.backbone.init_cfg is None
    assert all(cfg.model.backbone[k] is None for k in cfg.model.backbone if k.endswith('_pretrained'))
    _registry(cfg.default_scope).build(cfg.model)
