"""The backbones' ``inference_graphs`` on a GPU: the CUDA-graph replays equal the eager forward (fp32 and bf16 autocast,
weights loaded in place), one capture per shape. Spectral VMamba refuses the option (tests/models/
test_inference_graphs.py)."""
import pytest
import torch
from conftest import has_kernel
from models.families import FAMILIES

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and has_kernel('selective_scan')),
                                reason='needs a GPU and the selective_scan kernel: see kernels/README.md')

GRAPH_FAMILIES = [f for f in FAMILIES if not f.cls.graph_capture_blocker]
FAMILY_IDS = [f.name for f in GRAPH_FAMILIES]


def _build(family):
    torch.manual_seed(0)
    return family.cls(family.small_arch, out_indices=(0, 1, 2, 3), inference_graphs=True).cuda().eval()


def _assert_close(outs, expected):
    for out, ref in zip(outs, expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize('family', GRAPH_FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize('autocast', [False, True], ids=['fp32', 'bf16'])
def test_replays_match_the_eager_forward(family, autocast):
    model = _build(family)
    x = torch.randn(1, 3, 128, 160, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
        expected = model._forward(x)
        outs = [model(x) for _ in range(4)]
    for out in outs:
        _assert_close(out, expected)
    assert (model.inference_graphs.captures, model.inference_graphs.replays) == (1, 3)
    assert outs[-1][0].data_ptr() != outs[-2][0].data_ptr()


@pytest.mark.parametrize('family', GRAPH_FAMILIES, ids=FAMILY_IDS)
def test_weights_loaded_in_place_are_replayed(family):
    model, other = _build(family), _build(family)
    for p in other.parameters():
        p.data.mul_(1.1)
    x = torch.randn(1, 3, 128, 160, device='cuda')
    with torch.no_grad():
        model(x), model(x)
        model.load_state_dict(other.state_dict())
        _assert_close(model(x), other._forward(x))
    assert model.inference_graphs.replays == 2

