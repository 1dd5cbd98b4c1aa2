"""Test a checkpoint of any vssm config and print (and save) its metrics.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--tta] [--demo] [--out FILE|DIR]
                         [--show] [--show-dir DIR] [--wait-time S] [--cfg-options k=v ...]
    tools/dist_test.sh CONFIG CHECKPOINT NGPUS [same options]
    tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [same options]

``--tta`` uses the config's ``tta_model`` and ``tta_pipeline`` (flip for classification, multi-scale + flip for
segmentation). The metrics also go to ``<work_dir>/metrics.json``; the test config to ``<work_dir>/<timestamp>/``
(the training config in the work dir stays as it is).

``--out`` writes the predictions in each library's format: a pickle of mmpretrain's data samples, a pickle of
mmdet's results with RLE-encoded masks (``DumpDetResults``), and for segmentation a directory of PNG label maps
(mmseg's ``IoUMetric(output_dir=...)``; a ``.pkl`` path keeps the pickle of the data samples instead).
``--show`` / ``--show-dir`` draw the predictions through the library's visualization hook: mmpretrain's and mmdet's
write one image per test image into DIR, mmseg's into ``DIR/vis_data/vis_image/``.
"""
import argparse
import json
import numbers
import os.path as osp
from pathlib import Path
from types import SimpleNamespace

from mmengine.config import Config

import vssm  # noqa: F401  (registers the backbones; keeps mmpretrain importable next to transformers>=5)
from vssm.engine import (
    add_common_args,
    build_runner,
    check_checkpoint_for_config,
    check_data_paths,
    finish_distributed,
    is_main_process,
    setup_run,
)
from vssm.engine.launch import resolve_cli_paths, run_tool
from vssm.fileio import InvalidOptionError

REPO_ROOT = Path(__file__).resolve().parents[1]
PICKLE_SUFFIXES = ('.pkl', '.pickle')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test a vssm model.')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--tta', action='store_true', help="test-time augmentation (the config's tta_model)")
    parser.add_argument('--out', help='write the predictions: a .pkl file (classification, detection with RLE '
                        'masks), or for segmentation a directory of PNG label maps (a .pkl path: a pickle)')
    parser.add_argument('--show', action='store_true', help='show the predictions in a window')
    parser.add_argument('--show-dir', help='write images with the predictions drawn into this directory')
    parser.add_argument('--wait-time', type=float, default=2, help='seconds each --show window stays (default 2)')
    parser.add_argument('--interval', type=int, default=1,
                        help='draw every N-th test image (classification, segmentation; default 1: all)')
    args = add_common_args(parser).parse_args(argv)
    return resolve_cli_paths(args, ['config', 'checkpoint', 'work_dir', 'out', 'show_dir'])


def enable_visualization(cfg: Config, show: bool, show_dir: str, wait_time: float, interval: int) -> None:
    """Switch on the library's visualization hook of ``default_hooks`` for the test, as its own tools/test.py does."""
    hooks = cfg.get('default_hooks') or {}
    if 'visualization' not in hooks:
        raise InvalidOptionError("--show/--show-dir draw through default_hooks.visualization, which this config "
                                 "lacks; add e.g. default_hooks=dict(visualization=dict(type='VisualizationHook')).")
    hook = hooks['visualization']
    scope = cfg.get('default_scope')
    if scope == 'mmdet':
        from mmdet.engine.hooks.utils import trigger_visualization_hook
        trigger_visualization_hook(cfg, SimpleNamespace(show=show, show_dir=show_dir, wait_time=wait_time))
    elif scope == 'mmseg':
        hook.update(draw=True, interval=interval)
        if show:
            hook.update(show=True, wait_time=wait_time)
        if show_dir:
            cfg.visualizer.save_dir = show_dir
    else:
        hook.update(enable=True, show=show, wait_time=wait_time, out_dir=show_dir, interval=interval)


def add_prediction_output(cfg: Config, out: str) -> str:
    """Make the test write its predictions to ``out`` in the library's format; returns what it will write."""
    scope = cfg.get('default_scope')
    evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, (list, tuple)) else [cfg.test_evaluator]
    if scope == 'mmseg' and not out.endswith(PICKLE_SUFFIXES):
        metrics = [e for e in evaluators if str(e.get('type', '')).split('.')[-1] == 'IoUMetric']
        if not metrics:
            raise InvalidOptionError(f'--out {out}: PNG label maps come from IoUMetric(output_dir=...), which '
                                     'test_evaluator lacks; give a .pkl path for a pickle of the predictions instead.')
        for metric in metrics:
            metric.output_dir = out
        return f'PNG label maps in {out}'
    if not out.endswith(PICKLE_SUFFIXES):
        raise InvalidOptionError(f'--out {out}: the predictions are written as a pickle; give a path ending in .pkl.')
    dump = 'DumpDetResults' if scope == 'mmdet' else 'DumpResults'  # mmdet's encodes the masks as RLE
    cfg.test_evaluator = [*evaluators, dict(type=dump, out_file_path=out)]
    return f'{dump} pickle {out}'


def main() -> None:
    args = parse_args()
    cfg = setup_run(args, REPO_ROOT)
    if args.tta:
        missing = [k for k in ('tta_model', 'tta_pipeline') if k not in cfg]
        if missing:
            raise InvalidOptionError(f'--tta needs `tta_model` and `tta_pipeline` in the config; missing: {missing}.')
    if (args.show or args.show_dir) and args.tta and cfg.get('default_scope') == 'mmpretrain':
        raise InvalidOptionError("--tta with --show/--show-dir: mmpretrain's VisualizationHook cannot draw "
                                 'test-time-augmented batches; drop one of them.')
    # A missing, truncated or wrong checkpoint fails here, in one message, before the Runner's logs.
    check_checkpoint_for_config(args.checkpoint, cfg)
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        enable_visualization(cfg, args.show, args.show_dir, args.wait_time, args.interval)
    if args.tta:
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    output = add_prediction_output(cfg, args.out) if args.out else None
    # A test builds no training parts (mmseg's visualization hook reads runner.iter, which would build the train
    # loop and its dataset).
    cfg.train_dataloader = cfg.train_cfg = cfg.optim_wrapper = None
    cfg.param_scheduler = None

    check_data_paths(cfg, ('test', ))
    metrics = build_runner(cfg, test=True).test()
    finish_distributed()
    if is_main_process():
        metrics = {k: float(v) if isinstance(v, numbers.Real) else v for k, v in metrics.items()}
        path = osp.join(cfg.work_dir, 'metrics.json')
        with open(path, 'w') as f:
            json.dump(metrics, f, indent=2)
        print(f'[vssm] metrics: {json.dumps(metrics)}\n[vssm] written to {path}', flush=True)
        if output:
            print(f'[vssm] predictions: {output}', flush=True)


if __name__ == '__main__':
    run_tool(main)
