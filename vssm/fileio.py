"""Checkpoint files: safe loading under ``weights_only=True``, a readability check, atomic writes.

Used by the models (``init_cfg`` Pretrained loading), the engine (resume, the runner's strict loading) and the tools.
``import vssm`` calls :func:`register_safe_globals` and :func:`register_checkpoint_check`, so the libraries' own
loaders (mmpretrain's, mmdet's and mmseg's Inferencers, ``init_detector``, ``load_checkpoint``) read mmengine
checkpoints under torch >= 2.6 too, and a truncated file fails with one sentence that says so instead of torch's
zip error.
"""
import codecs
import os
import os.path as osp
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

__all__ = ['UserInputError', 'MissingFileError', 'CheckpointFileError', 'CheckpointMismatchError',
           'InvalidOptionError', 'atomic_write',
           'is_readable_checkpoint', 'checkpoint_problem', 'check_checkpoint_file', 'load_checkpoint_file',
           'register_checkpoint_check', 'register_safe_globals']



class UserInputError(Exception):
    """A problem with what the user gave (a file, a config, an option) whose message says what to do: the tools print
    the message alone, without a traceback (:func:`vssm.engine.launch.run_tool`)."""


class MissingFileError(UserInputError, FileNotFoundError):
    """A file the user named (config, checkpoint, data) does not exist."""


class CheckpointFileError(UserInputError, ValueError):
    """A checkpoint file that is empty, truncated, corrupt or holds objects that weights_only loading refuses."""


class CheckpointMismatchError(UserInputError, ValueError):
    """A checkpoint whose weights do not fit the model of the config (another task, family, size or head)."""


class InvalidOptionError(UserInputError, ValueError):
    """A command-line option or config value that cannot work, with the fix in the message."""


# The first bytes of a checkpoint in torch's pre-1.6 format (a pickle protocol 2 header and torch's magic number).
_LEGACY_MAGIC = b'\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19'


def atomic_write(data: Union[bytes, str], path: Union[str, Path], encoding: str = 'utf-8') -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or the complete new one, never a part."""
    path = str(path)
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = data.encode(encoding) if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.', suffix='.tmp', dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # the permissions open() would give, not mkstemp's owner-only 0600
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


def checkpoint_problem(path: str) -> Optional[str]:
    """What is wrong with the file at ``path`` as a torch checkpoint, or None when it looks complete.

    Zip archives (torch >= 1.6) are complete when their central directory reads; files in the pre-1.6 format are
    accepted as they are (only loading them can tell).
    """
    if not osp.exists(path):
        return 'does not exist'
    if not osp.isfile(path):
        return 'is not a file'
    size = osp.getsize(path)
    if size == 0:
        return 'is empty (0 bytes)'
    if is_readable_checkpoint(path):
        return None
    with open(path, 'rb') as f:
        if f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC:
            return None
    return f'is truncated or corrupt ({size} bytes, not a complete torch zip archive)'


def check_checkpoint_file(path: str, what: str = 'checkpoint', fix: str = 'copy or download it again') -> None:
    """Raise at once, in one sentence that names the fix, when ``path`` is missing or not a complete checkpoint.

    Args:
        path: The file.
        what: How the message names it, e.g. ``'--resume checkpoint'``.
        fix: What to do about a truncated or corrupt file.

    Raises:
        MissingFileError: If there is no such file (a ``FileNotFoundError``).
        CheckpointFileError: If the file is empty, truncated or corrupt (a ``ValueError``).
    """
    problem = checkpoint_problem(path)
    if problem is None:
        return
    if problem == 'does not exist':
        raise MissingFileError(f'{what} {path!r} does not exist.')
    raise CheckpointFileError(f'{what} {path!r} {problem}: {fix}.')


def load_checkpoint_file(path: str, map_location: str = 'cpu', what: str = 'checkpoint',
                         fix: str = 'copy or download it again') -> dict:
    """``torch.load(path, weights_only=True)`` with the classes of mmengine checkpoints allowed, and errors that say
    what is wrong: a missing or truncated file (:func:`check_checkpoint_file`), or a pickle that holds other objects.
    """
    check_checkpoint_file(path, what, fix)
    register_safe_globals()
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointFileError(f'{what} {path!r} holds objects that weights_only loading refuses ({first}). It '
                                  'was not saved by mmengine or by the tools here; if you trust its source, load it '
                                  'with torch.load(..., weights_only=False) and save its state_dict again.') from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointFileError(f'{what} {path!r} could not be read ({reason}): {fix}.') from error


def register_checkpoint_check() -> None:
    """Make mmengine's loader of local checkpoint files (``CheckpointLoader``'s default scheme, used by
    ``load_checkpoint``, the Inferencers and ``init_cfg``) check the file first: a truncated or corrupt checkpoint then
    fails with :func:`check_checkpoint_file`'s message instead of torch's zip error. Idempotent."""
    from mmengine.runner.checkpoint import CheckpointLoader
    loader = CheckpointLoader._schemes.get('')
    if loader is None or getattr(loader, '_vssm_checked', False):
        return

    def load_from_local_checked(filename, map_location):
        check_checkpoint_file(osp.expanduser(filename))
        return loader(filename, map_location)

    load_from_local_checked._vssm_checked = True
    load_from_local_checked.__name__ = loader.__name__  # mmengine logs 'Loads checkpoint by local backend'
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local_checked, force=True)


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
