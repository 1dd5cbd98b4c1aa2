"""Timing and device memory for the measuring tools: one protocol on a GPU and on a CPU.

On a GPU a span is timed with CUDA events around back-to-back calls (the host queues the next call while the GPU
runs this one, as in a model); on a CPU with ``time.perf_counter``. Peak memory is
``torch.cuda.max_memory_allocated`` (``None`` on a CPU, where there is no allocator to ask). Where the time goes:
``profile_top_ops``, the top kernels (GPU) or operators (CPU) of a step under ``torch.profiler``, each with its call
sites in this repository.
"""
import bisect
import gc
import json
import re
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

__all__ = ['synchronize', 'release', 'reset_peak', 'peak_bytes', 'timed_span', 'median_ms', 'device_name',
           'error_text', 'call_site', 'call_sites', 'profile_top_ops', 'format_top_op']


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on a CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what is no longer referenced: Python garbage, then the CUDA caching allocator's unused blocks."""
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    """Release memory, then start a new peak-memory measurement."""
    release(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> Optional[int]:
    """The peak allocated bytes since :func:`reset_peak`; ``None`` on a CPU."""
    return torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None


def timed_span(step: Callable[[], object], iters: int, device: torch.device) -> float:
    """Seconds for ``iters`` back-to-back calls of ``step``, timed as one span."""
    synchronize(device)
    if device.type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    for _ in range(iters):
        step()
    return time.perf_counter() - begin


def median_ms(step: Callable[[], object], device: torch.device, warmup: int = 3, rounds: int = 10,
              calls: int = 1) -> float:
    """Milliseconds per call of ``step``: ``warmup`` untimed calls, then the median over ``rounds`` spans of
    ``calls`` back-to-back calls each."""
    for _ in range(warmup):
        step()
    return statistics.median(timed_span(step, calls, device) * 1e3 / calls for _ in range(rounds))


def prepare_device(name: str, tf32: bool) -> torch.device:
    """The device of ``--device NAME`` for a measuring tool, with the shared numerics: TF32 for fp32 matmuls and
    cuDNN convolutions as asked, cuDNN benchmark off, the random seed 0. Exits with one line without a GPU."""
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f'--device {name}: no CUDA device here; use --device cpu.')
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    return device


def device_name(device: torch.device) -> str:
    """E.g. ``'NVIDIA H200 (140 GiB)'`` or ``'CPU (2 threads)'``."""
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        return f'{props.name} ({props.total_memory / 2**30:.0f} GiB)'
    return f'CPU ({torch.get_num_threads()} threads)'


def error_text(error: BaseException) -> str:
    """One line for a failed measurement: ``'out of memory'`` or the exception's type and first line."""
    if isinstance(error, torch.OutOfMemoryError):
        return 'out of memory'
    lines = str(error).strip().splitlines() or ['']
    return f'{type(error).__name__}: {lines[0]}'[:300]


