"""The backbones' ``inference_graphs`` on a GPU: the CUDA-graph replays equal the eager forward (fp32 and bf16 autocast,
weights loaded in place), one capture per shape, and Spectral VMamba's dense eigensolver (a host synchronization)
leaving its shape eager without changing the results."""
import pytest
import torch
from conftest import has_kernel
from models.families import BY_NAME, FAMILIES

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and has_kernel('selective_scan')),
                                reason='needs a GPU and the selective_scan kernel: see kernels/README.md')

FAMILY_IDS = [f.name for f in FAMILIES]


def _build(family):
    torch.manual_seed(0)
    return family.cls(family.small_arch, out_indices=(0, 1, 2, 3), inference_graphs=True).cuda().eval()


def _assert_close(outs, expected):
    for out, ref in zip(outs, expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize('family', FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize('autocast', [False, True], ids=['fp32', 'bf16'])
def test_replays_match_the_eager_forward(family, autocast):
    model = _build(family)
    x = torch.randn(1, 3, 128, 160, device='cuda')  # Spectral VMamba: 8 x 10 tokens, the iterative eigensolver
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16, enabled=autocast):
        expected = model._forward(x)
        outs = [model(x) for _ in range(4)]
    for out in outs:
        _assert_close(out, expected)
    assert (model.inference_graphs.captures, model.inference_graphs.replays) == (1, 3)
    assert outs[-1][0].data_ptr() != outs[-2][0].data_ptr()


@pytest.mark.parametrize('family', FAMILIES, ids=FAMILY_IDS)
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


def test_spectral_dense_eigensolver_shape_stays_eager():
    model = _build(BY_NAME['SpectralVMamba'])
    x = torch.randn(1, 3, 64, 64, device='cuda')  # 4 x 4 tokens: the dense solver (torch.linalg.eigh)
    with torch.no_grad():
        expected = model._forward(x)
        for _ in range(3):
            _assert_close(model(x), expected)
    graphs = model.inference_graphs
    assert graphs.captures + len(graphs._failed) == 1  # captured, or tried once and eager from then on
