"""What tools/train.py and tools/test.py share before the Runner: the config, its overrides, CPU distributed runs.

* ``load_config``: read a config and apply ``--cfg-options``, ``--work-dir``, ``--demo``.
* ``prepare_for_device``: without GPUs, distributed runs use gloo, DDP without device ids, BN instead of
  SyncBN, and the process group is initialised here (mmengine's ``init_dist`` calls ``torch.cuda.set_device``).
* ``check_data_paths``: a missing dataset fails at once, naming the config key and the fix.
* ``resolve_cli_paths``: the paths given on the command line (config, checkpoint, ``--work-dir``, ...) are relative
  to the directory the user called from (``$VSSM_CALLER_DIR``, which tools/dist_*.sh and slurm_*.sh export before
  they change to the repository root), not to the repository root.
"""
import argparse
import os
import os.path as osp
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import torch
from mmengine.config import Config, DictAction

from ..fileio import InvalidOptionError, MissingFileError, UserInputError, register_safe_globals

__all__ = ['load_config', 'apply_demo_override', 'clear_pretrained', 'prepare_for_device', 'add_common_args',
           'setup_run', 'check_data_paths', 'finish_distributed', 'is_main_process', 'caller_path',
           'resolve_cli_paths', 'run_tool', 'DEMO_OVERRIDES', 'CALLER_DIR_ENV']

CALLER_DIR_ENV = 'VSSM_CALLER_DIR'

DEMO_OVERRIDES = {
    'mmpretrain': 'classification/configs/_base_/demo.py',
    'mmdet': 'detection/configs/_base_/demo.py',
    'mmseg': 'segmentation/configs/_base_/demo.py',
}


def apply_demo_override(cfg: Config, repo_root: Path) -> str:
    """Merge the task's demo override (chosen by ``default_scope``) into ``cfg``; return its path.

    The demo loads no pretrained weights: the override clears the backbone's ``init_cfg``, and
    :func:`clear_pretrained` every other Pretrained ``init_cfg`` and ``*_pretrained`` argument of the model.
    """
    scope = cfg.get('default_scope')
    if scope not in DEMO_OVERRIDES:
        raise InvalidOptionError(f'--demo: no demo override for default_scope={scope!r}; known scopes: '
                                 f'{sorted(DEMO_OVERRIDES)}.')
    path = Path(repo_root) / DEMO_OVERRIDES[scope]
    override = Config.fromfile(str(path))
    cfg.merge_from_dict(override.to_dict(), allow_list_keys=False)
    clear_pretrained(cfg.model)
    return str(path)


