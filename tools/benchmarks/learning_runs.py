"""Learning check: train the T model of each family and a Swin-T baseline on the demo data under one fixed budget per
task, test the last checkpoints, and compare the metrics (top-1, bbox/segm mAP, mIoU) and the loss curves.

    python tools/benchmarks/learning_runs.py --work-dir /tmp/learning [--parallel 4]
        [--tasks cls det seg] [--backbones spatial-mamba-t vmamba-t spectral-vmamba-t swin-t]
        [--cls-iters 500] [--det-iters 250] [--seg-iters 300] [--cls-batch 64] [--det-batch 2] [--seg-batch 8]
        [--cls-lr 5e-4] [--det-lr 1e-4] [--seg-lr 1.2e-4] [--data-scale 10] [--seed 0] [--gpus 1] [--tta]
        [--keep-checkpoints]

The default budgets are meant to end each task's four runs in about 2-2.5 minutes with ``--parallel 4`` on one H200
(an estimate from CPU timings, not a measurement; change them with ``--<task>-iters``).

Steps:

1. ``tools/make_demo_data.py --out WORK_DIR/data --scale DATA_SCALE`` (skipped when already complete): the demo
   data with ``--data-scale`` times as many images per split (default 10: 4,000 / 1,000 classification images, 240 /
   80 COCO and ADE20K images). At the CPU demo's size (24 segmentation training images, 8 test images) the runs
   measure memorization and the test metrics are noise.
2. For every task and backbone: ``tools/dist_train.sh CONFIG GPUS --demo`` with the data roots pointed at
   ``WORK_DIR/data`` and the same schedule for every backbone of a task: ``--<task>-iters`` iterations of the demo
   recipe (its warm-up of 10 iterations, then its cosine / poly decay stretched to the new length) at
   ``--<task>-batch`` images per GPU and the AdamW learning rate ``--<task>-lr`` (the CPU demo's classification
   recipe, 1e-3 at batch 8, keeps every backbone, Swin-T included, at chance level); Spectral VMamba with
   ``rfn_frozen=False`` (its RFN cannot get ImageNet weights here, and frozen random it stays at chance level;
   ``--frozen-rfn`` keeps it frozen); the loss logged
   every ``--log-interval`` iterations, the same ``--seed``, and one checkpoint (weights only) at the end; no
   validation during training, since the test of that checkpoint measures the same thing. Then
   ``tools/dist_test.sh`` on it (``--tta``: flip for classification, multi-scale + flip for segmentation; detection
   has none). ``--parallel N`` runs N of these jobs at once (on one GPU they share it), each with its own torchrun
   port and ``cpu_count / N`` OpenMP threads.
3. Writes ``WORK_DIR/summary.json`` (the metrics of every run, time per iteration, last losses, whether each of our
   backbones reaches the baseline on every metric of its task), ``WORK_DIR/summary.md`` (one table per task) and
   ``WORK_DIR/loss_<task>.png`` (the training loss of every backbone on one axes, from the mmengine JSON logs through
   ``tools/analysis_tools/plot_curves.py``), again after every finished run, so that a session cut short keeps what
   was done (unfinished runs are listed as ``pending`` or ``running``).

Every run keeps its logs under ``WORK_DIR/<task>/<backbone>/``: ``train.log`` and ``test.log`` (the launchers'
stdout and stderr), ``train/`` (mmengine's work dir: config, ``<timestamp>/<timestamp>.log``,
``vis_data/scalars.json``) and ``test/`` (``metrics.json``). Checkpoints are deleted after the test unless
``--keep-checkpoints``; a run's folder is emptied when it starts again. A failed run is reported (the end of its
log) and the others go on; the exit status is 1 if any run failed. Reaching the baseline or not does not change the
exit status: read it in the summary.
"""
import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, median
from typing import Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[2]
BASELINE = 'swin-t'


