"""Print a config fully resolved: bases merged, ``--demo`` and ``--cfg-options`` applied as tools/train.py does.

    python tools/misc/print_config.py CONFIG [--demo] [--cfg-options k=v ...] [--work-dir DIR] [--save out.py]

The overrides go through :func:`vssm.engine.launch.load_config`, in the launchers' order: the task's demo override
(``<task>/configs/_base_/demo.py``, chosen by ``default_scope``) first, then ``--cfg-options``, then the work dir
(default ``work_dirs/<config name>``, ``..._demo`` with ``--demo``). The CPU adaptation that tools/train.py makes at
run time on a machine without GPUs (SyncBN -> BN, gloo) is not applied. ``--save`` writes the resolved config as a
config file of its own (``.py``, ``.json`` or ``.yaml``), which tools/train.py can run as it is.
"""
import argparse
import os.path as osp
from pathlib import Path
from typing import Optional, Sequence

from mmengine.config import Config, DictAction

import vssm  # noqa: F401  (registers the backbones; keeps mmpretrain importable next to transformers>=5)
from vssm.engine.launch import load_config

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file')
    parser.add_argument('--demo', action='store_true', help="merge the task's demo override, as --demo does")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys, e.g. a.b=1')
    parser.add_argument('--work-dir', help='the work dir to record (default: work_dirs/<config name>)')
    parser.add_argument('--save', help='also write the resolved config to this file (.py, .json or .yaml)')
    return parser.parse_args(argv)


def resolve(config: str, demo: bool = False, cfg_options: Optional[dict] = None,
            work_dir: Optional[str] = None) -> Config:
    """The config as tools/train.py and tools/test.py see it before the Runner is built."""
    try:
        return load_config(config, cfg_options, work_dir, demo, REPO_ROOT)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f'print_config: {error}') from None


def main(argv: Optional[Sequence[str]] = None) -> Config:
    args = parse_args(argv)
    cfg = resolve(args.config, args.demo, args.cfg_options, args.work_dir)
    print(f'# {args.config}' + (' with --demo' if args.demo else '') + ' (resolved)')
    print(cfg.pretty_text)
    if args.save:
        if osp.splitext(args.save)[1] not in ('.py', '.json', '.yaml', '.yml'):
            raise SystemExit(f'print_config: --save must end in .py, .json or .yaml, got {args.save!r}.')
        cfg.dump(args.save)
        print(f'# saved to {args.save}')
    return cfg


if __name__ == '__main__':
    main()
