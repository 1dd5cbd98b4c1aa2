"""Train any vssm config (classification, detection or segmentation) with mmengine's Runner.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--demo] [--cfg-options k=v ...]
    tools/dist_train.sh CONFIG NGPUS [same options]        # torchrun; NGPUS CPU processes on a machine without GPUs

The config's ``default_scope`` (mmpretrain, mmdet or mmseg) selects the library's registries.
"""
import argparse
import os
from pathlib import Path

import vssm  # noqa: F401  (registers the backbones; keeps mmpretrain importable next to transformers>=5)
from vssm.engine import (add_common_args, build_runner, check_data_paths, finish_distributed, resolve_resume, setup_run,
                         use_atomic_checkpoints)

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a vssm model.')
    parser.add_argument('config', help='config file')
    parser.add_argument('--resume', nargs='?', const='auto', default=None,
                        help='resume from CKPT, or from the latest checkpoint of the work dir when no CKPT is given')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true', help='scale the lr with the total batch size')
    return add_common_args(parser).parse_args()


def main() -> None:
    args = parse_args()
    cfg = setup_run(args, REPO_ROOT)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg:
            raise ValueError('--auto-scale-lr needs `auto_scale_lr = dict(base_batch_size=...)` in the config.')
        cfg.auto_scale_lr.enable = True
    # Nothing lost on a crash: atomic checkpoint files, rank 0's RNG states in them (vssm/engine/).
    use_atomic_checkpoints()
    hooks = list(cfg.get('custom_hooks', None) or [])
    if not any(str(h.get('type', '')).endswith('RNGStateHook') for h in hooks):
        cfg.custom_hooks = hooks + [dict(type='mmengine.RNGStateHook')]
    if args.resume == 'auto':
        checkpoint = resolve_resume(cfg.work_dir)
        if checkpoint is None:
            print(f'[vssm] --resume: no checkpoint in {cfg.work_dir}; training from the start.', flush=True)
        cfg.resume, cfg.load_from = checkpoint is not None, checkpoint
    elif args.resume is not None:
        if not os.path.isfile(args.resume):
            raise FileNotFoundError(f'--resume {args.resume}: no such checkpoint file.')
        cfg.resume, cfg.load_from = True, args.resume
    check_data_paths(cfg, ('train', 'val'))
    build_runner(cfg).train()
    finish_distributed()


if __name__ == '__main__':
    main()