@dataclass(frozen=True)
class Task:
    """One task of the learning check.

    Attributes:
        name: the task tree (``classification``, ``detection``, ``segmentation``).
        configs: backbone name -> config path relative to the repository root.
        metrics: (metric key in ``metrics.json``, label) of the numbers compared with the baseline.
        data: the task's folder under the demo data root (``tools/make_demo_data.py`` layout).
        default_iters: the default budget in iterations.
    default_batch: the default images per GPU.
    default_lr: the default AdamW learning rate.
    """
    name: str
    configs: Dict[str, str]
    metrics: Tuple[Tuple[str, str], ...]
    data: str
    default_iters: int
    default_batch: int
    default_lr: float


TASKS = {
    'cls': Task('classification', {
        'spatial-mamba-t': 'classification/configs/spatial_mamba/spatial-mamba-tiny_8xb128_in1k.py',
        'vmamba-t': 'classification/configs/vmamba/vmamba-tiny_8xb128_in1k.py',
        'spectral-vmamba-t': 'classification/configs/spectral_vmamba/spectral-vmamba-tiny_8xb128_in1k.py',
        BASELINE: 'classification/configs/baselines/swin-tiny_8xb128_in1k.py',
    }, (('accuracy/top1', 'top-1 (%)'), ), 'imagenet', 500, 64, 5e-4),
    'det': Task('detection', {
        'spatial-mamba-t': 'detection/configs/spatial_mamba/mask-rcnn_spatial-mamba-t_fpn_1x_coco.py',
        'vmamba-t': 'detection/configs/vmamba/mask-rcnn_vmamba-t_fpn_1x_coco.py',
        'spectral-vmamba-t': 'detection/configs/spectral_vmamba/mask-rcnn_spectral-vmamba-t_fpn_1x_coco.py',
        BASELINE: 'detection/configs/baselines/mask-rcnn_swin-t_fpn_1x_coco.py',
    }, (('coco/bbox_mAP', 'bbox mAP'), ('coco/segm_mAP', 'segm mAP')), 'coco', 250, 2, 1e-4),
    'seg': Task('segmentation', {
        'spatial-mamba-t': 'segmentation/configs/spatial_mamba/spatial-mamba-tiny_upernet_8xb2-160k_ade20k-512x512.py',
        'vmamba-t': 'segmentation/configs/vmamba/vmamba-tiny_upernet_8xb2-160k_ade20k-512x512.py',
        'spectral-vmamba-t':
        'segmentation/configs/spectral_vmamba/spectral-vmamba-tiny_upernet_8xb2-160k_ade20k-512x512.py',
        BASELINE: 'segmentation/configs/baselines/swin-tiny_upernet_8xb2-160k_ade20k-512x512.py',
    }, (('mIoU', 'mIoU (%)'), ), 'ade/ADEChallengeData2016', 300, 8, 1.2e-4),
}
BACKBONES = ('spatial-mamba-t', 'vmamba-t', 'spectral-vmamba-t', BASELINE)
RANDOM_RFN_OPTIONS = ('model.backbone.rfn_frozen=False', )
"""Spectral VMamba's RFN (a ResNet-18 trunk) is frozen with ImageNet weights in the configs; no weights can be
loaded here, and a frozen *random* trunk kept it at chance level (H200, 2026-11-30: top-1 25.0% with 4 classes, no
detections, mIoU 19.9 vs Swin-T's 32.4), so the learning check trains it (``--frozen-rfn`` keeps it frozen)."""
WARMUP_ITERS = 10  # the demo overrides' linear warm-up (classification/detection/segmentation configs/_base_/demo.py)


