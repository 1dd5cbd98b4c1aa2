"""The real path: tools/dist_train.sh with 2 processes (gloo on a CPU machine) for 2 iterations per task and family on
the demo data, validating at the end, then tools/dist_test.sh (with --tta for segmentation) producing metrics.

Every family x task runs twice: with the family's small arch (``model.backbone.arch`` and the widths the neck and
heads read, through ``--cfg-options``), and as the T model the config names (``slow``: minutes each on 2 cores, and
checkpoints of up to 3 GB for Spectral VMamba-T). Each launch of 2 processes costs about 20 s of CPU before any work
(interpreters importing torch and the OpenMMLab libraries), so in the quick suite every small arch trains (and
validates), and three of them, one per family and one per task (``TESTED_SMALL``), are tested with dist_test.sh as
well; the T runs train and test all nine, under ``slow``. Two iterations, because DDP reports a parameter that got
no gradient at the start of the next one. The demo data is generated once per session into a temporary folder, and
the runs are pointed at it with ``--cfg-options``. The runs start in the background when the session starts
(tests/launches.py) and each test checks its own. (Resume: tests/tools/test_resume.py.)"""
import argparse
import json
import math
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
from conftest import REPO_ROOT, demo_data_options
from launches import BackgroundLaunches
from models.families import BY_NAME

from vssm.engine.launch import add_common_args, load_config

# task -> (config pattern with {family}/{name}, metrics, test options)
TASKS = {
    'classification': ('classification/configs/{family}/{name}-tiny_8xb128_in1k.py', ['accuracy/top1'], []),
    'detection': ('detection/configs/{family}/mask-rcnn_{name}-t_fpn_1x_coco.py', ['coco/bbox_mAP', 'coco/segm_mAP'],
                  []),
    'segmentation': ('segmentation/configs/{family}/{name}-tiny_upernet_8xb2-160k_ade20k-512x512.py',
                     ['mIoU', 'aAcc'], ['--tta']),
}
# config folder -> (config name, registered backbone)
FAMILIES = {'spatial_mamba': ('spatial-mamba', 'SpatialMamba'), 'vmamba': ('vmamba', 'VMamba'),
            'spectral_vmamba': ('spectral-vmamba', 'SpectralVMamba')}
SIZES = ['small-arch', pytest.param('T', marks=pytest.mark.slow)]
# The small-arch runs that dist_test.sh tests too: each family once, each task once (segmentation's multi-scale TTA
# with Spectral VMamba, which needs sides that are multiples of 16).
TESTED_SMALL = {('classification', 'spatial_mamba'), ('detection', 'vmamba'), ('segmentation', 'spectral_vmamba')}


def _config(task: str, family: str) -> str:
    return TASKS[task][0].format(family=family, name=FAMILIES[family][0])


def _value(value) -> str:
    """A value as mmengine's DictAction parses it back (lists without spaces)."""
    return '[' + ','.join(map(str, value)) + ']' if isinstance(value, (list, tuple)) else str(value)


# The task models' own widths and proposal counts, shrunk along with the backbone: Mask R-CNN's heads at their
# full width (256-channel FPN, 1024-wide box head, 512 sampled and 1000 tested proposals per image) and UPerNet's
# 512 channels take most of a small-arch run's time on a CPU.
SMALL_HEADS = {
    'classification': {},
    'detection': {
        'model.neck.out_channels': 32, 'model.rpn_head.in_channels': 32, 'model.rpn_head.feat_channels': 32,
        'model.roi_head.bbox_roi_extractor.out_channels': 32, 'model.roi_head.bbox_head.in_channels': 32,
        'model.roi_head.bbox_head.fc_out_channels': 64, 'model.roi_head.mask_roi_extractor.out_channels': 32,
        'model.roi_head.mask_head.in_channels': 32, 'model.roi_head.mask_head.conv_out_channels': 32,
        'model.train_cfg.rpn_proposal.nms_pre': 200, 'model.train_cfg.rpn_proposal.max_per_img': 100,
        'model.train_cfg.rcnn.sampler.num': 64, 'model.test_cfg.rpn.nms_pre': 200,
        'model.test_cfg.rpn.max_per_img': 100, 'model.test_cfg.rcnn.max_per_img': 20},
    'segmentation': {'model.decode_head.channels': 32, 'model.auxiliary_head.channels': 16},
}