def clear_pretrained(node: Any) -> None:
    """Clear, in place, every way a model config could load weights: ``init_cfg`` of type Pretrained (alone or in a
    list), ``pretrained`` and ``*_pretrained`` arguments (e.g. SpectralVMamba's ``rfn_pretrained``). Initializers of
    other types stay."""
    if isinstance(node, dict):
        for key in list(node):
            value = node[key]
            items = value if isinstance(value, (list, tuple)) else [value]
            if key == 'init_cfg' and any(isinstance(i, dict) and i.get('type') == 'Pretrained' for i in items):
                node[key] = None
            elif key == 'pretrained' or key.endswith('_pretrained'):
                node[key] = None
            else:
                clear_pretrained(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            clear_pretrained(value)


def load_config(config: str, cfg_options: Optional[dict] = None, work_dir: Optional[str] = None,
                demo: bool = False, repo_root: Optional[Path] = None) -> Config:
    """Read ``config`` and apply the command-line overrides in the order a user expects.

    ``--demo`` comes first, so ``--cfg-options`` can still change the demo (e.g. ``train_cfg.max_iters=2``).
    The work dir defaults to ``work_dirs/<config name>`` (``work_dirs/<config name>_demo`` with ``--demo``).
    """
    if not osp.isfile(config):
        raise MissingFileError(f'config file {config!r} does not exist.')
    cfg = Config.fromfile(config)
    if demo:
        apply_demo_override(cfg, repo_root or Path(__file__).resolve().parents[2])
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        name = osp.splitext(osp.basename(config))[0] + ('_demo' if demo else '')
        cfg.work_dir = osp.join('work_dirs', name)
    return cfg


def _replace_sync_bn(node: Any) -> int:
    """Turn every ``type='SyncBN'`` into ``'BN'`` in a nested config; return how many were changed."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') in ('SyncBN', 'MMSyncBN', 'TorchSyncBN'):
            node['type'] = 'BN'
            count += 1
        for value in node.values():
            count += _replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += _replace_sync_bn(value)
    return count


def prepare_for_device(cfg: Config, launcher: str) -> List[str]:
    """Adapt ``cfg`` to a machine without CUDA and set the launcher; return what was changed.

    On a CPU machine a distributed run (``launcher='pytorch'`` from torchrun) uses the gloo backend,
    ``MMDistributedDataParallel`` without device ids, and BN in place of SyncBN (which has no CPU kernel).
    The process group is initialised here because mmengine's own initialisation selects a CUDA device.
    """
    cfg.launcher = launcher
    changes = []
    if torch.cuda.is_available():
        return changes
    replaced = _replace_sync_bn(cfg.model)
    if replaced:
        changes.append(f'{replaced} SyncBN layer config(s) -> BN (SyncBN has no CPU implementation)')
    if cfg.get('sync_bn'):
        cfg.sync_bn = None
        changes.append('sync_bn conversion switched off')
    if launcher != 'none':
        cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
        cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False)
        changes.append('distributed on CPU: gloo backend, DDP without device ids')
        if not torch.distributed.is_initialized():
            if launcher != 'pytorch':
                raise RuntimeError(f'launcher {launcher!r} needs GPUs here; on a CPU machine use '
                                   'tools/dist_train.sh / dist_test.sh (torchrun, launcher pytorch).')
            torch.distributed.init_process_group(backend='gloo')
    return changes


def caller_path(path: Optional[str]) -> Optional[str]:
    """``path`` made absolute against the directory the user called from (``$VSSM_CALLER_DIR`` when a launcher
    script set it, else the current directory); None, absolute paths and URIs (``s3://...``) stay as they are."""
    if not path or osp.isabs(path) or '://' in path:
        return path
    return osp.normpath(osp.join(os.environ.get(CALLER_DIR_ENV) or os.getcwd(), osp.expanduser(path)))


def resolve_cli_paths(args: argparse.Namespace, names: Sequence[str]) -> argparse.Namespace:
    """Apply :func:`caller_path` to the attributes ``names`` of ``args`` that are set (in place; returns ``args``)."""
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, caller_path(value))
    return args


def run_tool(main: Callable[[], None]) -> None:
    """Run a tool's ``main``; an error in what the user gave (:class:`vssm.fileio.UserInputError`: a missing file,
    a truncated or wrong checkpoint, an option that cannot work) prints its message alone, without a traceback, on
    the first process, and exits with status 2."""
    try:
        main()
    except UserInputError as error:
        if is_main_process():
            print(f'[vssm] error: {error}', file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def is_main_process() -> bool:
    return int(os.environ.get('RANK', '0')) == 0


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options tools/train.py and tools/test.py share (after their positional arguments)."""
    parser.add_argument('--work-dir', help='where logs, checkpoints and metrics go (default: work_dirs/<config name>)')
    parser.add_argument('--demo', action='store_true',
                        help="use the built-in demo data (the task's configs/_base_/demo.py override)")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys, e.g. a.b=1')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0)
    return parser


def setup_run(args: argparse.Namespace, repo_root: Path) -> Config:
    """Everything before the Runner: safe globals, the config with its overrides, the device adaptation."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    register_safe_globals()
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.demo, repo_root)
    changes = prepare_for_device(cfg, args.launcher)
    if is_main_process():
        for change in changes:
            print(f'[vssm] {change}', flush=True)
    return cfg


def check_data_paths(cfg: Config, splits: Sequence[str]) -> None:
    """Fail early, naming the config key and the fix, when a dataset's data root or annotation file is missing
    (``splits``: e.g. ``('train', 'val')``; mmengine would only fail deep inside the Runner)."""
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if not loader or not loader.get('dataset'):
            continue
        dataset = loader['dataset']
        while 'dataset' in dataset and 'data_root' not in dataset:  # wrappers (RepeatDataset, ...)
            dataset = dataset['dataset']
        root = dataset.get('data_root') or ''
        if root and not osp.isdir(root):
            raise MissingFileError(
                f'{split}_dataloader.dataset.data_root {root!r} does not exist (cwd {os.getcwd()}). Put the dataset '
                f'there, point the config at it (--cfg-options {split}_dataloader.dataset.data_root=PATH), or run '
                'with --demo on the built-in demo data (tools/make_demo_data.py).')
        ann = dataset.get('ann_file') or ''
        if ann:
            path = ann if osp.isabs(ann) or not root else osp.join(root, ann)
            if not osp.isfile(path):
                raise MissingFileError(
                    f'{split}_dataloader.dataset.ann_file {path!r} does not exist. Check data_root {root!r} and '
                    f'ann_file {ann!r} (--cfg-options {split}_dataloader.dataset.ann_file=...).')


def finish_distributed() -> None:
    """End a distributed run cleanly: wait for every rank, then destroy the process group (gloo's threads aborting
    at interpreter exit otherwise kill a finished run with 'terminate called without an active exception')."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