@dataclass
class Job:
    """One training + test run and what came out of it."""
    task: str
    backbone: str
    config: str
    iters: int
    batch: int
    lr: float
    root: Path  # WORK_DIR/<task>/<backbone>
    status: str = 'pending'  # pending | running | ok | train failed | test failed
    train_s: float = 0.0
    test_s: float = 0.0
    metrics: Optional[dict] = None

    @property
    def finished(self) -> bool:
        return self.status not in ('pending', 'running')

    @property
    def train_dir(self) -> Path:
        return self.root / 'train'

    @property
    def test_dir(self) -> Path:
        return self.root / 'test'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work-dir', required=True,
                        help='where the demo data, every run, the summary and the plots go (outside the repository)')
    parser.add_argument('--tasks', nargs='+', choices=list(TASKS), default=list(TASKS))
    parser.add_argument('--backbones', nargs='+', choices=BACKBONES, default=list(BACKBONES))
    for key, task in TASKS.items():
        parser.add_argument(f'--{key}-iters', type=int, default=task.default_iters,
                            help=f'{task.name} training iterations (default: {task.default_iters})')
        parser.add_argument(f'--{key}-batch', type=int, default=task.default_batch,
                            help=f'{task.name} images per GPU (default: {task.default_batch})')
        parser.add_argument(f'--{key}-lr', type=float, default=task.default_lr,
                            help=f'{task.name} AdamW learning rate (default: {task.default_lr:g})')
    parser.add_argument('--data-scale', type=int, default=10,
                        help="multiplier of the demo data's image counts (tools/make_demo_data.py --scale; default 10)")
    parser.add_argument('--parallel', type=int, default=1, help='jobs run at the same time (default: 1)')
    parser.add_argument('--gpus', type=int, default=1, help='GPUs (CPU processes without GPUs) per run (default: 1)')
    parser.add_argument('--seed', type=int, default=0, help='training seed, the same for every run (default: 0)')
    parser.add_argument('--log-interval', type=int, default=5,
                        help='iterations between logged losses (at most the budget; default: 5)')
    parser.add_argument('--frozen-rfn', action='store_true',
                        help="keep Spectral VMamba's RFN frozen (random weights here: see RANDOM_RFN_OPTIONS)")
    parser.add_argument('--tta', action='store_true', help='test with TTA (classification, segmentation)')
    parser.add_argument('--keep-checkpoints', action='store_true', help='keep the .pth files after the test')
    parser.add_argument('--dry-run', action='store_true', help='print the commands and stop')
    args = parser.parse_args(argv)
    for name in ('parallel', 'gpus', 'log_interval', 'data_scale', *(f'{k}_{v}' for k in TASKS
                                                                     for v in ('iters', 'batch'))):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    for key in TASKS:
        if not getattr(args, f'{key}_lr') > 0:
            parser.error(f'--{key}-lr must be positive, got {getattr(args, f"{key}_lr")}')
    return args


def _plot_curves_module():
    """tools/analysis_tools/plot_curves.py (a script, not a package module)."""
    from vssm.engine.launch import load_tool_module
    return load_tool_module(REPO_ROOT / 'tools' / 'analysis_tools' / 'plot_curves.py', 'vssm_plot_curves_tool')


def data_options(task: str, data_root: Path, split: str) -> List[str]:
    """``--cfg-options`` pointing the ``split`` dataset (``train`` or ``test``; and the COCO test evaluator) at
    ``data_root``."""
    root = str(data_root / TASKS[task].data)
    if task == 'det':
        root += '/'  # mmdet's COCO configs end data_root with a slash
    options = [f'{split}_dataloader.dataset.data_root={root}']
    if task == 'det' and split == 'test':
        options.append(f'test_evaluator.ann_file={root}annotations/instances_val2017.json')
    return options


