"""Nothing lost on a crash: atomic checkpoint files and a resume that survives a kill.

* ``AtomicLocalBackend``: mmengine's local file backend, but every write goes to a temporary file in the same folder,
  is flushed to disk and then renamed over the target (:func:`vssm.fileio.atomic_write`). A run killed while saving
  leaves the previous ``iter_N.pth`` intact and never a half-written one under a checkpoint's name.
  ``use_atomic_checkpoints()`` installs it for local paths (tools/train.py does).
* ``resolve_resume``: what ``--resume`` without a path resumes from: mmengine's ``last_checkpoint`` when it names a
  readable checkpoint, else the newest readable ``iter_*.pth`` / ``epoch_*.pth`` of the work dir (a kill between
  saving a checkpoint and writing ``last_checkpoint`` can leave that file empty or stale).

The generator states that make a resumed run draw the same random numbers are saved by
:class:`vssm.engine.hooks.RNGStateHook`.
"""
import glob
import os.path as osp
import re
from pathlib import Path
from typing import Optional, Union

from mmengine.fileio.backends import LocalBackend, register_backend
from mmengine.logging import print_log

from ..fileio import atomic_write, is_readable_checkpoint

__all__ = ['AtomicLocalBackend', 'use_atomic_checkpoints', 'resolve_resume']


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
