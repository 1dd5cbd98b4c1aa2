"""Run a trained model on one image through the library's own Inferencer and save the drawn predictions as a PNG.

    python demo/image_demo.py IMAGE CONFIG CHECKPOINT [--out-file OUT.png] [--device cpu] [--show]
                              [--score-thr 0.3] [--demo] [--cfg-options k=v ...]

The config's ``default_scope`` picks the task: ``mmpretrain.apis.ImageClassificationInferencer`` (top class and score),
``mmdet.apis.DetInferencer`` (boxes and masks above ``--score-thr``) or ``mmseg.apis.MMSegInferencer`` (the label
map over the image). CONFIG is the config the checkpoint was trained with: the copy in the training work dir
(``work_dirs/<name>/<config>.py``, which holds ``--demo`` and ``--cfg-options``), or a repository config with the
same ``--demo`` / ``--cfg-options``. The PNG goes to ``--out-file`` (default ``outputs/<image>_<task>.png``); the
predictions are printed as one JSON line.
"""
import argparse
import json
import os
import os.path as osp
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Tuple

import numpy as np
from mmengine.config import Config, DictAction

import vssm  # noqa: F401  (registers the backbones and the classes of mmengine checkpoints; before mmpretrain)
from vssm.engine.checkpoint import check_checkpoint_for_config
from vssm.engine.launch import clear_pretrained, load_config, run_tool
from vssm.fileio import InvalidOptionError, MissingFileError

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = {'mmpretrain': 'classification', 'mmdet': 'detection', 'mmseg': 'segmentation'}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('image', help='image file')
    parser.add_argument('config', help='the config the checkpoint was trained with')
    parser.add_argument('checkpoint', help='checkpoint file (tools/train.py, or publish_model.py output)')
    parser.add_argument('--out-file', help='where the PNG goes (default: outputs/<image name>_<task>.png)')
    parser.add_argument('--device', default=None, help="e.g. 'cpu', 'cuda:0' (default: cuda if available)")
    parser.add_argument('--show', action='store_true', help='also show the result in a window')
    parser.add_argument('--score-thr', type=float, default=0.3, help='detection: lowest score drawn (default 0.3)')
    parser.add_argument('--opacity', type=float, default=0.5, help='segmentation: opacity of the label map')
    parser.add_argument('--demo', action='store_true', help="merge the task's demo override (as tools/test.py)")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys, e.g. a.b=1')
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """The config with ``--demo`` / ``--cfg-options`` applied and nothing that would load other weights."""
    cfg = load_config(args.config, args.cfg_options, demo=args.demo, repo_root=REPO_ROOT)
    if cfg.get('default_scope') not in TASKS:
        raise InvalidOptionError(f'{args.config}: default_scope {cfg.get("default_scope")!r} is none of '
                                 f'{sorted(TASKS)}; give a classification, detection or segmentation config.')
    clear_pretrained(cfg.model)  # the checkpoint holds every weight
    return cfg


def _classify(cfg: Config, args: argparse.Namespace, out_file: str) -> dict:
    from mmpretrain.apis import ImageClassificationInferencer
    inferencer = ImageClassificationInferencer(cfg, pretrained=args.checkpoint, device=args.device)
    with tempfile.TemporaryDirectory() as folder:  # the Inferencer names the PNG after the image
        result = inferencer(args.image, show=args.show, show_dir=folder)[0]
        shutil.move(next(Path(folder).glob('*.png')), out_file)
    print(flush=True)  # ends the line of mmpretrain's progress bar
    return {k: v for k, v in result.items() if k != 'pred_scores'}


def _detect(cfg: Config, args: argparse.Namespace, out_file: str) -> dict:
    from mmdet.apis import DetInferencer
    inferencer = DetInferencer(cfg, weights=args.checkpoint, device=args.device, show_progress=False)
    result = inferencer(args.image, return_vis=True, show=args.show, pred_score_thr=args.score_thr,
                        no_save_vis=True, no_save_pred=True)
    _write_rgb(result['visualization'][0], out_file)
    classes = inferencer.model.dataset_meta['classes']
    prediction = result['predictions'][0]
    kept = [i for i, score in enumerate(prediction['scores']) if score >= args.score_thr]
    return dict(detections=[dict(label=classes[prediction['labels'][i]], score=round(prediction['scores'][i], 4),
                                 bbox=[round(x, 1) for x in prediction['bboxes'][i]]) for i in kept])


def _segment(cfg: Config, args: argparse.Namespace, out_file: str) -> dict:
    from mmseg.apis import MMSegInferencer
    inferencer = MMSegInferencer(cfg, weights=args.checkpoint, device=args.device)
    inferencer.show_progress = False
    result = inferencer(args.image, return_vis=True, show=args.show, opacity=args.opacity)
    _write_rgb(result['visualization'], out_file)
    labels = np.asarray(result['predictions'])
    classes = inferencer.model.dataset_meta['classes']
    values, counts = np.unique(labels, return_counts=True)
    return dict(pixels={classes[v]: round(int(c) / labels.size, 4) for v, c in zip(values, counts)})


def _write_rgb(image: np.ndarray, path: str) -> None:
    import mmcv
    mmcv.imwrite(np.ascontiguousarray(image[..., ::-1]), path)


def run(args: argparse.Namespace) -> Tuple[str, dict]:
    """Check the inputs, run the task's Inferencer; returns the PNG's path and a summary of the predictions."""
    if not osp.isfile(args.image):
        raise MissingFileError(f'image {args.image!r} does not exist.')
    cfg = build_config(args)
    # A missing, truncated or wrong checkpoint fails here in one message (the Inferencers would load it non-strictly).
    check_checkpoint_for_config(args.checkpoint, cfg)
    task = TASKS[cfg.default_scope]
    out_file = args.out_file or osp.join('outputs', f'{Path(args.image).stem}_{task}.png')
    if not out_file.lower().endswith('.png'):
        raise InvalidOptionError(f'--out-file {out_file}: the visualization is written as PNG; name a .png file.')
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    with warnings.catch_warnings():  # the visualizers' vis backends want a save_dir that inference does not use
        warnings.filterwarnings('ignore', message='Failed to add .*LocalVisBackend')
        summary = {'classification': _classify, 'detection': _detect, 'segmentation': _segment}[task](cfg, args,
                                                                                                   out_file)
    return out_file, dict(task=task, **summary)


def main() -> None:
    out_file, summary = run(parse_args())
    print(json.dumps(summary))
    print(f'[vssm] visualization written to {out_file}')


if __name__ == '__main__':
    run_tool(main)