def small_arch_options(task: str, family: str) -> List[str]:
    """``--cfg-options`` items that give the config the family's small arch (tests/models/families.py), the widths
    its neck or heads take from the backbone, and the task's small heads (``SMALL_HEADS``)."""
    arch = BY_NAME[FAMILIES[family][1]].small_arch
    dims = arch['dims']
    options = {'model.backbone.arch._delete_': True, **{f'model.backbone.arch.{k}': v for k, v in arch.items()}}
    if task == 'classification':
        options['model.head.in_channels'] = dims[-1]
    elif task == 'detection':
        options['model.neck.in_channels'] = dims
    else:
        options.update({'model.decode_head.in_channels': dims, 'model.auxiliary_head.in_channels': dims[2]})
    options.update(SMALL_HEADS[task])
    return [f'{key}={_value(value)}' for key, value in options.items()]


def _iters(n: int) -> List[str]:
    return [f'train_cfg.max_iters={n}', f'train_cfg.val_interval={n}', f'default_hooks.checkpoint.interval={n}']


@pytest.mark.parametrize('task', list(TASKS))
def test_demo_data_options_replace_every_demo_path(task, tmp_path):
    """What keeps the runs below out of the repository: parsed as the tools parse them, the options leave no data
    path of the demo override (data roots, annotation files) pointing into data/demo."""
    config = str(REPO_ROOT / _config(task, 'vmamba'))
    assert 'data/demo' in str(load_config(config, demo=True, repo_root=REPO_ROOT).to_dict())
    args = add_common_args(argparse.ArgumentParser()).parse_args(
        ['--demo', '--cfg-options', *demo_data_options(task, tmp_path)])
    cfg = load_config(config, args.cfg_options, demo=True, repo_root=REPO_ROOT)
    # What the Runner reads data through (the override's module-level variables, e.g. data_root, are left).
    readers = {key: value for key, value in cfg.to_dict().items() if key.endswith(('_dataloader', '_evaluator'))}
    assert len(readers) == 5 and 'data/demo' not in str(readers)
    assert all(cfg[f'{split}_dataloader'].dataset.data_root.startswith(str(tmp_path))
               for split in ('train', 'val', 'test'))


def _last_validation(work_dir: Path) -> dict:
    """The metrics of the last validation of a training run (mmengine's scalars.json, one record per line)."""
    records = [json.loads(line) for path in work_dir.glob('*/vis_data/scalars.json')
               for line in path.read_text().splitlines()]
    return next((r for r in reversed(records) if 'step' in r and 'loss' not in r), {})


def _train_then_test(launches: BackgroundLaunches, run_dir: Path, demo_root: Path, task: str, family: str,
                     size: str) -> Tuple[bool, dict, Optional[dict], Optional[str]]:
    """tools/dist_train.sh (2 processes, 2 iterations, validation at the end), then, for the T models and
    ``TESTED_SMALL``, tools/dist_test.sh on its last checkpoint. Returns whether that checkpoint was written, the
    metrics of the validation, and the test's metrics and output (None when not tested). The checkpoints are deleted
    afterwards (up to 3 GB each for the T models; these runs go ahead of their tests), the logs stay in ``run_dir``."""
    _, _, test_args = TASKS[task]
    config = _config(task, family)
    options = demo_data_options(task, demo_root)
    if size == 'small-arch':
        options += small_arch_options(task, family)
    work_dir = run_dir / 'work'
    launches.run(['tools/dist_train.sh', config, '2', '--demo', '--work-dir', str(work_dir), '--cfg-options',
                  *options, *_iters(2)], run_dir / 'train.log')
    checkpoint = work_dir / 'iter_2.pth'
    trained, validation = checkpoint.is_file(), _last_validation(work_dir)
    metrics = out = None
    if trained and (size == 'T' or (task, family) in TESTED_SMALL):
        out = launches.run(['tools/dist_test.sh', config, str(checkpoint), '2', '--demo', '--work-dir',
                            str(work_dir), *test_args, '--cfg-options', *options], run_dir / 'test.log')
        metrics = json.loads((work_dir / 'metrics.json').read_text())
    for path in work_dir.glob('*.pth'):
        path.unlink()
    return trained, validation, metrics, out


@pytest.mark.launches(pipeline=_train_then_test)
@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('family', list(FAMILIES))
@pytest.mark.parametrize('task', list(TASKS))
def test_dist_train_then_dist_test(task, family, size, background_launches, request):
    trained, validation, metrics, out = background_launches.result(request.node.nodeid)
    assert trained, 'tools/dist_train.sh wrote no iter_2.pth'
    keys = TASKS[task][1]
    for key in keys:
        assert math.isfinite(validation[key]), (key, validation)
    if size == 'T' or (task, family) in TESTED_SMALL:
        for key in keys:
            assert math.isfinite(metrics[key]), (key, metrics)
        assert '[vssm] metrics:' in out
