"""Checkpoints that cannot be used fail in one short message that names the fix: another task, family or size (which
model the weights hold, which config to use), upstream layouts, truncated, empty or foreign files; in every tool
that reads checkpoints, before the Runner's logs and without a traceback."""
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest
import torch
from launches import BackgroundLaunches
from mmengine.config import Config
from tiny_runs import config, tool_env

import vssm  # noqa: F401  (registers the checkpoint check in mmengine's loader)
from vssm.engine.checkpoint import check_checkpoint_for_config, check_state_fits, suggest_configs
from vssm.fileio import (
    CheckpointFileError,
    CheckpointMismatchError,
    MissingFileError,
    checkpoint_problem,
    load_checkpoint_file,
)
from vssm.models import SpatialMamba, VMamba
from vssm.models.identify import BackboneInfo, configured_backbone, identify_backbone

TINY = dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1])
MAX_MESSAGE = 700  # characters: a message, not a key dump


def _backbone(cls=SpatialMamba, **arch):
    torch.manual_seed(0)
    return cls(dict(TINY, **arch), out_indices=(0, 1, 2, 3))


def _save(path: Path, state: dict, experiment: str = None) -> Path:
    meta = {'experiment_name': experiment} if experiment else {}
    torch.save({'state_dict': state, 'meta': meta}, path)
    return path


def _whole(head: dict, backbone=None) -> dict:
    backbone = backbone or _backbone()
    return {**{f'backbone.{k}': v for k, v in backbone.state_dict().items()}, **head}


DET_HEAD = {'rpn_head.rpn_conv.weight': torch.zeros(4, 4, 3, 3), 'neck.lateral_convs.0.conv.weight': torch.zeros(4)}
CLS_HEAD = {'head.fc.weight': torch.zeros(4, 64), 'head.fc.bias': torch.zeros(4)}


def _cfg(scope: str, backbone: dict) -> Config:
    return Config(dict(default_scope=scope, model=dict(backbone=backbone)))


def test_identify_backbone_reads_family_widths_and_depths_from_the_keys():
    info = identify_backbone(_whole(DET_HEAD, _backbone(SpatialMamba, depths=[1, 2, 1, 1])))
    assert (info.family, info.dims, info.depths, info.sizes) == ('SpatialMamba', (8, 16, 32, 64), (1, 2, 1, 1), ())
    info = identify_backbone(_backbone(VMamba, ssm_ratio=1.0).state_dict())
    assert (info.family, info.dims, info.depths) == ('VMamba', (8, 16, 32, 64), (1, 1, 1, 1))
    assert identify_backbone({'backbone.patch_embed.projection.weight': torch.zeros(1)}) is None  # e.g. Swin
    assert configured_backbone(dict(type='mmpretrain.VMamba', arch='t')).describe() == \
        "VMamba arch='tiny' (dims [96, 192, 384, 768], depths [2, 2, 8, 2])"
    spectral = configured_backbone(dict(type='SpectralVMamba', arch='small'))
    assert spectral.sizes == ('small', 'base')  # the same network (they differ in drop path only)
    assert configured_backbone(dict(type='SwinTransformer', arch='tiny')) is None


def test_suggested_configs_follow_the_file_names_of_the_family_and_size():
    vmamba_t = BackboneInfo('VMamba', (96, 192, 384, 768), (2, 2, 8, 2), ('tiny', ))
    assert suggest_configs('detection', vmamba_t) == ['detection/configs/vmamba/mask-rcnn_vmamba-t_fpn_1x_coco.py',
                                                      'detection/configs/vmamba/mask-rcnn_vmamba-t_fpn_ms-3x_coco.py']
    assert suggest_configs('segmentation', vmamba_t) == [
        'segmentation/configs/vmamba/vmamba-tiny_upernet_8xb2-160k_ade20k-512x512.py']
    spectral_b = BackboneInfo('SpectralVMamba', (256, 512, 1024, 2048), (2, 2, 15, 2), ('small', 'base'))
    names = suggest_configs('classification', spectral_b)
    assert names and all('spectral-vmamba-small' in n or 'spectral-vmamba-base' in n for n in names)
    assert suggest_configs('detection', BackboneInfo('VMamba', (8, ), (1, ))) == []  # a custom arch: no config


