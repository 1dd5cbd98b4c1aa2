"""Train any vssm config (classification, detection or segmentation) with mmengine's Runner.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--demo] [--cfg-options k=v ...]
    tools/dist_train.sh CONFIG NGPUS [same options]        # torchrun; NGPUS CPU processes on a machine without GPUs

The config's ``default_scope`` (mmpretrain, mmdet or mmseg) selects the library's registries.
"""
import argparse
from pathlib import Path

import vssm  # noqa: F401  (registers the backbones; keeps mmpretrain importable next to transformers>=5)
from vssm.runtime import DictAction, load_config, prepare_for_device, register_safe_globals

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a vssm model.')
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', const='auto', default=None,
                        help='resume from CKPT, or from the latest checkpoint of the work dir when no CKPT is given')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true', help='scale the lr with the total batch size')
    parser.add_argument('--demo', action='store_true',
                        help="run on the built-in demo data (the task's configs/_base_/demo.py override)")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys, e.g. a.b=1')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    register_safe_globals()
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.demo, REPO_ROOT)
    for change in prepare_for_device(cfg, args.launcher):
        print(f'[vssm] {change}', flush=True)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg:
            raise ValueError('--auto-scale-lr needs `auto_scale_lr = dict(base_batch_size=...)` in the config.')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.train()


if __name__ == '__main__':
    main()
