"""Timing and device memory for the measuring tools: one protocol on a GPU and on a CPU.

On a GPU a span is timed with CUDA events around back-to-back calls (the host queues the next call while the GPU
runs this one, as in a model); on a CPU with ``time.perf_counter``. Peak memory is
``torch.cuda.max_memory_allocated`` (``None`` on a CPU, where there is no allocator to ask).
"""
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ['synchronize', 'release', 'reset_peak', 'peak_bytes', 'timed_span', 'median_ms', 'device_name',
           'error_text']


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