def test_checkpoint_of_another_task_names_the_task_and_the_config_it_was_trained_with(tmp_path):
    path = _save(tmp_path / 'det.pth', _whole(DET_HEAD), 'mask-rcnn_spatial-mamba-t_fpn_1x_coco_20260101_120000')
    cfg = _cfg('mmpretrain', dict(type='SpatialMamba', arch=TINY))
    with pytest.raises(CheckpointMismatchError) as error:
        check_checkpoint_for_config(str(path), cfg)
    message = str(error.value)
    assert 'holds a detection model' in message and 'the config builds a classification model' in message
    assert 'detection/configs/spatial_mamba/mask-rcnn_spatial-mamba-t_fpn_1x_coco.py' in message
    assert "prefix='backbone.'" in message and len(message) < MAX_MESSAGE


def test_checkpoint_of_another_family_names_both_backbones(tmp_path):
    path = _save(tmp_path / 'det.pth', _whole(DET_HEAD))
    with pytest.raises(CheckpointMismatchError) as error:
        check_checkpoint_for_config(str(path), _cfg('mmdet', dict(type='mmpretrain.VMamba', arch='tiny')))
    message = str(error.value)
    assert 'holds the backbone SpatialMamba with a custom arch (dims [8, 16, 32, 64], depths [1, 1, 1, 1])' in message
    assert "the config builds VMamba arch='tiny'" in message and len(message) < MAX_MESSAGE
    check_checkpoint_for_config(str(path), _cfg('mmdet', dict(type='mmpretrain.SpatialMamba', arch=TINY)))  # fits


def test_upstream_layouts_and_bare_backbones_say_what_to_do(tmp_path):
    upstream = tmp_path / 'upstream.pth'
    torch.save({'model': _backbone().state_dict()}, upstream)
    cfg = _cfg('mmpretrain', dict(type='SpatialMamba', arch='tiny'))
    with pytest.raises(CheckpointMismatchError, match='tools/model_converters/spatial_mamba_to_vssm.py'):
        check_checkpoint_for_config(str(upstream), cfg)
    bare = _save(tmp_path / 'backbone.pth', _whole({}))
    with pytest.raises(CheckpointMismatchError, match='holds only backbone weights'):
        check_checkpoint_for_config(str(bare), cfg)


def test_truncated_empty_missing_and_foreign_files(tmp_path):
    good = _save(tmp_path / 'good.pth', CLS_HEAD)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(good.read_bytes()[:200])
    empty = tmp_path / 'empty.pth'
    empty.touch()
    assert checkpoint_problem(str(good)) is None
    assert 'truncated or corrupt' in checkpoint_problem(str(truncated))
    assert 'empty' in checkpoint_problem(str(empty))
    with pytest.raises(CheckpointFileError, match='truncated or corrupt .*copy or download it again'):
        load_checkpoint_file(str(truncated))
    with pytest.raises(MissingFileError, match='does not exist'):
        load_checkpoint_file(str(tmp_path / 'nope.pth'))
    legacy = tmp_path / 'legacy.pth'
    torch.save({'state_dict': CLS_HEAD}, legacy, _use_new_zipfile_serialization=False)
    assert checkpoint_problem(str(legacy)) is None  # torch's pre-1.6 format is no zip archive, and fine
    foreign = tmp_path / 'foreign.pth'
    torch.save({'state_dict': CLS_HEAD, 'args': pickle.loads(pickle.dumps(Path('x')))}, foreign)
    with pytest.raises(CheckpointFileError, match='weights_only loading refuses'):
        load_checkpoint_file(str(foreign))


def test_mmengine_loader_checks_the_file_after_import_vssm(tmp_path):
    """What the libraries' Inferencers and load_checkpoint call: a truncated file says so instead of torch's zip
    error."""
    from mmengine.runner.checkpoint import _load_checkpoint
    good = _save(tmp_path / 'good.pth', CLS_HEAD)
    (tmp_path / 'bad.pth').write_bytes(good.read_bytes()[:-100])
    assert set(_load_checkpoint(str(good))) == {'state_dict', 'meta'}
    with pytest.raises(CheckpointFileError, match='truncated or corrupt'):
        _load_checkpoint(str(tmp_path / 'bad.pth'))


