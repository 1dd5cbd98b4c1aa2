"""Helpers of the tests that run the tools end to end on CPU: tiny Spatial-Mamba models of each task (widths 8-64, one
block per stage) through ``--cfg-options``, the demo data in a temporary folder, the tools as subprocesses."""
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]

CONFIGS = {
    'classification': 'classification/configs/spatial_mamba/spatial-mamba-tiny_8xb128_in1k.py',
    'detection': 'detection/configs/spatial_mamba/mask-rcnn_spatial-mamba-t_fpn_1x_coco.py',
    'segmentation': 'segmentation/configs/spatial_mamba/spatial-mamba-tiny_upernet_8xb2-160k_ade20k-512x512.py',
}
TINY_BACKBONE = ['model.backbone.arch._delete_=True', 'model.backbone.arch.dims=[8,16,32,64]',
                 'model.backbone.arch.depths=[1,1,1,1]']
TINY_HEADS = {
    'classification': ['model.head.in_channels=64'],
    'detection': ['model.neck.in_channels=[8,16,32,64]'],
    'segmentation': ['model.decode_head.in_channels=[8,16,32,64]', 'model.decode_head.channels=16',
                     'model.auxiliary_head.in_channels=32', 'model.auxiliary_head.channels=16'],
}
SPLITS = ('train', 'val', 'test')


def config(task: str) -> str:
    return str(REPO_ROOT / CONFIGS[task])


def data_options(task: str, data: Path, eval_images: int = 2) -> List[str]:
    """``--cfg-options`` that point the task's demo override at the demo data under ``data`` (the output of
    tools/make_demo_data.py), load in the main process and evaluate on the first ``eval_images`` images."""
    root = {'classification': data / 'imagenet', 'detection': data / 'coco',
            'segmentation': data / 'ade' / 'ADEChallengeData2016'}[task]
    options = [f'{split}_dataloader.dataset.data_root={root}{"/" if task == "detection" else ""}' for split in SPLITS]
    options += [f'{split}_dataloader.num_workers=0' for split in SPLITS]
    options += [f'{split}_dataloader.dataset.indices={eval_images}' for split in ('val', 'test')]
    if task == 'detection':
        ann = data / 'coco' / 'annotations' / 'instances_val2017.json'
        options += [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']
    return options


def tiny_options(task: str) -> List[str]:
    return TINY_BACKBONE + TINY_HEADS[task]


def schedule_options(iters: int, validate: bool = True) -> List[str]:
    options = [f'train_cfg.max_iters={iters}', f'default_hooks.checkpoint.interval={iters}',
               'default_hooks.logger.interval=1']
    if validate:
        return options + [f'train_cfg.val_interval={iters}']
    return options + ['val_cfg=None', 'val_dataloader=None', 'val_evaluator=None']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('', 0))
        return s.getsockname()[1]


def tool_env(**extra: str) -> Dict[str, str]:
    """The environment of a tool run: this interpreter, the repository on PYTHONPATH, one thread per process."""
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS='1')
    env.pop('VSSM_CALLER_DIR', None)
    env.update(extra)
    return env


def run(args: Sequence[str], log: Path, cwd: Optional[Path] = None, check: bool = True, timeout: int = 600,
        **env: str) -> subprocess.CompletedProcess:
    """Run a tool (from the repository root unless ``cwd``); keep its output in ``log``; with ``check``, fail with
    its tail when it fails."""
    result = subprocess.run([str(a) for a in args], cwd=cwd or REPO_ROOT, env=tool_env(**env), capture_output=True,
                            text=True, timeout=timeout)
    Path(log).write_text(result.stdout + result.stderr)
    if check:
        assert result.returncode == 0, f'{" ".join(map(str, args))} failed (rc {result.returncode}):\n' \
            f'{(result.stdout + result.stderr)[-4000:]}'
    return result


def make_demo_data(out: Path) -> Path:
    """The demo data set of tools/make_demo_data.py under ``out`` (about 2 s)."""
    run([sys.executable, 'tools/make_demo_data.py', '--out', out], out.parent / 'make_demo_data.log')
    return out
