"""The launchers (tools/dist_train.sh, dist_test.sh, slurm_train.sh, slurm_test.sh) without running a model: argument
errors that name what is missing, paths from the caller's directory, the rendezvous variables (PORT 29500 on every
node), srun's command line. A stand-in interpreter (and srun) records what the scripts would run."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_runs import REPO_ROOT, config  # noqa: E402

RECORDER = r'''#!/usr/bin/env bash
# Records its arguments, working directory and environment as one JSON line; answers the launchers' port probe.
[ "$1" = "-c" ] && exit 0
"{python}" - "$@" <<'PY' >> "{log}"
import json, os, sys
print(json.dumps(dict(argv=sys.argv[1:], cwd=os.getcwd(), env={{k: os.environ.get(k) for k in (
    'VSSM_CALLER_DIR', 'MASTER_PORT', 'OMP_NUM_THREADS', 'PYTHONPATH')}})))
PY
'''


@pytest.fixture
def recorder(tmp_path: Path):
    """(environment for the scripts, a function returning the recorded calls)."""
    log = tmp_path / 'calls.jsonl'
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name in ('python', 'srun'):
        path = bin_dir / name
        path.write_text(RECORDER.format(python=sys.executable, log=log))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k not in ('PORT', 'NNODES', 'NODE_RANK', 'MASTER_ADDR',
                                                                'MASTER_PORT', 'VSSM_CALLER_DIR')}
    env.update(PYTHON=str(bin_dir / 'python'), PATH=f'{bin_dir}:{env["PATH"]}')

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls


def _script(name: str, *args, cwd: Path, env: dict, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO_ROOT / 'tools' / name), *map(str, args)], cwd=cwd, env={**env, **extra},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize('script, args, message', [
    ('dist_train.sh', [], 'CONFIG is missing'),
    ('dist_train.sh', ['--demo'], 'CONFIG is missing'),
    ('dist_train.sh', ['cfg.py'], 'NGPUS is missing'),
    ('dist_train.sh', ['cfg.py', '--demo'], 'NGPUS is missing'),
    ('dist_train.sh', ['cfg.py', 'two'], "NGPUS must be a positive integer, got 'two'"),
    ('dist_train.sh', ['nope.py', '2'], "config file '{cwd}/nope.py' does not exist"),
    ('dist_test.sh', ['cfg.py'], 'CHECKPOINT and NGPUS are missing'),
    ('dist_test.sh', ['cfg.py', '2', '--demo'], "CHECKPOINT is missing: '2' stands where the checkpoint goes"),
    ('dist_test.sh', ['cfg.py', '2'], 'CHECKPOINT is missing'),
    ('dist_test.sh', ['cfg.py', 'ckpt.pth', '--tta'], 'NGPUS is missing'),
    ('dist_test.sh', ['cfg.py', 'nope.pth', '2'], "checkpoint '{cwd}/nope.pth' does not exist"),
    ('slurm_train.sh', ['part', 'job'], 'missing: CONFIG WORK_DIR'),
    ('slurm_test.sh', ['part', 'job', 'cfg.py', '--tta'], 'missing: CHECKPOINT'),
], ids=lambda v: ' '.join(v) if isinstance(v, list) else None)
def test_argument_errors_name_what_is_missing(recorder, tmp_path, script, args, message):
    env, calls = recorder
    (tmp_path / 'cfg.py').write_text('')
    (tmp_path / 'ckpt.pth').write_text('')
    result = _script(script, *args, cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert message.format(cwd=tmp_path) in result.stderr and f'usage: tools/{script}' in result.stderr
    assert calls() == []  # nothing was launched


def test_paths_are_taken_from_the_callers_directory_and_port_is_29500(recorder, tmp_path):
    env, calls = recorder
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'mine.py').write_text('')
    (tmp_path / 'ckpt.pth').write_text('')
    _script('dist_train.sh', 'configs/mine.py', 2, '--work-dir', 'wd', cwd=tmp_path, env=env)
    _script('dist_test.sh', 'configs/mine.py', 'ckpt.pth', 1, '--tta', cwd=tmp_path, env=env)
    train, test = calls()
    assert train['argv'][:6] == ['-m', 'torch.distributed.run', '--nnodes=1', '--node_rank=0',
                                 '--master_addr=127.0.0.1', '--nproc_per_node=2']
    assert '--master_port=29500' in train['argv']
    assert train['argv'][-6:] == [str(REPO_ROOT / 'tools/train.py'), str(tmp_path / 'configs/mine.py'), '--launcher',
                                  'pytorch', '--work-dir', 'wd']  # tools/train.py resolves --work-dir (below)
    assert test['argv'][-6:] == [str(REPO_ROOT / 'tools/test.py'), str(tmp_path / 'configs/mine.py'),
                                 str(tmp_path / 'ckpt.pth'), '--launcher', 'pytorch', '--tta']
    for call in (train, test):
        assert call['cwd'] == str(REPO_ROOT) and call['env']['VSSM_CALLER_DIR'] == str(tmp_path)


def test_nodes_share_master_addr_and_port(recorder, tmp_path):
    env, calls = recorder
    cfg = config('classification')
    for rank in (0, 1):
        result = _script('dist_train.sh', cfg, 4, cwd=tmp_path, env=env, NNODES='2', NODE_RANK=str(rank),
                         MASTER_ADDR='10.0.0.1')
        assert result.returncode == 0, result.stderr
    for rank, call in enumerate(calls()):
        assert {'--nnodes=2', f'--node_rank={rank}', '--master_addr=10.0.0.1', '--master_port=29500',
                '--nproc_per_node=4'} <= set(call['argv'])
    result = _script('dist_train.sh', cfg, 4, cwd=tmp_path, env=env, NNODES='2', NODE_RANK='1')
    assert result.returncode == 2 and 'set MASTER_ADDR to the address of the node with NODE_RANK=0' in result.stderr
    result = _script('dist_train.sh', cfg, 4, cwd=tmp_path, env=env, NNODES='2', NODE_RANK='2', MASTER_ADDR='x')
    assert result.returncode == 2 and 'NODE_RANK must be one of 0..1' in result.stderr
    _script('dist_train.sh', cfg, 1, cwd=tmp_path, env=env, PORT='12345')
    assert '--master_port=12345' in calls()[-1]['argv']


def test_slurm_scripts_run_srun_with_the_launcher_and_absolute_paths(recorder, tmp_path):
    env, calls = recorder
    (tmp_path / 'ckpt.pth').write_text('')
    result = _script('slurm_train.sh', 'gpu', 'job', config('detection'), 'wd', '--amp', cwd=tmp_path, env=env,
                     GPUS='16', SRUN_ARGS='--time=10 --qos=high')
    assert result.returncode == 0, result.stderr
    result = _script('slurm_test.sh', 'gpu', 'job', config('detection'), 'ckpt.pth', '--tta', cwd=tmp_path, env=env,
                     GPUS='4', PORT='29600')
    assert result.returncode == 0, result.stderr
    train, test = calls()
    assert train['argv'][:10] == ['-p', 'gpu', '--job-name=job', '--gres=gpu:8', '--ntasks=16', '--ntasks-per-node=8',
                                  '--cpus-per-task=5', '--kill-on-bad-exit=1', '--time=10', '--qos=high']
    assert train['argv'][-5:] == [str(REPO_ROOT / 'tools/train.py'), config('detection'),
                                  f'--work-dir={tmp_path / "wd"}', '--launcher=slurm', '--amp']
    assert train['env']['MASTER_PORT'] == '29500' and train['cwd'] == str(REPO_ROOT)
    assert '--gres=gpu:4' in test['argv'] and '--ntasks=4' in test['argv']
    assert test['argv'][-5:] == [str(REPO_ROOT / 'tools/test.py'), config('detection'), str(tmp_path / 'ckpt.pth'),
                                 '--launcher=slurm', '--tta']
    assert test['env']['MASTER_PORT'] == '29600'


def test_tools_resolve_path_options_against_the_callers_directory(tmp_path, monkeypatch):
    from conftest import load_tool
    monkeypatch.setenv('VSSM_CALLER_DIR', str(tmp_path))
    train = load_tool('tools/train.py').parse_args(['c.py', '--work-dir', 'wd', '--resume', 'ckpt/iter_2.pth'])
    assert (train.config, train.work_dir, train.resume) == (
        str(tmp_path / 'c.py'), str(tmp_path / 'wd'), str(tmp_path / 'ckpt/iter_2.pth'))
    assert load_tool('tools/train.py').parse_args(['/abs/c.py', '--resume']).resume == 'auto'
    test = load_tool('tools/test.py').parse_args(['c.py', 'k.pth', '--out', 'p.pkl', '--show-dir', 'vis'])
    assert (test.checkpoint, test.out, test.show_dir) == (
        str(tmp_path / 'k.pth'), str(tmp_path / 'p.pkl'), str(tmp_path / 'vis'))
