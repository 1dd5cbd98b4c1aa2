"""torch.compile: each family's model, compiled, gives its eager outputs (CPU, reference ops, eval mode).

* ``test_tiny_model_compiles_with_inductor``: the T models (``arch='tiny'``) with the default backend (inductor) on a
  1 x 3 x 64 x 64 input, every stage returned. Compiling a whole T model on 2 CPU cores takes a minute or more with a
  cold inductor cache (idle machine: VMamba 61 s, Spatial-Mamba 79 s, SpectralVMamba 58 s; 1.5-4 minutes each when the
  cores are shared), as inductor generates and builds C++ for every fused kernel, hence ``slow``. The compiled model is
  called first, as a user would: its second call recompiles once (below).
* ``test_small_arch_traces_with_aot_eager``: the small archs in eval mode through dynamo and AOTAutograd without code
  generation (backend ``aot_eager``), ``slow`` like the inductor test, which captures the same graphs; the eager model
  runs first here, so the model compiles once (the one-time state of the first call is set; see below). Also
  SpectralVMamba at 112 px (7 x 7 = 49 tokens), where the iterative eigensolver runs instead of the dense one: its
  unrolled iterations make a graph of thousands of nodes (20-30 s to trace on 2 cores).
* ``test_training_step_compiles_as_one_graph``: forward and backward in train mode, ``fullgraph=True``, in the
  default suite, on the small archs with one block per stage (``COMPILE_ARCHS``): every kind of block and
  downsampling is in the graph once, and the time to trace grows with the number of blocks (30-40 s per family on
  2 cores with the small archs' five).

Every compile here uses ``fullgraph=True``: a graph break fails the test.

Outputs are compared relative to their largest magnitude: max |compiled - eager| <= TOLERANCE * max |eager| (fp32;
inductor reorders and fuses reductions; measured up to 2e-6). A model's first call logs the ops' backends and sets the
backbone's ``_logged_device`` (a guard; ``describe_backends`` calls ``importlib.import_module``, a graph break), and
the iterative eigensolver fills its start-projection cache (a guard on a global dict; its ``torch.Generator`` is a
graph break): called first, the compiled model recompiles once on its second call. After that nothing recompiles.
"""
import pytest
import torch
from mmengine.registry import DefaultScope
from mmpretrain.registry import MODELS
from models.families import BY_NAME, FAMILIES

TOLERANCE = 1e-5
FAMILY_IDS = [f.name for f in FAMILIES]
COMPILE_ARCHS = {f.name: {**f.small_arch, 'depths': [1, 1, 1, 1]} for f in FAMILIES}
SIZE = 64  # SpectralVMamba needs multiples of 16: 4 x 4 tokens at stage 0, the dense eigensolver


def _build(name: str, arch) -> torch.nn.Module:
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(dict(type=name, arch=arch, ops_backend='torch', out_indices=(0, 1, 2, 3))).eval()


def _assert_compiled_matches_eager(model: torch.nn.Module, backend: str, size: int = SIZE,
                                   compiled_first: bool = False) -> None:
    torch._dynamo.reset()
    images = torch.randn(1, 3, size, size)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        if compiled_first:
            got = compiled(images)
            expected = model(images)
            compiled(images)  # the one-time recompile of the module docstring
        else:
            expected = model(images)
            got = compiled(images)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = compiled(images)
    assert len(got) == len(expected) == 4
    for i, (out, out_again, ref) in enumerate(zip(got, again, expected)):
        scale = ref.abs().max().item()
        torch.testing.assert_close(out, ref, rtol=0, atol=TOLERANCE * scale, msg=lambda m, i=i: f'stage {i}: {m}')
        torch.testing.assert_close(out_again, out, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize('family', FAMILIES, ids=FAMILY_IDS)
def test_tiny_model_compiles_with_inductor(family):
    _assert_compiled_matches_eager(_build(family.name, 'tiny'), backend='inductor', compiled_first=True)


@pytest.mark.slow
@pytest.mark.parametrize('family', FAMILIES, ids=FAMILY_IDS)
def test_small_arch_traces_with_aot_eager(family):
    _assert_compiled_matches_eager(_build(family.name, family.small_arch), backend='aot_eager')


@pytest.mark.slow
def test_spectral_iterative_eigensolver_traces_with_aot_eager():
    family = BY_NAME['SpectralVMamba']
    _assert_compiled_matches_eager(_build(family.name, family.small_arch), backend='aot_eager', size=112,
                                   compiled_first=True)


# VMamba in the quick suite; the other two trace for 30-50 s each on 2 cores (slow).
@pytest.mark.parametrize('family', [pytest.param(f, marks=[] if f.name == 'VMamba' else [pytest.mark.slow])
                                    for f in FAMILIES], ids=FAMILY_IDS)
def test_training_step_compiles_as_one_graph(family):
    """Forward and backward of the small archs in train mode as one graph (``fullgraph=True``, AOTAutograd without
    code generation): the custom ops are graph nodes and the recomputing autograd functions step aside for the
    partitioner. Loss and input gradient equal eager's."""
    torch._dynamo.reset()
    model = _build(family.name, COMPILE_ARCHS[family.name]).train()
    images = torch.randn(2, 3, SIZE, SIZE)

    def loss_and_grad(fn):
        x = images.clone().requires_grad_()
        loss = sum(o.square().mean() for o in fn(x))
        return loss.detach(), torch.autograd.grad(loss, x)[0]

    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    got, expected = loss_and_grad(compiled), loss_and_grad(model)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