def test_state_mismatch_is_summarised_in_a_few_keys():
    model = torch.nn.ModuleDict(dict(backbone=_backbone(), head=torch.nn.ModuleDict(dict(fc=torch.nn.Linear(64, 10)))))
    with pytest.raises(CheckpointMismatchError) as error:
        check_state_fits(model, {'state_dict': _whole(CLS_HEAD)}, 'ckpt.pth', revise_keys=[(r'^module\.', '')])
    message = str(error.value)
    assert '2 keys of another shape (head.fc.weight: (4, 64), here (10, 64), head.fc.bias: (4,), here (10,))' \
        in message
    assert 'the heads differ' in message and len(message) < MAX_MESSAGE
    other = torch.nn.ModuleDict(dict(backbone=_backbone(VMamba, ssm_ratio=1.0)))
    with pytest.raises(CheckpointMismatchError) as error:
        check_state_fits(other, {'state_dict': _whole({})}, 'ckpt.pth', revise_keys=[])
    message = str(error.value)
    assert 'keys missing' in message and 'more)' in message and 'It holds the backbone SpatialMamba' in message
    assert len(message) < 2 * MAX_MESSAGE  # hundreds of keys, a few shown
    check_state_fits(model, {'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, 'ckpt.pth',
                     revise_keys=[(r'^module\.', '')])  # a wrapped model's keys fit


def _tool(launches: BackgroundLaunches, *args) -> subprocess.CompletedProcess:
    return launches.call([sys.executable, *map(str, args)], env=tool_env(), timeout=300)


def _state_of_another_family() -> dict:
    with torch.random.fork_rng():  # the tests' random streams stay as they were
        return _whole(DET_HEAD)


# A Spatial-Mamba detector's weights, made at import, in the main thread: the pipeline that saves them runs in the
# background, where drawing from torch's global generator would change the other tests' random streams.
ANOTHER_FAMILY = _state_of_another_family()


def _test_another_family(launches: BackgroundLaunches, run_dir: Path, demo_root: None) -> subprocess.CompletedProcess:
    path = _save(run_dir / 'det.pth', ANOTHER_FAMILY)
    return _tool(launches, 'tools/test.py', 'detection/configs/vmamba/mask-rcnn_vmamba-t_fpn_1x_coco.py', path)


@pytest.mark.launches(pipeline=_test_another_family, demo_data=False)
def test_tools_test_rejects_another_family_before_the_runner(background_launches, request):
    result = background_launches.result(request.node.nodeid)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and 'Traceback' not in output
    assert "[vssm] error: checkpoint" in result.stderr and "the config builds VMamba arch='tiny'" in result.stderr
    assert 'System environment' not in output and len(output) < 1500  # no Runner logs, no key lists


def _run_on_a_truncated_file(launches: BackgroundLaunches, run_dir: Path, demo_root: None,
                             tool: str) -> Tuple[Path, subprocess.CompletedProcess]:
    good = _save(run_dir / 'good.pth', CLS_HEAD)
    bad = run_dir / 'iter_4.pth'
    bad.write_bytes(good.read_bytes()[:300])
    args = {
        'train': ['tools/train.py', config('classification'), '--resume', bad, '--work-dir', run_dir],
        'test': ['tools/test.py', config('classification'), bad],
        'converter': ['tools/model_converters/vmamba_to_vssm.py', bad, run_dir / 'out.pth'],
        'publish': ['tools/model_converters/publish_model.py', bad, run_dir / 'out.pth'],
    }[tool]
    return bad, _tool(launches, *args)


# One tool in the quick suite; the others start an interpreter each (7-8 s), under slow.
@pytest.mark.launches(pipeline=_run_on_a_truncated_file, demo_data=False)
@pytest.mark.parametrize('tool', ['train', *(pytest.param(t, marks=pytest.mark.slow)
                                             for t in ('test', 'converter', 'publish'))])
def test_truncated_checkpoints_fail_in_one_line_in_every_tool(background_launches, request, tool):
    bad, result = background_launches.result(request.node.nodeid)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert f"'{bad}' is truncated or corrupt" in result.stderr
    assert len(result.stdout + result.stderr) < 1000


def test_head_of_another_number_of_classes_is_named_before_the_model_is_built(tmp_path):
    path = _save(tmp_path / 'cls.pth', _whole(CLS_HEAD))
    cfg = Config(dict(default_scope='mmpretrain', model=dict(backbone=dict(type='SpatialMamba', arch=TINY),
                                                            head=dict(num_classes=1000))))
    with pytest.raises(CheckpointMismatchError, match=r'holds a head for 4 classes, but the config has '
                       r'model.head.num_classes=1000'):
        check_checkpoint_for_config(str(path), cfg)
    det = _save(tmp_path / 'det.pth', _whole({**DET_HEAD, 'roi_head.bbox_head.fc_cls.weight': torch.zeros(5, 8)}))
    cfg = Config(dict(default_scope='mmdet', model=dict(backbone=dict(type='SpatialMamba', arch=TINY),
                                                       roi_head=dict(bbox_head=dict(num_classes=4)))))
    check_checkpoint_for_config(str(det), cfg)  # 4 classes and the background row
    cfg.model.roi_head.bbox_head.num_classes = 80
    with pytest.raises(CheckpointMismatchError, match='model.roi_head.bbox_head.num_classes=80'):
        check_checkpoint_for_config(str(det), cfg)
