"""Checkpoint files: safe loading under ``weights_only=True``, a readability check, atomic writes.

Used by the models (``init_cfg`` Pretrained loading), the engine (resume, the runner's strict loading) and the tools.
``import vssm`` calls :func:`register_safe_globals`, so the libraries' own loaders (mmpretrain's, mmdet's and mmseg's
Inferencers, ``publish_model``) read mmengine checkpoints under torch >= 2.6 too.
"""
import codecs
import os
import os.path as osp
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Union

import numpy as np
import torch

__all__ = ['atomic_write', 'is_readable_checkpoint', 'register_safe_globals']


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


def _history_buffer_method(owner: type, name: str):
    """The only ``getattr`` that mmengine checkpoints need: HistoryBuffer's statistics methods."""
    from mmengine.logging import HistoryBuffer
    if owner is not HistoryBuffer or name not in ('min', 'max', 'current', 'mean'):
        raise pickle.UnpicklingError(f'refusing getattr({owner!r}, {name!r}) in a weights_only checkpoint')
    return getattr(owner, name)


def register_safe_globals() -> None:
    """Allow what mmengine checkpoints contain under ``torch.load(weights_only=True)``, and nothing more.

    Found by saving checkpoints with the Runner (optimizer, schedulers, message hub) and disassembling
    them: the message hub's ``HistoryBuffer`` logs hold numpy arrays and scalars, and their statistics
    methods are pickled as ``getattr(HistoryBuffer, 'min')``. ``getattr`` itself is never allowed: its
    name is bound to a function that only returns those four methods.
    """
    from mmengine.logging import HistoryBuffer
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    dtypes = [type(np.dtype(t)) for t in ('float64', 'float32', 'float16', 'int64', 'int32', 'uint8', 'bool')]
    # Pickles written under numpy 1 name these numpy.core.multiarray.*, under numpy 2 numpy._core.multiarray.*.
    aliases = [(fn, f'{module}.{fn.__name__}') for fn in (_reconstruct, scalar)
               for module in ('numpy.core.multiarray', 'numpy._core.multiarray')]
    torch.serialization.add_safe_globals([
        HistoryBuffer, np.ndarray, np.dtype, codecs.encode, *dtypes, *aliases,
        (_history_buffer_method, '__builtin__.getattr'), (_history_buffer_method, 'builtins.getattr')
    ])
