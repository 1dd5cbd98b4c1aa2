"""Test a checkpoint of any vssm config and print (and save) its metrics.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--tta] [--demo] [--out FILE] [--cfg-options k=v ...]
    tools/dist_test.sh CONFIG CHECKPOINT NGPUS [same options]

``--tta`` uses the config's ``tta_model`` and ``tta_pipeline`` (flip for classification, multi-scale + flip for
segmentation). The metrics also go to ``<work_dir>/metrics.json``.
"""
import argparse
import json
import numbers
import os.path as osp
from pathlib import Path

import vssm  # noqa: F401  (registers the backbones; keeps mmpretrain importable next to transformers>=5)
from vssm.engine import add_common_args, build_runner, check_data_paths, finish_distributed, is_main_process, setup_run

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test a vssm model.')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--tta', action='store_true', help="test-time augmentation (the config's tta_model)")
    parser.add_argument('--out', help='also dump the raw predictions to this pickle file')
    return add_common_args(parser).parse_args()


def main() -> None:
    args = parse_args()
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint {args.checkpoint!r} does not exist.')
    cfg = setup_run(args, REPO_ROOT)
    cfg.load_from = args.checkpoint
    if args.tta:
        missing = [k for k in ('tta_model', 'tta_pipeline') if k not in cfg]
        if missing:
            raise ValueError(f'--tta needs `tta_model` and `tta_pipeline` in the config; missing: {missing}.')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.out:
        evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, (list, tuple)) else [cfg.test_evaluator]
        cfg.test_evaluator = [*evaluators, dict(type='DumpResults', out_file_path=args.out)]

    check_data_paths(cfg, ('test', ))
    metrics = build_runner(cfg).test()
    finish_distributed()
    if is_main_process():
        metrics = {k: float(v) if isinstance(v, numbers.Real) else v for k, v in metrics.items()}
        path = osp.join(cfg.work_dir, 'metrics.json')
        with open(path, 'w') as f:
            json.dump(metrics, f, indent=2)
        print(f'[vssm] metrics: {json.dumps(metrics)}\n[vssm] written to {path}', flush=True)


if __name__ == '__main__':
    main()
