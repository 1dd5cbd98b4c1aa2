"""tools/benchmarks/multi_gpu_check.py and vssm.engine.hooks.RankAgreementHook: the checksum comparison, the hook on a
single process, the script's option checks, and (slow) the whole check on 2 CPU processes over gloo."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO_ROOT, load_tool
from mmengine.registry import HOOKS

from vssm.engine.hooks import RankAgreementHook, compare_checksums, model_checksums

tool = load_tool('tools/benchmarks/multi_gpu_check.py')


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def test_checksums_name_parameters_then_buffers_and_flag_the_rank_that_differs():
    params, buffers, sums = model_checksums(_model())
    assert params == ['0.weight', '0.bias', '1.weight', '1.bias']
    assert buffers == ['1.running_mean', '1.running_var', '1.num_batches_tracked']
    assert sums.shape == (7, 2) and sums.dtype == torch.float64
    other = sums.clone()
    other[1, 0] += 1e-3
    diff, rel = compare_checksums([sums, sums.clone(), other])
    assert torch.nonzero(diff).flatten().tolist() == [1]
    assert rel[1] == pytest.approx(1e-3 / float(sums[1, 1]))


def _runner(tmp_path, model):
    return SimpleNamespace(model=model, work_dir=str(tmp_path), iter=3)


def test_hook_records_every_check_once_and_raises_on_differing_parameters(tmp_path, monkeypatch):
    assert HOOKS.get('RankAgreementHook') is RankAgreementHook  # registered by importing vssm
    model, hook = _model(), RankAgreementHook(interval=2)
    runner = _runner(tmp_path, model)
    hook.before_train(runner)
    hook.after_train_iter(runner, 3)  # iteration 4: a multiple of 2
    runner.iter = 4
    hook.after_train(runner)  # iteration 4 again: not checked twice
    records = [json.loads(line) for line in (tmp_path / 'rank_agreement.jsonl').read_text().splitlines()]
    assert [(r['iter'], r['world_size'], r['params_agree'], r['parameters'], r['buffers']) for r in records] == [
        (4, 1, True, 4, 3)]

    import vssm.engine.hooks as module

    def two_ranks_one_off(sums):
        off = sums.clone()
        off[2, 1] *= 1.5  # '1.weight' differs on "rank 1"
        return [sums, off]

    monkeypatch.setattr(module, 'get_world_size', lambda: 2)
    monkeypatch.setattr(module, 'all_gather', two_ranks_one_off)
    with pytest.raises(RuntimeError, match=r"DIFFER \(1: \['1.weight'\]\).*find_unused_parameters"):
        hook.check(runner, 5)
    record = RankAgreementHook(strict=False).check(runner, 6)
    assert not record['params_agree'] and record['params_differing'] == ['1.weight']


@pytest.mark.parametrize('kwargs, message', [(dict(interval=-1), 'interval must be >= 0'),
                                             (dict(rtol=-1.0), 'rtol must be >= 0')])
def test_hook_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankAgreementHook(**kwargs)


@pytest.mark.parametrize('argv', [['--gpus', '1'], ['--iters', '3'], ['--iters', '0'], ['--parallel', '0']])
def test_bad_options_are_refused(argv):
    with pytest.raises(SystemExit):
        tool.parse_args(['--work-dir', 'x', *argv])


def test_config_adds_the_hook_to_the_task_config(tmp_path):
    from mmengine.config import Config
    path = tool.write_config('seg', 'vmamba-t', tmp_path, interval=5)
    cfg = Config.fromfile(str(path))
    assert cfg.model.backbone.type == 'mmpretrain.VMamba'
    assert [h['type'] for h in cfg.custom_hooks] == ['mmengine.RNGStateHook', 'mmengine.RankAgreementHook']
    assert cfg.custom_hooks[1]['interval'] == 5


@pytest.mark.slow
def test_two_processes_agree_resume_and_test(tmp_path):
    """The segmentation demo of VMamba-T with 2 gloo processes: 2 iterations, resumed from iteration 1, tested."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop('PORT', None)
    result = subprocess.run(
        [sys.executable, 'tools/benchmarks/multi_gpu_check.py', '--work-dir', str(tmp_path), '--tasks', 'seg',
         '--backbones', 'vmamba-t', '--iters', '2'], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    run, = json.loads((tmp_path / 'summary.json').read_text())['runs']
    assert run['ok'] and run['ranks_agree'] and run['resume_ranks_agree'] and run['resumed']
    assert run['resume_first_logged_iter'] == 2 and run['metrics']['mIoU'] >= 0
    assert [c['iter'] for c in run['rank_checks']] == [1, 2] and {c['world_size'] for c in run['rank_checks']} == {2}
    assert not list(tmp_path.rglob('*.pth'))
    assert '| seg | vmamba-t | True / True | 2 |' in (tmp_path / 'summary.md').read_text()