def schedule_options(iters: int, log_interval: int, seed: int, batch: int, lr: float) -> List[str]:
    """The demo recipe stretched to ``iters`` (warm-up, then decay to the end) at ``batch`` images per GPU and the
    learning rate ``lr``, one weights-only checkpoint at the end, no validation."""
    warmup = max(1, min(WARMUP_ITERS, iters // 2))
    return [
        f'train_cfg.max_iters={iters}', f'train_dataloader.batch_size={batch}', f'optim_wrapper.optimizer.lr={lr}',
        'val_dataloader=None', 'val_cfg=None', 'val_evaluator=None',
        f'param_scheduler.0.end={warmup}', f'param_scheduler.1.begin={warmup}', f'param_scheduler.1.end={iters}',
        f'default_hooks.checkpoint.interval={iters}', 'default_hooks.checkpoint.save_optimizer=False',
        'default_hooks.checkpoint.save_param_scheduler=False',
        f'default_hooks.logger.interval={min(log_interval, iters)}', f'randomness.seed={seed}'
    ]


def train_command(job: Job, args: argparse.Namespace, data_root: Path) -> List[str]:
    rfn = RANDOM_RFN_OPTIONS if job.backbone == 'spectral-vmamba-t' and not args.frozen_rfn else ()
    return ['tools/dist_train.sh', job.config, str(args.gpus), '--demo', '--work-dir', str(job.train_dir),
            '--cfg-options', *schedule_options(job.iters, args.log_interval, args.seed, job.batch, job.lr),
            *data_options(job.task, data_root, 'train'), *rfn]


def test_command(job: Job, args: argparse.Namespace, data_root: Path, checkpoint: str) -> List[str]:
    tta = ['--tta'] if args.tta and job.task != 'det' else []
    return ['tools/dist_test.sh', job.config, checkpoint, str(args.gpus), '--demo', '--work-dir', str(job.test_dir),
            *tta, '--cfg-options', *data_options(job.task, data_root, 'test')]


class PortPool:
    """Distinct free TCP ports for concurrent torchrun rendezvous (each run gets its own ``PORT``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = set()

    def take(self) -> int:
        with self._lock:
            while True:
                with socket.socket() as s:
                    s.bind(('127.0.0.1', 0))
                    port = s.getsockname()[1]
                if port not in self._taken:
                    self._taken.add(port)
                    return port

    def give_back(self, port: int) -> None:
        with self._lock:
            self._taken.discard(port)


def _run_logged(command: List[str], log: Path, env: dict, ports: PortPool) -> Tuple[bool, float]:
    """Run a launcher from the repository root with its own port; stdout and stderr go to ``log``."""
    port = ports.take()
    start = time.perf_counter()
    try:
        with open(log, 'w') as f:
            f.write(f'$ PORT={port} {shlex.join(command)}\n')
            f.flush()
            result = subprocess.run(command, cwd=REPO_ROOT, env=dict(env, PORT=str(port)), stdout=f,
                                    stderr=subprocess.STDOUT)
    finally:
        ports.give_back(port)
    return result.returncode == 0, time.perf_counter() - start


def _tail(path: Path, lines: int = 30) -> str:
    return '\n'.join(path.read_text(errors='replace').splitlines()[-lines:])


def run_job(job: Job, args: argparse.Namespace, data_root: Path, env: dict, ports: PortPool) -> Job:
    """Train, test the last checkpoint, read ``metrics.json``; delete the checkpoints unless asked to keep them.
    The run's folder is emptied first (the loss curves read every log in it)."""
    job.status = 'running'
    shutil.rmtree(job.root, ignore_errors=True)
    job.root.mkdir(parents=True)
    tag = f'{job.task}/{job.backbone}'
    print(f'[learning_runs] {tag}: training {job.iters} iterations', flush=True)
    ok, job.train_s = _run_logged(train_command(job, args, data_root), job.root / 'train.log', env, ports)
    last = job.train_dir / 'last_checkpoint'
    if not ok or not last.is_file():
        job.status = 'train failed'
        print(f'[learning_runs] {tag}: training FAILED, end of {job.root / "train.log"}:\n'
              f'{_tail(job.root / "train.log")}', flush=True)
        return job
    checkpoint = last.read_text().strip()
    ok, job.test_s = _run_logged(test_command(job, args, data_root, checkpoint), job.root / 'test.log', env, ports)
    metrics_file = job.test_dir / 'metrics.json'
    if not ok or not metrics_file.is_file():
        job.status = 'test failed'
        print(f'[learning_runs] {tag}: test FAILED, end of {job.root / "test.log"}:\n'
              f'{_tail(job.root / "test.log")}', flush=True)
        return job
    job.metrics = json.loads(metrics_file.read_text())
    job.status = 'ok'
    if not args.keep_checkpoints:
        for path in job.train_dir.glob('*.pth'):
            path.unlink()
    shown = ', '.join(f'{key} {job.metrics[key]:.3f}' for key, _ in TASKS[job.task].metrics if key in job.metrics)
    print(f'[learning_runs] {tag}: {shown} (train {job.train_s:.0f} s, test {job.test_s:.0f} s)', flush=True)
    return job


def curve_stats(job: Job, plot_curves) -> dict:
    """From the training JSON log: seconds per iteration (the median of the logged values of the second half of the
    run; each is mmengine's mean over the last 10 iterations), the last logged loss, the mean of the last five, and
    the peak GPU memory (MB) when logged."""
    try:
        run = plot_curves.load_run(str(job.train_dir), job.backbone)
    except SystemExit as error:  # no log (the run failed early)
        return dict(log_error=str(error))
    stats = {}
    times = [v for _, v in sorted(run.train.get('time', {}).items())]
    if times:
        stats['s_per_iter'] = median(times[len(times) // 2:])
    losses = [v for _, v in sorted(run.train.get('loss', {}).items())]
    if losses:
        stats['last_loss'] = losses[-1]
        stats['mean_loss_last5'] = mean(losses[-5:])
    if run.train.get('memory'):
        stats['max_memory_mb'] = max(run.train['memory'].values())
    return stats


def meets_baseline(jobs: Sequence[Job]) -> Dict[str, Dict[str, Optional[bool]]]:
    """Per task, per backbone of ours: every compared metric >= the baseline's (None when either run failed or the
    baseline has no value; a metric missing from our run's results, e.g. mmdet's empty result for a detector that
    detects nothing, counts as below the baseline)."""
    result = {}
    for task in dict.fromkeys(j.task for j in jobs):
        runs = {j.backbone: j for j in jobs if j.task == task}
        base = runs.get(BASELINE)
        verdicts = {}
        for name, job in runs.items():
            if name == BASELINE:
                continue
            keys = [k for k, _ in TASKS[task].metrics]
            if base is None or base.metrics is None or job.metrics is None or any(k not in base.metrics for k in keys):
                verdicts[name] = None
            else:
                verdicts[name] = all(k in job.metrics and job.metrics[k] >= base.metrics[k] for k in keys)
        if verdicts:
            result[task] = verdicts
    return result


def plot_losses(task: str, jobs: Sequence[Job], out: Path, plot_curves) -> Optional[str]:
    """The training loss of every backbone of ``task`` on one axes; None when no run logged a loss."""
    runs = []
    for job in jobs:
        try:
            run = plot_curves.load_run(str(job.train_dir), job.backbone)
        except SystemExit:
            continue
        if 'loss' in run.train:
            runs.append(run)
    if not runs:
        return None
    iters = jobs[0].iters
    plot_curves.plot(runs, ['loss'], str(out), f'{TASKS[task].name}, demo data, {iters} iterations')
    return str(out)


def markdown(summary: dict) -> str:
    """One table per task: the compared metrics, the loss at the end, time per iteration, baseline verdict."""
    finished = sum(r['status'] not in ('pending', 'running') for r in summary['runs'])
    lines = [f'# Learning runs on the demo data ({summary["device"]})', '',
             f'The T configs with `--demo`, the same schedule and seed ({summary["seed"]}) for every backbone of a '
             f'task, {summary["gpus_per_run"]} GPU(s) per run, {summary["parallel"]} run(s) at a time. '
             f'{finished}/{len(summary["runs"])} runs finished in {summary["wall_s"] / 60:.1f} min. Demo data '
             f'x{summary["data_scale"]}{", tested with TTA" if summary["tta"] else ""}.', '']
    for task, info in summary['tasks'].items():
        labels = [label for _, label in TASKS[task].metrics]
        lines += [f'## {TASKS[task].name}: {info["iters"]} iterations, batch {info["batch"]} per GPU, AdamW lr '
                  f'{info["lr"]:g}', '',
                  f'Loss curves: `{info["loss_curve"]}`.' if info['loss_curve'] else 'Loss curves: none yet.', '',
                  '| backbone | ' + ' | '.join(labels) + ' | last loss (mean of 5) | s/iter | train (s) | '
                  f'>= {BASELINE} |', '|' + '---|' * (len(labels) + 5)]
        for run in (r for r in summary['runs'] if r['task'] == task):
            metrics = run['metrics'] or {}
            values = [f'{metrics[k]:.3f}' if k in metrics else ('no result' if run['status'] == 'ok' else run['status'])
                      for k, _ in TASKS[task].metrics]
            loss = f'{run["mean_loss_last5"]:.4f}' if 'mean_loss_last5' in run else '-'
            speed = f'{run["s_per_iter"]:.3f}' if 's_per_iter' in run else '-'
            verdict = summary['meets_baseline'].get(task, {}).get(run['backbone'])
            verdict = 'baseline' if run['backbone'] == BASELINE else {True: 'yes', False: 'no', None: '-'}[verdict]
            lines.append(f'| {run["backbone"]} | ' + ' | '.join(values)
                         + f' | {loss} | {speed} | {run["train_s"]:.0f} | {verdict} |')
        lines.append('')
    return '\n'.join(lines)


def write_outputs(work_dir: Path, args: argparse.Namespace, jobs: Sequence[Job], device: str, wall_s: float,
                  plot_curves) -> dict:
    """Write ``summary.json``, ``summary.md`` and the loss PNG of every task with a finished run; return the summary.
    Runs not finished yet are listed with their status (``pending`` or ``running``)."""
    tasks = {}
    for task in args.tasks:
        task_jobs = [j for j in jobs if j.task == task]
        finished = [j for j in task_jobs if j.finished]
        curve = plot_losses(task, finished, work_dir / f'loss_{task}.png', plot_curves) if finished else None
        tasks[task] = dict(name=TASKS[task].name, iters=task_jobs[0].iters, batch=task_jobs[0].batch,
                           lr=task_jobs[0].lr, loss_curve=curve,
                           metrics=[k for k, _ in TASKS[task].metrics])
    runs = [dict(task=j.task, backbone=j.backbone, config=j.config, status=j.status, iters=j.iters, metrics=j.metrics,
                 train_s=round(j.train_s, 1), test_s=round(j.test_s, 1), work_dir=str(j.root),
                 **(curve_stats(j, plot_curves) if j.finished else {})) for j in jobs]
    summary = dict(device=device, seed=args.seed, gpus_per_run=args.gpus, parallel=args.parallel, tta=args.tta,
                   data_scale=args.data_scale,
                   baseline=BASELINE, wall_s=round(wall_s, 1), tasks=tasks, runs=runs,
                   meets_baseline=meets_baseline(jobs))
    (work_dir / 'summary.json').write_text(json.dumps(summary, indent=1) + '\n')
    (work_dir / 'summary.md').write_text(markdown(summary) + '\n')
    return summary


def _device() -> str:
    import torch
    if torch.cuda.is_available():
        return f'cuda: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}'
    return f'cpu ({os.cpu_count()} cores)'


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    work_dir = Path(args.work_dir).resolve()
    data_root = work_dir / 'data'
    jobs = [Job(task, backbone, TASKS[task].configs[backbone], getattr(args, f'{task}_iters'),
                getattr(args, f'{task}_batch'), getattr(args, f'{task}_lr'), work_dir / task / backbone)
            for task in args.tasks for backbone in args.backbones]
    if args.dry_run:
        for job in jobs:
            print(shlex.join(train_command(job, args, data_root)))
            print(shlex.join(test_command(job, args, data_root, str(job.train_dir / f'iter_{job.iters}.pth'))))
        return 0

    start = time.perf_counter()
    work_dir.mkdir(parents=True, exist_ok=True)
    make_data = ['tools/make_demo_data.py', '--out', str(data_root), '--scale', str(args.data_scale)]
    subprocess.run([sys.executable, *make_data], cwd=REPO_ROOT, check=True)
    env = dict(os.environ, PYTHON=sys.executable)
    env.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1) // (args.parallel * args.gpus))))
    ports = PortPool()
    plot_curves = _plot_curves_module()
    device = _device()
    lock = threading.Lock()

    def run_and_report(job: Job) -> None:
        run_job(job, args, data_root, env, ports)
        with lock:  # the summary is rewritten after every run: a run cut short keeps what was finished
            write_outputs(work_dir, args, jobs, device, time.perf_counter() - start, plot_curves)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(run_and_report, jobs))
    summary = write_outputs(work_dir, args, jobs, device, time.perf_counter() - start, plot_curves)
    print(markdown(summary))
    print(f'[learning_runs] wrote {work_dir / "summary.json"}, {work_dir / "summary.md"}')
    failed = [f'{j.task}/{j.backbone} ({j.status})' for j in jobs if j.status != 'ok']
    if failed:
        print(f'[learning_runs] failed: {", ".join(failed)}', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
