"""The real path: tools/dist_train.sh with 2 processes for 2 iterations per task on the demo data, then
tools/dist_test.sh (with --tta for segmentation) producing metrics. (Resume: tests/tools/test_launchers.py.)"""
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

# task -> (config pattern with {family}/{name}/{short}, metrics, test options)
TASKS = {
    'classification': ('classification/configs/{family}/{name}-tiny_8xb128_in1k.py', ['accuracy/top1'], []),
    'detection': ('detection/configs/{family}/mask-rcnn_{name}-t_fpn_1x_coco.py', ['coco/bbox_mAP', 'coco/segm_mAP'],
                  []),
    'segmentation': ('segmentation/configs/{family}/{name}-tiny_upernet_8xb2-160k_ade20k-512x512.py',
                     ['mIoU', 'aAcc'], ['--tta']),
}
FAMILIES = {'spatial_mamba': 'spatial-mamba', 'vmamba': 'vmamba', 'spectral_vmamba': 'spectral-vmamba'}


@pytest.fixture(scope='module', autouse=True)
def demo_data():
    subprocess.run([sys.executable, 'tools/make_demo_data.py', '--out', 'data/demo'], cwd=REPO_ROOT, check=True,
                   capture_output=True)


def _run(args, log):
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f'{" ".join(args)} failed:\n{(result.stdout + result.stderr)[-4000:]}'
    return result.stdout + result.stderr


def _iters(n):
    return ['--cfg-options', f'train_cfg.max_iters={n}', f'train_cfg.val_interval={n}',
            f'default_hooks.checkpoint.interval={n}']


@pytest.mark.parametrize('family', list(FAMILIES))
@pytest.mark.parametrize('task', list(TASKS))
def test_dist_train_then_dist_test(family, task, tmp_path):
    pattern, keys, test_args = TASKS[task]
    config = pattern.format(family=family, name=FAMILIES[family])
    work_dir = tmp_path / task
    _run(['tools/dist_train.sh', config, '2', '--demo', '--work-dir', str(work_dir), *_iters(2)],
         tmp_path / 'train.log')
    checkpoint = work_dir / 'iter_2.pth'
    assert checkpoint.is_file()
    out = _run(['tools/dist_test.sh', config, str(checkpoint), '2', '--demo', '--work-dir', str(work_dir),
                *test_args], tmp_path / 'test.log')
    metrics = json.loads((work_dir / 'metrics.json').read_text())
    for key in keys:
        assert math.isfinite(metrics[key]), (key, metrics)
    assert '[vssm] metrics:' in out

