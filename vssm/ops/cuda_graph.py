"""Replay a host-sync-free tensor function as CUDA graphs, one graph per input shape.

A function made of many small kernels (Spectral VMamba's iterative eigensolver: about 300 launches for 1.9 ms of GPU
work at 512x512) is bound by the CPU's launch rate. Captured once per input shape and replayed, it costs one launch.

The function must not synchronize with the host (no ``.item()``, no ``eigh``/``lstsq`` with error checks, no
data-dependent shapes) and must be a pure function of its tensor input. A shape is captured the second time it is
seen (a shape seen once, as in multi-scale detection training, never pays for a capture), at most ``capacity`` graphs
are kept (least recently used dropped) and inputs whose ``numel * cost_factor`` exceeds ``max_elements`` run eagerly
(large inputs are GPU-bound, and a graph's private memory pool would hold all their intermediates). A capture that
fails is remembered and that shape runs eagerly from then on, with one warning (but a capture that fails after
drawing random numbers leaves CUDA's generator unusable: functions that may fail to capture must not be given here).
Outputs are cloned out of the graph's static buffers, so they stay valid after the next replay.

A graph is recorded for the autocast state of its capture (autocast on or off, and its dtype, are part of the key).
It reads every other tensor (weights, buffers) through the addresses it was captured with: ``state``, when given,
returns something that changes when those tensors are replaced (e.g. their ``data_ptr()`` s: ``module.to(...)``,
``.half()``), and a change drops every graph. Values written in place (``load_state_dict``, optimizer steps) are seen
by the next replay.

The cache is per module instance, not global: ``copy.deepcopy`` (EMA teachers) and pickling give an empty cache, and a
lock serializes replays (threads).
"""
import threading
from collections import OrderedDict
from typing import Callable, Dict, Hashable, Optional, Set, Tuple

import torch
from mmengine.logging import print_log
from torch import Tensor

__all__ = ['CudaGraphCache']


class CudaGraphCache:
    """Per-shape CUDA-graph replay of ``fn(x) -> tuple of tensors``.

    Args:
        fn: the function; called eagerly on CPU tensors, under ``torch.compile`` tracing, while another capture is
            running, when disabled, and for inputs above ``max_elements``.
        capacity: graphs kept.
        max_elements: largest ``x.numel() * cost_factor(x)`` that is captured.
        cost_factor: estimate of the intermediates' size relative to the input (``None``: 1).
        enabled: ``False`` always runs eagerly.
        state: returns a hashable that changes when the tensors ``fn`` reads besides ``x`` are replaced (``None``:
            they never are); a change drops every graph.
    """

    def __init__(self, fn: Callable[[Tensor], Tuple[Tensor, ...]], capacity: int = 4, max_elements: int = 1 << 26,
                 cost_factor: Optional[Callable[[Tensor], int]] = None, enabled: bool = True,
                 state: Optional[Callable[[], Hashable]] = None) -> None:
        self.fn = fn
        self.capacity = capacity
        self.max_elements = max_elements
        self.cost_factor = cost_factor
        self.enabled = enabled
        self.state = state
        self._reset()

    def _reset(self) -> None:
        self._graphs: 'OrderedDict[Hashable, Tuple[torch.cuda.CUDAGraph, Tensor, Tuple[Tensor, ...]]]' = OrderedDict()
        self._seen: Dict[Hashable, int] = {}
        self._failed: Set[Hashable] = set()
        self._lock = threading.Lock()
        self._state: Hashable = None
        self.replays = 0  # statistics, for tests and benchmarks
        self.captures = 0

    # deepcopy / pickle: an empty cache (graphs are bound to their device buffers and cannot be copied).
    def __getstate__(self) -> dict:
        return dict(fn=self.fn, capacity=self.capacity, max_elements=self.max_elements, cost_factor=self.cost_factor,
                    enabled=self.enabled, state=self.state)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    @staticmethod
    def _supports(x: Tensor) -> bool:
        return x.is_cuda

    def _eager(self, x: Tensor) -> bool:
        if not (self.enabled and self._supports(x)) or torch.compiler.is_compiling():
            return True
        if x.is_cuda and torch.cuda.is_current_stream_capturing():  # inside another capture: record the kernels
            return True
        factor = self.cost_factor(x) if self.cost_factor is not None else 1
        return x.numel() * factor > self.max_elements

    def __call__(self, x: Tensor) -> Tuple[Tensor, ...]:
        if self._eager(x):
            return self.fn(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        key = (tuple(x.shape), x.stride(), x.dtype, x.device, autocast,
               torch.get_autocast_dtype(x.device.type) if autocast else None)
        with self._lock:
            if self.state is not None:
                state = self.state()
                if state != self._state:  # the graphs read tensors that are gone
                    self._graphs.clear()
                    self._seen.clear()
                    self._failed.clear()
                    self._state = state
            entry = self._graphs.get(key)
            if entry is None:
                if key in self._failed:
                    return self.fn(x)
                self._seen[key] = self._seen.get(key, 0) + 1
                if self._seen[key] < 2:
                    return self.fn(x)
                entry = self._capture(key, x)
                if entry is None:
                    return self.fn(x)
            self._graphs.move_to_end(key)
            graph, static_in, static_out = entry
            static_in.copy_(x)
            graph.replay()
            self.replays += 1
            return tuple(t.clone() for t in static_out)

    def _capture(self, key: Hashable, x: Tensor) -> Optional[Tuple[torch.cuda.CUDAGraph, Tensor, Tuple[Tensor, ...]]]:
        try:
            entry = self._record(x)
        except RuntimeError as error:
            self._failed.add(key)
            print_log(f'CudaGraphCache: capturing {getattr(self.fn, "__name__", self.fn)} for input shape '
                      f'{tuple(x.shape)} failed ({error}); this shape runs eagerly (same results, more CPU time).',
                      logger='current', level=30)
            return None
        if not isinstance(entry[2], tuple):
            raise TypeError('CudaGraphCache: the function must return a tuple of tensors.')
        self.captures += 1
        self._graphs[key] = entry
        while len(self._graphs) > self.capacity:
            self._graphs.popitem(last=False)
        return entry

    def _record(self, x: Tensor) -> Tuple[torch.cuda.CUDAGraph, Tensor, Tuple[Tensor, ...]]:
        """(graph, static input, static outputs): ``fn`` on a copy of ``x``, warmed up on a side stream, captured."""
        static_in = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (library handles, workspaces)
            self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (e.g. the data loader's pin-memory thread) stay legal.
        with torch.cuda.graph(graph, capture_error_mode='thread_local'):
            static_out = self.fn(static_in)
        return graph, static_in, static_out
