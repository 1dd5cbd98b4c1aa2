"""Multi-GPU check: the detection and segmentation demos through ``tools/dist_train.sh CONFIG NGPUS`` and
``tools/dist_test.sh``; the ranks hold the same model; a checkpoint resumes.

    python tools/benchmarks/multi_gpu_check.py --work-dir /tmp/multi-gpu [--gpus 2] [--tasks det seg]
        [--backbones spatial-mamba-t vmamba-t spectral-vmamba-t] [--iters 20] [--parallel 1]

For every task and backbone (the T configs of tools/benchmarks/learning_runs.py, on the CPU demo data made by
``tools/make_demo_data.py --out WORK_DIR/data``):

1. ``tools/dist_train.sh CONFIG GPUS --demo`` for ``--iters`` iterations (a checkpoint at the half and at the end),
   with ``RankAgreementHook`` added to the config's ``custom_hooks`` (vssm/engine/hooks.py): at the half and at the
   end, every parameter's checksum must be the same on every rank (it raises otherwise; BatchNorm buffers are
   reported, since only SyncBN keeps them equal). NCCL on GPUs, gloo on CPUs; the configs' SyncBN is real with more
   than one process.
2. The same command with ``--resume <run 1's half-way checkpoint>`` in a second work dir: it must start at the next
   iteration (read from its log) and end at ``--iters``; the report gives its last loss and the relative L2 distance
   of its final weights from run 1's (not zero in general: only rank 0's random generator states are in
   the checkpoint, and the GPU kernels' atomics are not bit-reproducible).
3. ``tools/dist_test.sh CONFIG <run 1's final checkpoint> GPUS --demo`` (distributed evaluation: results gathered
   from every rank): the metric.

Writes ``WORK_DIR/summary.json`` and ``WORK_DIR/summary.md`` (after every finished run); each run keeps its logs
under ``WORK_DIR/<task>/<backbone>/`` (``train.log``, ``resume.log``, ``test.log`` and mmengine's work dirs). Exit
status 1 if any check failed.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def _learning_runs():
    """tools/benchmarks/learning_runs.py (configs per task, data options, ports, logged launcher runs)."""
    from vssm.engine.launch import load_tool_module
    return load_tool_module(Path(__file__).with_name('learning_runs.py'), 'vssm_learning_runs_tool')


lr = _learning_runs()
TASKS = ('det', 'seg')
BACKBONES = tuple(b for b in lr.BACKBONES if b != lr.BASELINE)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work-dir', required=True, help='data, runs and the summary go here')
    parser.add_argument('--gpus', type=int, default=2, help='processes (GPUs) per run (default: 2)')
    parser.add_argument('--tasks', nargs='+', choices=TASKS, default=list(TASKS))
    parser.add_argument('--backbones', nargs='+', choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument('--iters', type=int, default=20, help='training iterations, an even number (default: 20)')
    parser.add_argument('--parallel', type=int, default=1, help='runs at the same time (default: 1)')
    args = parser.parse_args(argv)
    if args.gpus < 2:
        parser.error(f'--gpus must be at least 2 (this checks multi-process training), got {args.gpus}')
    if args.iters < 2 or args.iters % 2:
        parser.error(f'--iters must be an even number >= 2 (a checkpoint at the half), got {args.iters}')
    if args.parallel < 1:
        parser.error(f'--parallel must be at least 1, got {args.parallel}')
    if torch.cuda.is_available() and torch.cuda.device_count() < args.gpus:
        parser.error(f'--gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPU(s)')
    return args


def write_config(task: str, backbone: str, root: Path, interval: int) -> Path:
    """A config inheriting the task's T config with ``RankAgreementHook`` (checking every ``interval`` iterations)
    in ``custom_hooks``."""
    base = REPO_ROOT / lr.TASKS[task].configs[backbone]
    path = root / f'{base.stem}_rank_check.py'
    path.write_text(f'_base_ = [{str(base)!r}]\n'
                    "custom_hooks = [dict(type='mmengine.RNGStateHook'),\n"
                    f"                dict(type='mmengine.RankAgreementHook', interval={interval})]\n")
    return path


def train_options(task: str, iters: int, data_root: Path) -> List[str]:
    half = iters // 2
    return [f'train_cfg.max_iters={iters}', 'val_dataloader=None', 'val_cfg=None', 'val_evaluator=None',
            f'default_hooks.checkpoint.interval={half}', 'default_hooks.checkpoint.max_keep_ckpts=-1',
            f'default_hooks.logger.interval={min(5, half)}', *lr.data_options(task, data_root, 'train')]


def _read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _train_iters(work_dir: Path) -> List[int]:
    """The iterations logged by mmengine's JSON scalars (``vis_data/scalars.json``) of the training run(s)."""
    iters = []
    for scalars in sorted(work_dir.glob('*/vis_data/scalars.json')):
        iters += [r['iter'] for r in _read_jsonl(scalars) if 'loss' in r]
    return iters


