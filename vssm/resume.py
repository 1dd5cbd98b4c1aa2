"""Nothing lost on a crash: atomic checkpoint files, RNG states in checkpoints, and a resume that survives a kill.

* ``AtomicLocalBackend``: mmengine's local file backend, but every write goes to a temporary file in the same folder,
  is flushed to disk and then renamed over the target (``os.replace`` is atomic on POSIX and Windows). A run killed
  while saving leaves the previous ``iter_N.pth`` intact and never a half-written one under a checkpoint's name.
  ``use_atomic_checkpoints()`` installs it for local paths (tools/train.py does).
* ``RNGStateHook``: saves the Python, NumPy, torch and CUDA generator states in each checkpoint (rank 0's: mmengine
  saves on rank 0) and restores them right before the first iteration after a resume, so a resumed single-process
  run in deterministic mode draws the same random numbers (drop path, mixup, ...) as an uninterrupted one.
* ``resolve_resume``: what ``--resume`` without a path resumes from: mmengine's ``last_checkpoint`` when it names a
  readable checkpoint, else the newest readable ``iter_*.pth`` / ``epoch_*.pth`` of the work dir (a kill between
  saving a checkpoint and writing ``last_checkpoint`` can leave that file empty or stale).
"""
import glob
import os
import os.path as osp
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.fileio.backends import LocalBackend, register_backend
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

__all__ = ['AtomicLocalBackend', 'use_atomic_checkpoints', 'atomic_write', 'RNGStateHook', 'resolve_resume',
           'is_readable_checkpoint']


def atomic_write(data: Union[bytes, str], path: Union[str, Path], encoding: str = 'utf-8') -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the complete new one, never a part."""
    path = str(path)
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = data.encode(encoding) if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


class AtomicLocalBackend(LocalBackend):
    """mmengine's ``LocalBackend`` whose ``put``/``put_text`` write atomically (see ``atomic_write``)."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        atomic_write(obj, filepath)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
        atomic_write(obj, filepath, encoding)


def use_atomic_checkpoints() -> None:
    """Make mmengine write local files (checkpoints included) through ``AtomicLocalBackend``."""
    from mmengine.fileio import io as mmengine_io
    register_backend('local', AtomicLocalBackend, force=True)
    mmengine_io.backend_instances.clear()  # drop LocalBackend instances created before


# ---------------------------------------------------------------------------------------------------------------------
# Random generator states
# ---------------------------------------------------------------------------------------------------------------------
def _capture_rng() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(
        python=random.getstate(),
        numpy=(name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def _restore_rng(state: dict) -> None:
    """Restore ``_capture_rng()``'s states. The tensors may be on a GPU: mmengine's resume loads the checkpoint with
    ``map_location='default'`` (the current device), and the generators take CPU byte tensors."""
    random.setstate(state['python'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'].cpu())
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Save the generator states in checkpoints; restore them when training resumes (see the module doc).

    mmengine saves checkpoints on rank 0 only, so a checkpoint holds rank 0's states: a single-process run resumes
    bit-reproducibly; in a multi-process run rank 0 gets its states back and the other ranks keep their seeded
    generators (a warning says so). No collective is added to the training loop.
    """

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._pending: Optional[dict] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint['rng_states'] = [_capture_rng()]

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        states = checkpoint.get('rng_states')
        if not states:
            return
        if get_world_size() > 1:
            print_log(f'RNGStateHook: the checkpoint holds rank 0\'s generator states; restoring them on rank 0 only '
                      f'({get_world_size()} processes: the run is not bit-reproducible on the other ranks).',
                      logger='current', level=30)
        if get_rank() == 0:
            self._pending = states[0]

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._pending is not None:  # after the data loader was rebuilt and advanced: as in the first run
            _restore_rng(self._pending)
            self._pending = None


# ---------------------------------------------------------------------------------------------------------------------
# What to resume from
# ---------------------------------------------------------------------------------------------------------------------
def is_readable_checkpoint(path: str) -> bool:
    """Whether ``path`` is a complete torch checkpoint: a zip archive whose central directory (written last, at the
    end of the file) reads. Only the directory is read, not the tensors (checkpoints can be gigabytes)."""
    if not osp.isfile(path) or osp.getsize(path) == 0:
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return len(archive.namelist()) > 0
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def _step(path: str) -> int:
    match = re.search(r'(?:iter|epoch)_(\d+)\.pth$', path)
    return int(match.group(1)) if match else -1


def resolve_resume(work_dir: str) -> Optional[str]:
    """The checkpoint ``--resume`` (without a path) continues from, or None when the work dir has none."""
    named = None
    last = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(last):
        with open(last) as f:
            named = f.read().strip() or None
    if named and is_readable_checkpoint(named):
        return named
    candidates = sorted(glob.glob(osp.join(work_dir, 'iter_*.pth')) + glob.glob(osp.join(work_dir, 'epoch_*.pth')),
                        key=_step, reverse=True)
    for candidate in candidates:
        if is_readable_checkpoint(candidate):
            reason = f'{last} names {named!r}, which is missing or unreadable' if named else f'no usable {last}'
            print_log(f'resume: {reason}; resuming from the newest readable checkpoint {candidate}.',
                      logger='current', level=30)
            return candidate
        print_log(f'resume: skipping {candidate}: not a complete checkpoint (truncated?).', logger='current',
                  level=30)
    return None
