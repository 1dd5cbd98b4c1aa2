"""Plot training curves (loss, lr, ...) and validation metrics of one or more runs from mmengine's JSON logs.

    python tools/analysis_tools/plot_curves.py WORK_DIR_OR_JSON [WORK_DIR_OR_JSON ...] [--keys loss accuracy/top1]
        [--legend NAME ...] [--out curves.png] [--title TITLE]

Each argument is one run: a work dir (every ``<timestamp>/vis_data/scalars.json`` in it, oldest first, so a resumed
run continues its curves; a ``<timestamp>.json`` stands in where a timestamp folder has no ``scalars.json``) or one
JSON log file (``scalars.json`` or ``<timestamp>.json``: one JSON object per line, as mmengine's LoggerHook writes).
One subplot per key, one line per run.

* Training records carry ``iter`` (and ``epoch`` in epoch-based runs): their keys are plotted against the iteration.
* Validation records have no ``iter``. They are plotted against the epoch in epoch-based runs and against the
  iteration in iteration-based ones; where runs of both kinds share a subplot, against the iteration. mmengine
  writes ``step=0`` for validation in iteration-based runs unless ``default_hooks.logger.log_metric_by_epoch=False``,
  so the iteration of a validation is taken from the last training record before it (or from ``step`` when it is
  a real iteration).
* A key present in both (``time``, ``data_time``) is the training one.

Default keys: ``loss`` and every validation metric. A key no run has is an error that lists the available keys.
"""
import argparse
import json
import os.path as osp
import sys
from dataclasses import dataclass, field
from glob import glob
from typing import Dict, List, Optional, Sequence, Tuple

TIME_KEYS = ('time', 'data_time')


@dataclass
class Run:
    """The curves of one run.

    Attributes:
        name: legend label.
        files: the log files read, oldest first.
        train: key -> {iteration: value}.
        val: key -> {(iteration, epoch or None): value}.
        by_epoch: whether the training loop is epoch-based (training records carry ``epoch``).
    """
    name: str
    files: List[str]
    train: Dict[str, Dict[int, float]] = field(default_factory=dict)
    val: Dict[str, Dict[Tuple[int, Optional[int]], float]] = field(default_factory=dict)
    by_epoch: bool = False

    def keys(self) -> List[str]:
        return sorted(self.train) + sorted(k for k in self.val if k not in self.train)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', metavar='WORK_DIR_OR_JSON', help='work dirs and/or JSON log files')
    parser.add_argument('--keys', nargs='+', help='keys to plot (default: loss and every validation metric)')
    parser.add_argument('--legend', nargs='+', help='one label per run (default: the work dir names)')
    parser.add_argument('--out', default='curves.png', help='output image (PNG, or any format matplotlib writes)')
    parser.add_argument('--title', help='figure title')
    return parser.parse_args(argv)


def find_logs(path: str) -> List[str]:
    """The JSON logs of a run: ``path`` itself, or those of the work dir ``path`` (oldest timestamp first)."""
    if osp.isfile(path):
        return [path]
    if not osp.isdir(path):
        raise SystemExit(f'plot_curves: {path!r} does not exist.')
    found = []
    for stamp_dir in sorted(d for d in glob(osp.join(path, '*')) if osp.isdir(d)):
        stamp = osp.basename(stamp_dir)
        candidates = [osp.join(stamp_dir, 'vis_data', 'scalars.json'), osp.join(stamp_dir, 'vis_data', f'{stamp}.json'),
                      osp.join(stamp_dir, f'{stamp}.json')]
        found += [c for c in candidates if osp.isfile(c)][:1]
    if not found and osp.isfile(osp.join(path, 'vis_data', 'scalars.json')):  # a <timestamp> folder itself
        found = [osp.join(path, 'vis_data', 'scalars.json')]
    if not found:
        raise SystemExit(f'plot_curves: no log in {path!r}: looked for <timestamp>/vis_data/scalars.json, '
                         '<timestamp>/vis_data/<timestamp>.json and <timestamp>/<timestamp>.json (mmengine writes '
                         'them while training; test-only runs have none).')
    return found