def _last_loss(work_dir: Path) -> Optional[float]:
    records = [r for s in sorted(work_dir.glob('*/vis_data/scalars.json')) for r in _read_jsonl(s) if 'loss' in r]
    return records[-1]['loss'] if records else None


def rel_weight_diff(a: Path, b: Path) -> float:
    """``||x - y|| / ||x||`` over all floating-point tensors of two checkpoints' state dicts (the L2 norm of the
    concatenated weights: per-tensor ratios blow up on zero-initialized biases, which AdamW moves by about the
    learning rate per step whatever the gradient)."""
    sa = torch.load(a, map_location='cpu', weights_only=False)['state_dict']
    sb = torch.load(b, map_location='cpu', weights_only=False)['state_dict']
    if sa.keys() != sb.keys():
        raise ValueError(f'{a} and {b} hold different keys')
    diff = norm = 0.0
    for key, x in sa.items():
        if x.is_floating_point():
            diff += float((x.double() - sb[key].double()).square().sum())
            norm += float(x.double().square().sum())
    return (diff / max(norm, 1e-300)) ** 0.5


def check_one(task: str, backbone: str, args: argparse.Namespace, data_root: Path, env: dict, ports) -> dict:
    root = Path(args.work_dir).resolve() / task / backbone
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    config = write_config(task, backbone, root, args.iters // 2)
    result = dict(task=task, backbone=backbone, config=lr.TASKS[task].configs[backbone], gpus=args.gpus, ok=False)
    run1, run2 = root / 'train', root / 'resume'
    common = [str(config), str(args.gpus), '--demo']
    options = ['--cfg-options', *train_options(task, args.iters, data_root)]
    half = args.iters // 2

    ok, result['train_s'] = lr._run_logged(['tools/dist_train.sh', *common, '--work-dir', str(run1), *options],
                                           root / 'train.log', env, ports)
    checks = _read_jsonl(run1 / 'rank_agreement.jsonl')
    result['rank_checks'] = checks
    final = run1 / f'iter_{args.iters}.pth'
    if not ok or not final.is_file():
        result['error'] = f'training failed: {lr._tail(root / "train.log", 15)}'
        return result
    result['ranks_agree'] = bool(checks) and all(c['params_agree'] and c['world_size'] == args.gpus for c in checks)
    result['last_loss'] = _last_loss(run1)

    ok, result['resume_s'] = lr._run_logged(
        ['tools/dist_train.sh', *common, '--work-dir', str(run2), '--resume', str(run1 / f'iter_{half}.pth'),
         *options], root / 'resume.log', env, ports)
    resumed_iters = _train_iters(run2)
    result['resume_first_logged_iter'] = resumed_iters[0] if resumed_iters else None
    result['resume_last_loss'] = _last_loss(run2)
    resumed_final = run2 / f'iter_{args.iters}.pth'
    result['resumed'] = (ok and resumed_final.is_file() and not (run2 / f'iter_{half}.pth').exists()
                         and bool(resumed_iters) and half < resumed_iters[0] <= args.iters)
    resume_checks = _read_jsonl(run2 / 'rank_agreement.jsonl')
    result['resume_ranks_agree'] = bool(resume_checks) and all(c['params_agree'] for c in resume_checks)
    if resumed_final.is_file():
        result['resume_rel_weight_diff'] = rel_weight_diff(final, resumed_final)

    ok, result['test_s'] = lr._run_logged(['tools/dist_test.sh', str(config), str(final), str(args.gpus), '--demo',
                                           '--work-dir', str(root / 'test'), '--cfg-options',
                                           *lr.data_options(task, data_root, 'test')], root / 'test.log', env, ports)
    metrics_file = root / 'test' / 'metrics.json'
    result['metrics'] = json.loads(metrics_file.read_text()) if ok and metrics_file.is_file() else None
    if result['metrics'] is None:
        result['error'] = f'test failed: {lr._tail(root / "test.log", 15)}'
    for path in root.rglob('*.pth'):
        path.unlink()
    result['ok'] = bool(result['ranks_agree'] and result['resumed'] and result['resume_ranks_agree']
                        and result['metrics'] is not None)
    return result


def markdown(summary: dict) -> str:
    lines = [f'# Multi-GPU check ({summary["device"]}, {summary["gpus"]} processes per run)', '',
             f'{summary["iters"]} training iterations of each demo, resumed from iteration {summary["iters"] // 2}.',
             '', '| task | backbone | ranks agree | resumed at | resumed vs uninterrupted weights (rel. L2) | metric '
             '| ok |',
             '|---|---|---|---|---|---|---|']
    for r in summary['runs']:
        metrics = r.get('metrics') or {}
        key = {'det': 'coco/bbox_mAP', 'seg': 'mIoU'}[r['task']]
        metric = f'{key} {metrics[key]:.3f}' if key in metrics else r.get('status', '-')
        diff = r.get('resume_rel_weight_diff')
        lines.append(f'| {r["task"]} | {r["backbone"]} | {r.get("ranks_agree", "-")} / '
                     f'{r.get("resume_ranks_agree", "-")} | {r.get("resume_first_logged_iter", "-")} | '
                     f'{"-" if diff is None else f"{diff:.2e}"} | {metric} | {r.get("ok", "-")} |')
    return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    work_dir = Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    data_root = work_dir / 'data'
    subprocess.run([sys.executable, 'tools/make_demo_data.py', '--out', str(data_root)], cwd=REPO_ROOT, check=True)
    env = dict(os.environ, PYTHON=sys.executable)
    env.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1) // (args.parallel * args.gpus))))
    ports = lr.PortPool()
    device = (f'cuda: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}' if torch.cuda.is_available()
              else f'cpu ({os.cpu_count()} cores, gloo)')
    pairs = [(t, b) for t in args.tasks for b in args.backbones]
    runs = [dict(task=t, backbone=b, status='pending') for t, b in pairs]
    lock = threading.Lock()
    start = time.perf_counter()

    def write() -> dict:
        summary = dict(device=device, gpus=args.gpus, iters=args.iters, wall_s=round(time.perf_counter() - start, 1),
                       runs=runs)
        (work_dir / 'summary.json').write_text(json.dumps(summary, indent=1) + '\n')
        (work_dir / 'summary.md').write_text(markdown(summary))
        return summary

    def one(index: int) -> None:
        task, backbone = pairs[index]
        print(f'[multi_gpu_check] {task}/{backbone}: {args.gpus} processes', flush=True)
        runs[index] = dict(runs[index], status='running')
        result = check_one(task, backbone, args, data_root, env, ports)
        result['status'] = 'ok' if result['ok'] else 'FAILED'
        print(f'[multi_gpu_check] {task}/{backbone}: {result["status"]}'
              + (f' ({result["error"]})' if 'error' in result else ''), flush=True)
        with lock:
            runs[index] = result
            write()

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(one, range(len(pairs))))
    summary = write()
    print(markdown(summary))
    failed = [f'{r["task"]}/{r["backbone"]}' for r in runs if not r.get('ok')]
    if failed:
        print(f'[multi_gpu_check] failed: {", ".join(failed)}', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
