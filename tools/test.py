"""Test a checkpoint of any vssm config and print (and save) its metrics.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--tta] [--demo] [--out FILE] [--cfg-options k=v ...]
    tools/dist_test.sh CONFIG CHECKPOINT NGPUS [same options]

``--tta`` uses the config's ``tta_model`` and ``tta_pipeline`` (flip for classification, multi-scale + flip for
segmentation). The metrics also go to ``<work_dir>/metrics.json``.
"""
import argparse
import json
import os.path as osp
from pathlib import Path

import vssm  # noqa: F401  (registers the backbones; keeps mmpretrain importable next to transformers>=5)
from vssm.runtime import DictAction, is_main_process, load_config, prepare_for_device, register_safe_globals

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test a vssm model.')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where logs and metrics.json go (default: work_dirs/<config name>)')
    parser.add_argument('--tta', action='store_true', help="test-time augmentation (the config's tta_model)")
    parser.add_argument('--demo', action='store_true',
                        help="test on the built-in demo data (the task's configs/_base_/demo.py override)")
    parser.add_argument('--out', help='also dump the raw predictions to this pickle file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys, e.g. a.b=1')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    register_safe_globals()
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint {args.checkpoint!r} does not exist.')
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.demo, REPO_ROOT)
    for change in prepare_for_device(cfg, args.launcher):
        print(f'[vssm] {change}', flush=True)
    cfg.load_from = args.checkpoint
    if args.tta:
        missing = [k for k in ('tta_model', 'tta_pipeline') if k not in cfg]
        if missing:
            raise ValueError(f'--tta needs `tta_model` and `tta_pipeline` in the config; missing: {missing}.')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.out:
        cfg.test_evaluator = list(cfg.test_evaluator) if isinstance(cfg.test_evaluator, (list, tuple)) else [
            cfg.test_evaluator]
        cfg.test_evaluator.append(dict(type='DumpResults', out_file_path=args.out))

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    metrics = runner.test()
    if is_main_process():
        path = osp.join(cfg.work_dir, 'metrics.json')
        with open(path, 'w') as f:
            json.dump({k: float(v) if isinstance(v, (int, float)) else v for k, v in metrics.items()}, f, indent=2)
        print(f'[vssm] metrics: {json.dumps(metrics, default=str)}\n[vssm] written to {path}', flush=True)


if __name__ == '__main__':
    main()
