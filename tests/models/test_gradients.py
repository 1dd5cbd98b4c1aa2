"""Every hand-written backward in vssm against plain autograd, through whole models in float64 on the CPU.

The same model and input run twice: as shipped (the selective scan's reference backward, the token maps' adjoints,
grouped_matmul, the recomputed projections) and under :func:`vssm.ops.plain_autograd` (the same forward as plain
PyTorch ops, differentiated by autograd). Outputs, the input gradient and every parameter gradient must agree.

* Spectral VMamba in upstream mode at 224 x 224, where the stage-2 order repeats and skips tokens (stage 1 is 7 x 7
  and upstream's re-indexing assumes an even width), and at 160 x 256, in train and eval mode (small arch).
* The T models of the three families at a non-square size with an odd width at some stage (``slow``: full size).
"""
import pytest
import torch
from models.families import BY_NAME, FAMILIES

from vssm.models import SpectralVMamba
from vssm.ops import plain_autograd

SPECTRAL_ARCH = dict(dims=[256, 32, 64, 128], depths=[1, 2, 1, 1])
TOLERANCE = dict(rtol=1e-9, atol=1e-11)


def _outputs_and_gradients(model: torch.nn.Module, images: torch.Tensor):
    images = images.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    outs = model(images)
    weights = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape) for o in outs]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return [o.detach() for o in outs], images.grad, grads


def _assert_matches_plain_autograd(model: torch.nn.Module, images: torch.Tensor) -> None:
    outs, grad_in, grads = _outputs_and_gradients(model, images)
    with plain_autograd():
        plain_outs, plain_grad_in, plain_grads = _outputs_and_gradients(model, images)
    for i, (a, b) in enumerate(zip(outs, plain_outs)):
        torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m, i=i: f'stage {i} output: {m}')
    torch.testing.assert_close(grad_in, plain_grad_in, **TOLERANCE, msg=lambda m: f'input gradient: {m}')
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], **TOLERANCE, msg=lambda m, n=name: f'{n}: {m}')


# Training at 224 (the repeating order) in the quick suite, the other three under slow.
@pytest.mark.parametrize('size, mode', [((224, 224), 'train'),
                                        *(pytest.param(size, mode, marks=pytest.mark.slow)
                                          for size, mode in (((160, 256), 'eval'), ((224, 224), 'eval'),
                                                             ((160, 256), 'train')))],
                         ids=['224x224-train', '160x256-eval', '224x224-eval', '160x256-train'])
def test_spectral_upstream_mode_gradients_equal_plain_autograd(size, mode):
    torch.manual_seed(0)
    model = SpectralVMamba(SPECTRAL_ARCH, upstream_compat=True, out_indices=(0, 1, 2, 3)).double()
    model.train(mode == 'train')
    images = torch.randn(2, 3, *size, dtype=torch.float64)
    if size == (224, 224):  # the case this guards: an order that is not a permutation
        with torch.no_grad():
            orders = model.forward_with_orders(images)[1]
        sorted_orders = orders[2].sort(dim=1).values
        assert not torch.equal(sorted_orders, torch.arange(orders[2].shape[1]).view(1, -1, 1).expand_as(orders[2]))
    _assert_matches_plain_autograd(model, images)


# (H, W) with an odd width at some stage: 64 x 224 -> 16 x 56 ... 2 x 7; Spectral: 144 x 208 -> 9 x 13 ... 2 x 4
T_SIZES = {'SpatialMamba': (64, 224), 'VMamba': (64, 224), 'SpectralVMamba': (144, 208)}


@pytest.mark.slow
@pytest.mark.parametrize('family', FAMILIES, ids=[f.name for f in FAMILIES])
def test_tiny_model_gradients_equal_plain_autograd(family):
    torch.manual_seed(0)
    kwargs = dict(rfn_frozen=False) if family.name == 'SpectralVMamba' else {}
    model = family.cls(arch='tiny', out_indices=(0, 1, 2, 3), ops_backend='torch', **kwargs).double().train()
    _assert_matches_plain_autograd(model, torch.randn(1, 3, *T_SIZES[family.name], dtype=torch.float64))


def test_families_have_a_t_size():
    assert set(T_SIZES) == set(BY_NAME)
