"""Nothing lost on a crash: a training run killed with SIGKILL between checkpoints resumes with ``--resume`` and, in
deterministic mode, reproduces the loss curve of an uninterrupted run; checkpoint files are written atomically; a
stale or truncated ``last_checkpoint`` does not stop a resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

from vssm.engine.resume import AtomicLocalBackend, resolve_resume
from vssm.fileio import atomic_write, is_readable_checkpoint

CONFIG = 'classification/configs/vmamba/vmamba-tiny_8xb128_in1k.py'  # drop path 0.2: random numbers every step
ITERS, INTERVAL = 6, 2


def _command(work_dir: Path, *extra: str):
    return [sys.executable, 'tools/train.py', CONFIG, '--demo', '--work-dir', str(work_dir), *extra, '--cfg-options',
            f'train_cfg.max_iters={ITERS}', 'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
            f'default_hooks.checkpoint.interval={INTERVAL}', 'default_hooks.checkpoint.max_keep_ckpts=10',
            'default_hooks.logger.interval=1', 'randomness.deterministic=True', 'train_dataloader.batch_size=2']


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT))


def _losses(work_dir: Path) -> dict:
    """iteration -> loss over every run (timestamped folder) in the work dir."""
    losses = {}
    for path in sorted(work_dir.glob('*/vis_data/scalars.json')):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if 'loss' in record:
                losses[record['step']] = record['loss']
    return losses


@pytest.fixture(scope='module', autouse=True)
def demo_data():
    subprocess.run([sys.executable, 'tools/make_demo_data.py', '--out', 'data/demo'], cwd=REPO_ROOT, check=True,
                   capture_output=True)


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_reproduces_the_loss_curve(tmp_path):
    straight = tmp_path / 'straight'
    subprocess.run(_command(straight), cwd=REPO_ROOT, env=_env(), check=True, capture_output=True, timeout=900)
    reference = _losses(straight)
    assert sorted(reference) == list(range(1, ITERS + 1))

    crashed = tmp_path / 'crashed'
    log = open(tmp_path / 'crashed.log', 'w')
    process = subprocess.Popen(_command(crashed), cwd=REPO_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    kill_after = INTERVAL + 1  # one iteration past the first checkpoint: mid-way to the next one
    deadline = time.time() + 900
    while time.time() < deadline and process.poll() is None and max(_losses(crashed), default=0) < kill_after:
        time.sleep(0.05)
    assert process.poll() is None, 'the run ended before it could be killed'
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = max(_losses(crashed))
    assert INTERVAL < done < 2 * INTERVAL, done  # killed between checkpoints
    assert (crashed / f'iter_{INTERVAL}.pth').is_file() and not (crashed / f'iter_{2 * INTERVAL}.pth').exists()
    assert is_readable_checkpoint(str(crashed / f'iter_{INTERVAL}.pth'))

    result = subprocess.run(_command(crashed, '--resume'), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f'resumed epoch: 0, iter: {INTERVAL}' in result.stdout + result.stderr
    resumed = _losses(crashed)
    assert sorted(resumed) == list(range(1, ITERS + 1))
    for step in range(1, ITERS + 1):  # the iterations before the kill, and those run again after the resume
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (step, resumed, reference)
    assert not list(crashed.glob('.*.tmp'))


def test_rng_states_are_in_checkpoints_and_load_weights_only(tmp_path):
    from vssm.engine.hooks import RNGStateHook
    from vssm.fileio import register_safe_globals
    checkpoint = {}
    RNGStateHook().before_save_checkpoint(None, checkpoint)
    path = tmp_path / 'ckpt.pth'
    torch.save(checkpoint, path)
    register_safe_globals()
    loaded = torch.load(path, weights_only=True)
    hook = RNGStateHook()
    hook.after_load_checkpoint(None, loaded)
    expected = torch.rand(3)  # what the next draw is after the save
    torch.rand(5)  # the generator moves on
    hook.before_train_iter(None, 0)
    assert torch.equal(torch.rand(3), expected)


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / 'iter_1.pth'
    atomic_write(b'old complete checkpoint', target)

    def crash(src, dst):
        raise KeyboardInterrupt  # killed between writing the temporary file and the rename

    monkeypatch.setattr(os, 'replace', crash)
    with pytest.raises(KeyboardInterrupt):
        AtomicLocalBackend().put(b'new checkpoint', target)
    assert target.read_bytes() == b'old complete checkpoint'
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


def test_resume_skips_a_stale_last_checkpoint_and_truncated_files(tmp_path):
    good = tmp_path / 'iter_4.pth'
    torch.save({'meta': {'iter': 4}}, good)
    truncated = tmp_path / 'iter_8.pth'
    truncated.write_bytes(good.read_bytes()[:100])  # what a non-atomic writer leaves after a kill
    (tmp_path / 'last_checkpoint').write_text('')  # killed while writing it
    assert not is_readable_checkpoint(str(truncated))
    assert resolve_resume(str(tmp_path)) == str(good)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_12.pth'))  # names a file that is gone
    assert resolve_resume(str(tmp_path)) == str(good)
    (tmp_path / 'last_checkpoint').write_text(str(good))
    assert resolve_resume(str(tmp_path)) == str(good)
    assert resolve_resume(str(tmp_path / 'empty')) is None