def read_records(path: str) -> List[dict]:
    """The JSON objects of a log, one per line (blank lines skipped)."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f'plot_curves: {path}:{number} is not a JSON object per line ({error.msg}); pass '
                                 'a work dir, scalars.json or <timestamp>.json.') from None
            if isinstance(record, dict):
                records.append(record)
    return records


def load_run(path: str, name: Optional[str] = None) -> Run:
    """Read every log of one run into a :class:`Run`; later files override earlier points at the same place."""
    files = find_logs(path)
    run = Run(name or _default_name(path), files)
    for file in files:
        last_iter, last_epoch = 0, None
        for record in read_records(file):
            if 'iter' in record:  # training
                last_iter = int(record['iter'])
                if 'epoch' in record:
                    run.by_epoch, last_epoch = True, int(record['epoch'])
                for key, value in _scalars(record, ('iter', 'epoch', 'step')):
                    run.train.setdefault(key, {})[last_iter] = value
            elif 'step' in record:  # validation (test results carry no step)
                # step: the epoch, or (log_metric_by_epoch=False) the iteration; 0 in iteration-based runs by default
                iteration = last_iter if run.by_epoch else max(int(record['step']), last_iter)
                for key, value in _scalars(record, ('step', )):
                    run.val.setdefault(key, {})[(iteration, last_epoch)] = value
    if not run.train and not run.val:
        raise SystemExit(f'plot_curves: {", ".join(files)} hold no training or validation records.')
    return run


def _scalars(record: dict, skip: Tuple[str, ...]):
    for key, value in record.items():
        if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, float(value)


def _default_name(path: str) -> str:
    """The work dir's name: ``work/run`` for ``work/run``, ``work/run/<stamp>/vis_data/scalars.json`` alike."""
    path = osp.abspath(path)
    if osp.isfile(path):
        parts = path.split(osp.sep)
        if len(parts) >= 4 and parts[-2] == 'vis_data':
            return parts[-4]  # <work_dir>/<stamp>/vis_data/<file>
        if len(parts) >= 3 and osp.splitext(parts[-1])[0] == parts[-2]:
            return parts[-3]  # <work_dir>/<stamp>/<stamp>.json
        return osp.splitext(parts[-1])[0]
    return osp.basename(path.rstrip(osp.sep))


def default_keys(runs: Sequence[Run]) -> List[str]:
    """``loss`` (when logged) and every validation metric of any run, in first-seen order."""
    keys = ['loss'] if any('loss' in r.train for r in runs) else []
    for run in runs:
        keys += [k for k in sorted(run.val) if k not in TIME_KEYS and k not in run.train and k not in keys]
    return keys


def check_keys(runs: Sequence[Run], keys: Sequence[str]) -> None:
    """Fail on a key that no run has (listing the available keys); warn about runs that lack a key."""
    for key in keys:
        lacking = [r.name for r in runs if key not in r.train and key not in r.val]
        if len(lacking) == len(runs):
            available = '\n'.join(f'  {r.name}: {", ".join(r.keys())}' for r in runs)
            raise SystemExit(f'plot_curves: no run has the key {key!r}. Available keys:\n{available}')
        if lacking:
            print(f'plot_curves: {key!r} is missing from {", ".join(lacking)}.', file=sys.stderr)


def series(run: Run, key: str, by_epoch: bool) -> Tuple[List[float], List[float]]:
    """(x, y) of ``key`` in ``run``: against the iteration, or the epoch for validation keys when ``by_epoch``."""
    if key in run.train:
        points = sorted(run.train[key].items())
    elif key in run.val:
        points = sorted(((epoch if by_epoch else iteration), value)
                        for (iteration, epoch), value in run.val[key].items())
    else:
        return [], []
    return [float(x) for x, _ in points], [y for _, y in points]


def plot(runs: Sequence[Run], keys: Sequence[str], out: str, title: Optional[str] = None) -> None:
    """One subplot per key (two columns), one line per run."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cols = 1 if len(keys) == 1 else 2
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        is_train = any(key in r.train for r in runs)
        holders = [r for r in runs if key in r.val]
        by_epoch = not is_train and all(r.by_epoch for r in holders)
        for run in runs:
            x, y = series(run, key, by_epoch)
            if x:
                ax.plot(x, y, label=run.name, marker=None if is_train or len(x) > 30 else 'o', markersize=3)
        kind = 'train' if is_train else 'val'
        ax.set_title(f'{key} ({kind})', fontsize=10)
        ax.set_xlabel('epoch' if by_epoch else 'iteration')
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> List[Run]:
    args = parse_args(argv)
    if args.legend and len(args.legend) != len(args.runs):
        raise SystemExit(f'plot_curves: --legend has {len(args.legend)} names for {len(args.runs)} runs.')
    names = args.legend or [None] * len(args.runs)
    runs = [load_run(path, name) for path, name in zip(args.runs, names)]
    keys = args.keys or default_keys(runs)
    if not keys:
        raise SystemExit('plot_curves: no loss and no validation metric in the logs; choose --keys among:\n'
                         + '\n'.join(f'  {r.name}: {", ".join(r.keys())}' for r in runs))
    check_keys(runs, keys)
    for run in runs:
        print(f'{run.name}: {len(run.files)} log file(s), {"epoch" if run.by_epoch else "iteration"}-based')
        for key in keys:
            x, y = series(run, key, False)
            if x:
                print(f'  {key}: {len(x)} points, last {y[-1]:.6g} at iteration {x[-1]:.0f}')
    plot(runs, keys, args.out, args.title)
    print(f'plot_curves: wrote {args.out}')
    return runs


if __name__ == '__main__':
    main()
