"""tools/train.py, tools/test.py and the torchrun wrappers on a tiny mmpretrain config (ResNet-18, 8 images of 32x32).

The distributed runs (2 CPU processes over gloo when there is no GPU) and the resumed run are marked ``slow``; the
other single-process runs and the helpers in ``vssm.engine.launch`` are not.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from launches import BackgroundLaunches, free_port
from mmengine.config import Config

from vssm.engine.launch import prepare_for_device
from vssm.fileio import register_safe_globals

CONFIG = """
default_scope = 'mmpretrain'
data_root = {data_root!r}
model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(num_classes=2, mean=[127.5] * 3, std=[57.4] * 3, to_rgb=True),
    backbone=dict(type='ResNet', depth=18, num_stages=4, out_indices=(3,), norm_cfg=dict(type='SyncBN')),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=2, in_channels=512, loss=dict(type='CrossEntropyLoss')))
train_pipeline = [dict(type='LoadImageFromFile'), dict(type='RandomFlip', prob=0.5), dict(type='PackInputs')]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
tta_model = dict(type='AverageClsScoreTTA')
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug',
         transforms=[[dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)], [dict(type='PackInputs')]]),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type='CustomDataset', data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CustomDataset', data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1,))
test_evaluator = val_evaluator
train_cfg = dict(by_epoch=False, max_iters=2, val_interval=2)
val_cfg = dict()
test_cfg = dict()
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-4))
param_scheduler = [dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=2)]
default_hooks = dict(logger=dict(type='LoggerHook', interval=1),
                     checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False))
log_processor = dict(by_epoch=False)
env_cfg = dict(mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0), dist_cfg=dict(backend='nccl'))
randomness = dict(seed=0)
"""


def _env() -> Dict[str, str]:
    """A tool's environment: this interpreter, the repository on PYTHONPATH, a free rendezvous port."""
    return dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO_ROOT), PORT=str(free_port()))


