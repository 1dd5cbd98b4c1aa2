"""tools/benchmarks/learning_runs.py: the options it passes to the launchers, the baseline verdicts, and (slow) a
whole run of the Swin-T baseline on every task for 2 iterations producing the summary, the table and the loss PNGs."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO_ROOT, load_tool


def _load_tool() -> ModuleType:
    return load_tool('tools/benchmarks/learning_runs.py')


tool = _load_tool()


def _options(options):
    return dict(option.split('=', 1) for option in options)


def test_every_config_exists():
    for task in tool.TASKS.values():
        assert set(task.configs) == set(tool.BACKBONES)
        for config in task.configs.values():
            assert (REPO_ROOT / config).is_file(), config


def test_schedule_is_the_demo_recipe_stretched_to_the_budget():
    options = _options(tool.schedule_options(300, log_interval=5, seed=3, batch=16, lr=2e-4))
    assert options['train_cfg.max_iters'] == options['param_scheduler.1.end'] == '300'
    assert options['param_scheduler.0.end'] == options['param_scheduler.1.begin'] == '10'
    assert options['default_hooks.checkpoint.interval'] == '300'
    assert options['default_hooks.checkpoint.save_optimizer'] == 'False'
    assert options['val_dataloader'] == options['val_cfg'] == options['val_evaluator'] == 'None'  # the test measures
    assert options['default_hooks.logger.interval'] == '5' and options['randomness.seed'] == '3'
    assert options['train_dataloader.batch_size'] == '16' and options['optim_wrapper.optimizer.lr'] == '0.0002'
    short = _options(tool.schedule_options(2, log_interval=5, seed=0, batch=2, lr=1e-4))  # warm-up and logging fit in 2 iterations
    assert short['param_scheduler.0.end'] == '1' and short['param_scheduler.1.end'] == '2'
    assert short['default_hooks.logger.interval'] == '2'


def test_data_options_point_the_datasets_and_the_coco_evaluator_at_the_data(tmp_path):
    assert tool.data_options('det', tmp_path, 'train') == [f'train_dataloader.dataset.data_root={tmp_path}/coco/']
    assert _options(tool.data_options('det', tmp_path, 'test')) == {
        'test_dataloader.dataset.data_root': f'{tmp_path}/coco/',
        'test_evaluator.ann_file': f'{tmp_path}/coco/annotations/instances_val2017.json'}
    assert tool.data_options('seg', tmp_path, 'test') == [
        f'test_dataloader.dataset.data_root={tmp_path}/ade/ADEChallengeData2016']
    assert tool.data_options('cls', tmp_path, 'train') == [f'train_dataloader.dataset.data_root={tmp_path}/imagenet']


def test_dry_run_prints_one_train_and_one_test_command_per_run(tmp_path, capsys):
    assert tool.main(['--work-dir', str(tmp_path), '--dry-run', '--tasks', 'seg', '--seg-iters', '7', '--tta']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(tool.BACKBONES)
    assert all(line.startswith('tools/dist_train.sh') for line in lines[::2])
    assert all(line.startswith('tools/dist_test.sh') and '--tta' in line for line in lines[1::2])
    assert 'train_cfg.max_iters=7' in lines[0] and ' 1 --demo ' in lines[0]
    seg = tool.TASKS['seg']
    assert f'train_dataloader.batch_size={seg.default_batch}' in lines[0]
    assert f'optim_wrapper.optimizer.lr={seg.default_lr}' in lines[0]
    spectral = [line for line in lines[::2] if 'spectral' in line]
    assert len(spectral) == 1 and 'model.backbone.rfn_frozen=False' in spectral[0]
    assert sum('rfn_frozen' in line for line in lines) == 1
    assert not (tmp_path / 'data').exists()


@pytest.mark.parametrize('option', [['--det-iters', '0'], ['--cls-batch', '0'], ['--seg-lr', '0'],
                                    ['--data-scale', '0']])
def test_bad_budget_is_refused(option):
    with pytest.raises(SystemExit):
        tool.parse_args(['--work-dir', 'x', *option])


def _job(task, backbone, metrics):
    job = tool.Job(task, backbone, tool.TASKS[task].configs[backbone], 2, 2, 1e-4, Path('.'))
    job.metrics = metrics
    return job


def test_meets_baseline_needs_every_metric_of_the_task():
    jobs = [_job('det', 'swin-t', {'coco/bbox_mAP': 0.5, 'coco/segm_mAP': 0.4}),
            _job('det', 'vmamba-t', {'coco/bbox_mAP': 0.6, 'coco/segm_mAP': 0.4}),
            _job('det', 'spatial-mamba-t', {'coco/bbox_mAP': 0.6, 'coco/segm_mAP': 0.3}),
            _job('det', 'spectral-vmamba-t', None)]  # failed
    assert tool.meets_baseline(jobs) == {'det': {'vmamba-t': True, 'spatial-mamba-t': False,
                                                 'spectral-vmamba-t': None}}
    assert tool.meets_baseline(jobs[1:]) == {'det': dict.fromkeys(['vmamba-t', 'spatial-mamba-t',
                                                                   'spectral-vmamba-t'])}
    jobs[3].metrics = {}  # mmdet's CocoMetric returns {} when nothing was detected
    assert tool.meets_baseline(jobs)['det']['spectral-vmamba-t'] is False


@pytest.mark.slow
def test_baseline_on_every_task_writes_summary_table_and_loss_curves(tmp_path):
    """The Swin-T baseline configs with --demo through the launchers (2 iterations, 1 process each)."""
    work_dir = tmp_path / 'learning'
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop('PORT', None)
    result = subprocess.run(
        [sys.executable, 'tools/benchmarks/learning_runs.py', '--work-dir', str(work_dir), '--backbones', 'swin-t',
         '--cls-iters', '2', '--det-iters', '2', '--seg-iters', '2', '--parallel', '3', '--data-scale', '2',
         '--cls-batch', '8', '--seg-batch', '2'],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    summary = json.loads((work_dir / 'summary.json').read_text())
    assert [(r['task'], r['status']) for r in summary['runs']] == [('cls', 'ok'), ('det', 'ok'), ('seg', 'ok')]
    for run in summary['runs']:
        for key, _ in tool.TASKS[run['task']].metrics:
            assert math.isfinite(run['metrics'][key]), (key, run)
        assert math.isfinite(run['last_loss']) and run['s_per_iter'] > 0
        assert (Path(run['work_dir']) / 'train.log').is_file() and (Path(run['work_dir']) / 'test.log').is_file()
        assert not list(Path(run['work_dir']).rglob('*.pth'))  # deleted after the test
    for task, info in summary['tasks'].items():
        assert info['iters'] == 2 and info['batch'] == {'cls': 8, 'det': 2, 'seg': 2}[task]
        assert Path(info['loss_curve']).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert summary['data_scale'] == 2
    table = (work_dir / 'summary.md').read_text()
    assert '| swin-t |' in table and 'mIoU (%)' in table and 'bbox mAP' in table
