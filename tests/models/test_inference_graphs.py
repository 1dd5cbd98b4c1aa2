"""The backbones' ``inference_graphs`` option on a CPU: off by default, eager on CPU tensors, the graph path taken only
in eval mode with autograd off, and (with the CPU stand-in of tests/ops/graph_standin.py for the CUDA graph) replays
equal to the eager forward, through weight loads and dtype changes. The real capture: test_inference_graphs_cuda.py."""
import copy

import pytest
import torch
from models.families import BY_NAME, FAMILIES
from ops.graph_standin import CpuGraphCache

# the families that take inference_graphs=True (Spectral VMamba refuses it: test_refused_with_the_reason)
GRAPH_FAMILIES = [f for f in FAMILIES if not f.cls.graph_capture_blocker]
FAMILY_IDS = [f.name for f in GRAPH_FAMILIES]
SIZE = 64


def _build(family, **kwargs):
    torch.manual_seed(0)
    return family.cls(family.small_arch, out_indices=(0, 1, 2, 3), **kwargs).eval()


def _with_standin(model):
    graphs = model.inference_graphs
    model.inference_graphs = CpuGraphCache(graphs.fn, max_elements=graphs.max_elements, enabled=graphs.enabled,
                                           state=graphs.state)
    return model


def _assert_equal(outs, expected):
    assert len(outs) == len(expected)
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize('family', GRAPH_FAMILIES, ids=FAMILY_IDS)
def test_off_by_default_and_eager_on_cpu_tensors(family):
    assert not _build(family).inference_graphs.enabled
    model = _build(family, inference_graphs=True)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        outs = [model(x) for _ in range(3)]
        _assert_equal(outs[2], model._forward(x))
    assert model.inference_graphs.captures == 0
    clone = copy.deepcopy(model)
    assert clone.inference_graphs.fn.__self__ is clone and clone.inference_graphs.enabled
    with pytest.raises(TypeError, match='inference_graphs must be True or False'):
        family.cls(family.small_arch, inference_graphs='yes')


@pytest.mark.parametrize('family', GRAPH_FAMILIES, ids=FAMILY_IDS)
def test_replays_equal_the_eager_forward(family):
    model = _with_standin(_build(family, inference_graphs=True))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model._forward(x)
        for _ in range(3):
            _assert_equal(model(x), expected)
        assert (model.inference_graphs.captures, model.inference_graphs.replays) == (1, 2)
        # Weights loaded in place are read by the next replay.
        other = _build(family)
        for p in other.parameters():
            p.data.mul_(1.5)
        model.load_state_dict(other.state_dict())
        _assert_equal(model(x), other._forward(x))
        assert model.inference_graphs.replays == 3
        # New weight tensors (here: float64) drop the graphs; the new dtype is a new key.
        model.double()
        assert model(x.double())[0].dtype == torch.float64 and not model.inference_graphs._graphs


@pytest.mark.parametrize('family', GRAPH_FAMILIES[:1], ids=FAMILY_IDS[:1])
def test_training_and_gradients_run_eagerly(family):
    model = _with_standin(_build(family, inference_graphs=True))
    x = torch.randn(1, 3, SIZE, SIZE)
    for _ in range(2):
        outs = model(x)  # eval, but autograd on
    assert outs[0].requires_grad and model.inference_graphs.captures == 0
    model.train()
    with torch.no_grad():
        model(x), model(x)
    assert model.inference_graphs.captures == 0


def test_refused_with_the_reason():
    """Spectral VMamba's forward synchronizes with the host (the eigensolver's error check) in every call: no graph
    can hold it, and a capture failing midway would leave CUDA's random-number state unusable."""
    family = BY_NAME['SpectralVMamba']
    assert len(GRAPH_FAMILIES) == len(FAMILIES) - 1
    with pytest.raises(ValueError, match=r'SpectralVMamba: inference_graphs=True is not supported: its spectral '
                                         r'ordering solves an eigenproblem .* Leave inference_graphs off'):
        family.cls(family.small_arch, inference_graphs=True)
    assert not family.cls(family.small_arch).inference_graphs.enabled