def _run(args: List[str], log: Path) -> str:
    """Run a tool from the repo root; keep its output in ``log`` and fail with its tail."""
    result = subprocess.run(args, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    log.write_text(out)
    assert result.returncode == 0, f'{" ".join(args)} failed (rc {result.returncode}):\n{out[-4000:]}'
    return out


def _write_config(root: Path) -> Path:
    """The config file, written into ``root`` next to an image folder of 2 classes x 4 images (32x32)."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(('dark', 'bright')):
        (root / 'data' / name).mkdir(parents=True)
        for index in range(4):
            image = rng.integers(0, 100, (32, 32, 3), dtype=np.uint8) + 120 * label
            cv2.imwrite(str(root / 'data' / name / f'{index}.png'), image.astype(np.uint8))
    path = root / 'resnet18_tiny.py'
    path.write_text(CONFIG.format(data_root=str(root / 'data')))
    return path


@pytest.fixture(scope='module')
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_config(tmp_path_factory.mktemp('launchers'))


@pytest.fixture(scope='module')
def single_run(config: Path) -> Path:
    """``tools/train.py`` without a launcher: 2 iterations; returns the work dir."""
    work_dir = config.parent / 'single'
    _run([sys.executable, 'tools/train.py', str(config), '--work-dir', str(work_dir)], config.parent / 'single.log')
    return work_dir


@pytest.fixture(scope='module')
def dist_run(config: Path) -> Path:
    """``tools/dist_train.sh CONFIG 2``: 2 iterations on 2 processes; returns the work dir (log: <work dir>.log)."""
    work_dir = config.parent / 'dist'
    _run(['tools/dist_train.sh', str(config), '2', '--work-dir', str(work_dir)], work_dir.with_suffix('.log'))
    return work_dir


@pytest.mark.slow
def test_dist_train_runs_two_processes_and_saves_iter_2(dist_run: Path) -> None:
    assert (dist_run / 'iter_2.pth').is_file()
    log = dist_run.with_suffix('.log').read_text()
    assert 'Distributed training: True' in log and 'GPU number: 2' in log  # mmengine's env info: world size 2
    if not torch.cuda.is_available():
        assert "'backend': 'gloo'" in log
        assert 'Iter(train) [2/2]' in log


@pytest.mark.slow
@pytest.mark.parametrize('tta', [False, True], ids=['plain', 'tta'])
def test_dist_test_prints_accuracy_and_writes_metrics_json(config: Path, dist_run: Path, tmp_path: Path,
                                                          tta: bool) -> None:
    work_dir = tmp_path / 'test'
    out = _run(['tools/dist_test.sh', str(config), str(dist_run / 'iter_2.pth'), '2',
                '--work-dir', str(work_dir), *(['--tta'] if tta else [])], tmp_path / 'test.log')
    assert 'accuracy/top1' in out
    metrics = json.loads((work_dir / 'metrics.json').read_text())
    assert 0 <= metrics['accuracy/top1'] <= 100 and math.isfinite(metrics['accuracy/top1'])


@pytest.mark.slow
def test_train_resume_continues_from_the_latest_checkpoint(config: Path, single_run: Path, tmp_path: Path) -> None:
    out = _run([sys.executable, 'tools/train.py', str(config), '--work-dir', str(single_run), '--resume',
                '--cfg-options', 'train_cfg.max_iters=3', 'train_cfg.val_interval=3',
                'default_hooks.checkpoint.interval=3'], tmp_path / 'resume.log')
    assert f'Load checkpoint from {single_run / "iter_2.pth"}' in out
    assert 'resumed epoch: 0, iter: 2' in out
    assert (single_run / 'iter_3.pth').is_file()


def _train_without_launcher(launches: BackgroundLaunches, run_dir: Path, demo_root: None) -> Path:
    """``tools/train.py`` without a launcher on a config of its own: 2 iterations; returns the work dir."""
    config = _write_config(run_dir)
    work_dir = run_dir / 'single'
    launches.run([sys.executable, 'tools/train.py', str(config), '--work-dir', str(work_dir)], run_dir / 'single.log',
                 env=_env())
    return work_dir


@pytest.mark.launches(pipeline=_train_without_launcher, demo_data=False)
def test_safe_globals_load_a_runner_checkpoint_with_weights_only(background_launches: BackgroundLaunches,
                                                                 request: pytest.FixtureRequest) -> None:
    path = background_launches.result(request.node.nodeid) / 'iter_2.pth'
    register_safe_globals()
    checkpoint = torch.load(path, weights_only=True)
    assert {'meta', 'state_dict', 'message_hub', 'optimizer', 'param_schedulers'} <= set(checkpoint)
    assert checkpoint['meta']['iter'] == 2
    loss = checkpoint['message_hub']['log_scalars']['train/loss']
    assert math.isfinite(loss.mean()) and len(loss.data[0]) == 2


def _test_without_tta_keys(launches: BackgroundLaunches, run_dir: Path,
                           demo_root: None) -> subprocess.CompletedProcess:
    """``tools/test.py --tta`` on the config without its ``tta_model`` and ``tta_pipeline``."""
    bare = run_dir / 'no_tta.py'
    bare.write_text(_write_config(run_dir).read_text().replace('tta_model =', '_tta_model =')
                    .replace('tta_pipeline =', '_tta_p ='))
    return launches.call([sys.executable, 'tools/test.py', str(bare), str(bare), '--tta'], env=dict(os.environ),
                         timeout=120)


@pytest.mark.launches(pipeline=_test_without_tta_keys, demo_data=False)
def test_tta_without_tta_keys_names_both(background_launches: BackgroundLaunches,
                                         request: pytest.FixtureRequest) -> None:
    result = background_launches.result(request.node.nodeid)
    assert result.returncode != 0
    assert 'tta_model' in result.stderr and 'tta_pipeline' in result.stderr


@pytest.mark.parametrize('script, nargs', [('dist_train.sh', 2), ('dist_test.sh', 3)])
def test_dist_wrappers_print_usage_when_arguments_are_missing(script: str, nargs: int) -> None:
    result = subprocess.run([f'tools/{script}', *['x'] * (nargs - 1)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and 'usage' in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason='SyncBN is kept on a CUDA machine')
def test_prepare_for_device_turns_nested_sync_bn_into_bn() -> None:
    cfg = Config(dict(model=dict(
        backbone=dict(norm_cfg=dict(type='SyncBN', requires_grad=True)),
        decode_head=[dict(norm_cfg=dict(type='SyncBN')), dict(norm_cfg=dict(type='LN'))],
        neck=dict(convs=(dict(norm_cfg=dict(type='SyncBN', momentum=0.1)), )))))
    changes = prepare_for_device(cfg, 'none')
    assert any('SyncBN' in change for change in changes)
    assert cfg.model.backbone.norm_cfg == dict(type='BN', requires_grad=True)
    assert cfg.model.decode_head[0].norm_cfg.type == 'BN' and cfg.model.decode_head[1].norm_cfg.type == 'LN'
    assert cfg.model.neck.convs[0].norm_cfg == dict(type='BN', momentum=0.1)
    assert 'SyncBN' not in cfg.pretty_text
