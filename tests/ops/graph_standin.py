"""A CPU stand-in for :class:`vssm.ops.cuda_graph.CudaGraphCache`'s CUDA graphs: CPU tensors are accepted, and a
"graph" replays the recorded function on the captured input and output buffers, as a CUDA graph replays its kernels.
Everything else (keys, state, capacity, clones of the outputs) is the real cache's code."""
from vssm.ops.cuda_graph import CudaGraphCache


class _RecordedCall:
    """What a CUDA graph does on replay: the recorded work again, on the same input and output buffers."""

    def __init__(self, fn, static_in, static_out):
        self.fn, self.static_in, self.static_out = fn, static_in, static_out

    def replay(self):
        for buffer, value in zip(self.static_out, self.fn(self.static_in)):
            buffer.copy_(value)


class CpuGraphCache(CudaGraphCache):
    @staticmethod
    def _supports(x):
        return True

    def _record(self, x):
        static_in = x.clone()
        static_out = self.fn(static_in)
        return _RecordedCall(self.fn, static_in, static_out), static_in, static_out
