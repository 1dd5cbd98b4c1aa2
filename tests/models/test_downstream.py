"""Upstream mmdet/mmseg checkpoints (``backbone.*`` keys) load strictly into our Mask R-CNN and UPerNet models through
mmengine's checkpoint loader and give upstream's backbone outputs, per family."""
import pytest
import torch
from conftest import REPO_ROOT
from fixture_utils import fixture_weights, load_fixture, rel_err
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import load_checkpoint
from models.families import FAMILIES

from vssm.fileio import register_safe_globals

CONFIGS = {
    ('SpatialMamba', 'mmdet'): 'detection/configs/spatial_mamba/mask-rcnn_spatial-mamba-t_fpn_1x_coco.py',
    ('SpatialMamba', 'mmseg'):
    'segmentation/configs/spatial_mamba/spatial-mamba-tiny_upernet_8xb2-160k_ade20k-512x512.py',
    ('VMamba', 'mmdet'): 'detection/configs/vmamba/mask-rcnn_vmamba-t_fpn_1x_coco.py',
    ('VMamba', 'mmseg'): 'segmentation/configs/vmamba/vmamba-tiny_upernet_8xb2-160k_ade20k-512x512.py',
    ('SpectralVMamba', 'mmdet'): 'detection/configs/spectral_vmamba/mask-rcnn_spectral-vmamba-t_fpn_1x_coco.py',
    ('SpectralVMamba', 'mmseg'):
    'segmentation/configs/spectral_vmamba/spectral-vmamba-tiny_upernet_8xb2-160k_ade20k-512x512.py',
}


def _build(family, scope, arch):
    cfg = Config.fromfile(str(REPO_ROOT / CONFIGS[family.name, scope]))
    cfg.model.backbone.arch = arch
    cfg.model.backbone.init_cfg = None
    cfg.model.backbone.update(family.fixture_modes.get('eval', {}))  # upstream's inference path (the fixtures')
    if scope == 'mmdet':
        cfg.model.neck.in_channels = arch['dims']
        import mmdet.models  # noqa: F401
        from mmdet.registry import MODELS
    else:
        cfg.model.decode_head.in_channels = arch['dims']
        cfg.model.auxiliary_head.in_channels = arch['dims'][2]
        import mmseg.models  # noqa: F401
        from mmseg.registry import MODELS
    init_default_scope(scope)
    return MODELS.build(cfg.model)


@pytest.mark.parametrize('family', FAMILIES, ids=[f.name for f in FAMILIES])
@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_upstream_task_checkpoint_loads_strictly(family, scope, tmp_path):
    fixture = load_fixture(family.fixtures[0])
    weights = fixture_weights(fixture)
    arch = family.fixture_arch(fixture['cls']['constructor_kwargs'])
    model = _build(family, scope, arch)
    # An upstream task checkpoint: the backbone manifest's keys under 'backbone.', plus the task heads.
    state_dict = {k: v for k, v in model.state_dict().items() if not k.startswith('backbone.')}
    state_dict.update({f'backbone.{k}': weights[k] for k, _, _ in fixture['backbone']['state_dict']})
    path = tmp_path / 'upstream_task.pth'
    torch.save({'state_dict': state_dict, 'meta': {'epoch': 12}}, path)
    register_safe_globals()
    load_checkpoint(model, str(path), map_location='cpu', strict=True)
    model.eval()
    x = fixture['inputs']['x_2x3x64x64']
    with torch.no_grad():
        outs = model.backbone(x)
    for out, ref in zip(outs, fixture['expected']['backbone']['x_2x3x64x64']['eval']):
        assert rel_err(out, ref) < fixture['tolerances']['backbone_outputs']
