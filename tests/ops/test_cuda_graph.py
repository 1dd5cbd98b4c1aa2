"""The bookkeeping of vssm.ops.cuda_graph.CudaGraphCache on a CPU: when it captures, replays, runs eagerly and drops its
graphs, with the CPU stand-in of tests/ops/graph_standin.py for the CUDA graph
(tests/models/test_inference_graphs_cuda.py runs the real capture on a GPU)."""
import copy
import pickle

import pytest
import torch
from ops.graph_standin import CpuGraphCache


class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((3, ), 2.0))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return (x * self.weight.to(x.dtype), x.sum(-1, keepdim=True))


def _cache(module, **kwargs):
    return CpuGraphCache(module, state=lambda: module.weight.data_ptr(), **kwargs)


def test_captured_at_the_second_call_then_replayed():
    module = Scale()
    cache = _cache(module)
    x = torch.randn(2, 3)
    outs = [cache(x + i) for i in range(4)]
    assert (cache.captures, cache.replays) == (1, 3)  # call 1 eager, call 2 captures and replays, calls 3-4 replay
    for i, out in enumerate(outs):
        torch.testing.assert_close(out[0], (x + i) * 2, rtol=0, atol=0)
    assert outs[2][0].data_ptr() != outs[3][0].data_ptr(), 'outputs must be copies of the static buffers'


def test_shape_dtype_and_autocast_state_are_part_of_the_key():
    cache = _cache(Scale())
    for x in (torch.randn(2, 3), torch.randn(4, 3), torch.randn(2, 3, dtype=torch.float64)):
        cache(x), cache(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        cache(torch.randn(2, 3)), cache(torch.randn(2, 3))
    assert cache.captures == 4 and len(cache._graphs) == 4


def test_least_recently_used_graph_is_dropped_beyond_capacity():
    cache = _cache(Scale(), capacity=2)
    for rows in (1, 2, 3):
        cache(torch.randn(rows, 3)), cache(torch.randn(rows, 3))
    assert [key[0] for key in cache._graphs] == [(2, 3), (3, 3)]


def test_values_written_in_place_are_replayed_and_replaced_tensors_drop_the_graphs():
    module = Scale()
    cache = _cache(module)
    x = torch.randn(2, 3)
    cache(x), cache(x)
    with torch.no_grad():
        module.weight.fill_(3.0)  # in place, as load_state_dict: the graph reads the new values
    torch.testing.assert_close(cache(x)[0], x * 3)
    assert (cache.captures, cache.replays) == (1, 2)
    module.weight = torch.nn.Parameter(torch.full((3, ), 5.0))  # another tensor, as .to() / .half(): graphs dropped
    torch.testing.assert_close(cache(x)[0], x * 5)
    assert not cache._graphs and cache.replays == 2


def test_large_inputs_disabled_caches_and_failed_captures_run_eagerly():
    module = Scale()
    cache = _cache(module, max_elements=6)
    cache(torch.randn(4, 3)), cache(torch.randn(4, 3))
    assert cache.captures == 0
    cache.enabled = False
    cache(torch.randn(2, 3)), cache(torch.randn(2, 3))
    assert cache.captures == 0

    class Failing(CpuGraphCache):
        def _record(self, x):
            raise RuntimeError('operation not permitted when stream is capturing')

    failing = Failing(module)
    x = torch.randn(2, 3)
    for _ in range(3):
        torch.testing.assert_close(failing(x)[0], x * 2)
    assert failing.captures == 0 and len(failing._failed) == 1  # tried once


def test_copies_start_empty():
    cache = CpuGraphCache(Scale())
    cache(torch.randn(2, 3)), cache(torch.randn(2, 3))
    for clone in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert clone.captures == 0 and not clone._graphs and clone.enabled


def test_functions_must_return_tuples():
    cache = CpuGraphCache(lambda x: x * 2)
    cache(torch.randn(2))
    with pytest.raises(TypeError, match='tuple of tensors'):
        cache(torch.randn(2))