def write_results(json_path: Optional[str], markdown_path: Optional[str], meta: dict, rows: list,
                  to_markdown: Callable[[dict, list], str]) -> None:
    """A measuring tool's outputs: ``--json`` (the settings and every row) and ``--markdown`` (``to_markdown``'s
    tables), each written when its path is given (rewritten after every model, so a cut run keeps its rows)."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(dict(meta=meta, rows=list(rows)), indent=1))
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(to_markdown(meta, rows))


# a Python-function event of the profiler (recorded with_stack): 'vssm/ops/token_maps.py(56): _gather'
_CALL_SITE = re.compile(r'(?:^|/)((?:vssm|tools)/[^\s(]+\.py\(\d+\): \S+)')


def call_site(event: Any) -> str:
    """The innermost call site in this repository (``vssm/`` or ``tools/``, not this measuring package) of a profiled
    operator: its nearest Python-function ancestor in the profile, e.g. ``'vssm/ops/token_maps.py(56): _gather'``,
    or the innermost such frame of the Python stack recorded with an event on the way up; '' when none."""
    while event is not None:
        frames = getattr(event, 'stack', None) or ()  # innermost first
        site = _repo_site(event.name) or next(filter(None, map(_repo_site, frames)), '')
        if site:
            return site
        event = event.cpu_parent
    return ''


def _repo_site(name: str) -> str:
    """The call site a profiler event's name or stack frame names ('' for an operator, or for a frame of the
    measuring harness)."""
    match = _CALL_SITE.search(name)
    return match.group(1) if match and not match.group(1).startswith('vssm/analysis/') else ''


class _EnclosingSites:
    """The innermost repository call site whose Python-function event encloses a time on the same thread: for the
    events that launch kernels when the profiler leaves them outside the operator tree (CUDA runtime launches with no
    ``cpu_parent``)."""

    def __init__(self, events: Sequence[Any]) -> None:
        self.frames: Dict[Any, List[Any]] = defaultdict(list)
        for event in events:
            if getattr(event, 'time_range', None) is not None and _repo_site(event.name):
                self.frames[getattr(event, 'thread', None)].append(event)
        for frames in self.frames.values():
            frames.sort(key=lambda e: e.time_range.start)
        self.starts = {thread: [e.time_range.start for e in frames] for thread, frames in self.frames.items()}

    def __call__(self, event: Any) -> str:
        time_range, thread = getattr(event, 'time_range', None), getattr(event, 'thread', None)
        if time_range is None or thread not in self.frames:
            return ''
        frames = self.frames[thread]
        # frames nest: walking back from the last one started before the event, the first that has not ended yet
        # is the innermost enclosing one
        for i in range(bisect.bisect_right(self.starts[thread], time_range.start) - 1, -1, -1):
            if frames[i].time_range.end >= time_range.end:
                return _repo_site(frames[i].name)
        return ''


def call_sites(events: Sequence[Any], names: Sequence[str], gpu: bool, top: int = 2) -> Dict[str, str]:
    """For each kernel (``gpu``: launched by the events among ``events``) or CPU operator named in ``names``, its
    ``top`` call sites (:func:`call_site`, else the enclosing Python frame on the launching thread) with their counts,
    e.g. ``'vssm/ops/token_maps.py(56): _gather x28'``; ``?`` where none is found (e.g. the backward's kernels,
    launched by autograd's own thread)."""
    wanted, counts = set(names), defaultdict(Counter)
    enclosing = None
    for event in events:
        if gpu:
            kernels = [k for k in getattr(event, 'kernels', None) or () if k.name in wanted]
            if not kernels:
                continue
            site = call_site(event)
            if not site:
                enclosing = enclosing or _EnclosingSites(events)
                site = enclosing(event)
            for kernel in kernels:
                counts[kernel.name][site] += 1
        elif event.name in wanted and event.device_type.name == 'CPU':
            counts[event.name][call_site(event)] += 1
    return {name: ', '.join(f'{site or "?"} x{n}' for site, n in sites.most_common(top))
            for name, sites in counts.items()}


def profile_top_ops(step: Callable[[], None], iters: int, device: torch.device, top: int = 15) -> List[Dict[str, Any]]:
    """Where the time of ``step`` goes: torch.profiler over ``iters`` calls, the ``top`` kernels (GPU) or operators
    (CPU) by self time, each with its time per call of ``step`` (ms), share of the total, count per call and where in
    this repository it is called from (``where``: the two most frequent call sites, :func:`call_sites`)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities, with_stack=True) as prof:
        for _ in range(iters):
            step()
        synchronize(device)
    gpu = device.type == 'cuda'
    events = [e for e in prof.key_averages() if (e.device_type.name == 'CUDA' if gpu else True)]
    self_us = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    total = sum(self_us(e) for e in events) or 1.0
    events = sorted(events, key=self_us, reverse=True)[:top]
    sites = call_sites(prof.events(), [e.key for e in events], gpu)
    return [dict(name=e.key[:120], ms=self_us(e) / 1e3 / iters, share=self_us(e) / total, calls=e.count / iters,
                 where=sites.get(e.key, '')) for e in events]


def format_top_op(op: Dict[str, Any], name: Optional[str] = None) -> str:
    """One of :func:`profile_top_ops`' rows as a line: time per step, share, launches per step, ``name`` (default:
    the op's own) and its call sites."""
    where = f"  <- {op['where']}" if op.get('where') else ''
    return f"{op['ms']:9.3f} ms {op['share']:6.1%} {op['calls']:6.1f}x  {name or op['name']}{where}"
