"""Train any vssm config (classification, detection or segmentation) with mmengine's Runner.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--demo] [--cfg-options k=v ...]
    tools/dist_train.sh CONFIG NGPUS [same options]        # torchrun; NGPUS CPU processes on a machine without GPUs
    tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [same options]

The config's ``default_scope`` (mmpretrain, mmdet or mmseg) selects the library's registries. Paths on the command
line are relative to the directory you call from.
"""
import argparse
from pathlib import Path

import vssm  # noqa: F401  (registers the backbones; keeps mmpretrain importable next to transformers>=5)
from vssm.engine import (
    add_common_args,
    build_runner,
    check_checkpoint_for_config,
    check_data_paths,
    finish_distributed,
    resolve_resume,
    setup_run,
    use_atomic_checkpoints,
)
from vssm.engine.launch import resolve_cli_paths, run_tool
from vssm.fileio import InvalidOptionError

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a vssm model.')
    parser.add_argument('config', help='config file')
    parser.add_argument('--resume', nargs='?', const='auto', default=None,
                        help='resume from CKPT, or from the latest checkpoint of the work dir when no CKPT is given')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true', help='scale the lr with the total batch size')
    args = add_common_args(parser).parse_args(argv)
    return resolve_cli_paths(args, ['config', 'work_dir'] + (['resume'] if args.resume != 'auto' else []))


def _add_hook(cfg, name: str) -> None:
    """Append ``mmengine.<name>`` (a hook of vssm.engine) to ``custom_hooks`` unless the config already has a hook of
    that type, and ``vssm.engine`` to ``custom_imports``, so that the config dumped in the work dir also runs in
    mmpretrain's, mmdet's and mmseg's own tools."""
    hooks = list(cfg.get('custom_hooks', None) or [])
    if not any(str(h.get('type', '')).endswith(name) for h in hooks):
        cfg.custom_hooks = hooks + [dict(type=f'mmengine.{name}')]
    custom = cfg.get('custom_imports') or dict(imports=[], allow_failed_imports=False)
    imports = [custom['imports']] if isinstance(custom['imports'], str) else list(custom['imports'])
    if 'vssm.engine' not in imports:
        cfg.custom_imports = dict(custom, imports=imports + ['vssm.engine'])


def main() -> None:
    args = parse_args()
    cfg = setup_run(args, REPO_ROOT)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg:
            raise InvalidOptionError('--auto-scale-lr needs `auto_scale_lr = dict(base_batch_size=...)` in the config.')
        cfg.auto_scale_lr.enable = True
    # Nothing lost on a crash: atomic checkpoint files, rank 0's RNG states in them (vssm/engine/).
    use_atomic_checkpoints()
    _add_hook(cfg, 'RNGStateHook')
    # What is validated is what is saved: the ranks' BatchNorm statistics averaged before validation and saving.
    _add_hook(cfg, 'SyncNormBuffersHook')
    if args.resume == 'auto':
        checkpoint = resolve_resume(cfg.work_dir)
        if checkpoint is None:
            print(f'[vssm] --resume: no checkpoint in {cfg.work_dir}; training from the start.', flush=True)
        cfg.resume, cfg.load_from = checkpoint is not None, checkpoint
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    if cfg.get('load_from'):  # a wrong or truncated file: one message, before the Runner's logs
        what = '--resume checkpoint' if cfg.get('resume') else 'load_from checkpoint'
        check_checkpoint_for_config(cfg.load_from, cfg, what,
                                    fix='copy it again, or resume from an earlier checkpoint (--resume without a '
                                    'path picks the newest complete one)')
    check_data_paths(cfg, ('train', 'val'))
    build_runner(cfg).train()
    finish_distributed()


if __name__ == '__main__':
    run_tool(main)
