"""SpatialMamba specifics on CPU: the state-fusion fixes, d_state, BatchNorm handling, SSM init.
(The contract shared with the other families, sizes and upstream fixtures: test_backbones.py.)"""
import copy

import pytest
import torch

from vssm.models import SpatialMamba

SMALL_ARCH = dict(dims=[8, 16, 32, 64], depths=[1, 1, 2, 1])


def test_state_fusion_needs_one_state_and_a_known_padding():
    with pytest.raises(ValueError, match='d_state must be 1'):
        SpatialMamba(SMALL_ARCH, d_state=16)
    with pytest.raises(ValueError, match='eval_fusion_padding'):
        SpatialMamba(SMALL_ARCH, eval_fusion_padding='reflect')


def test_eval_fusion_is_never_stale():
    """Upstream caches its merged eval kernel on the first eval call; ours follows every weight change."""
    model = SpatialMamba(SMALL_ARCH, out_indices=(0, 1, 2, 3)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)  # an eval call before the weights change
        for name, p in model.named_parameters():
            if 'state_fusion' in name:
                p.add_(torch.randn_like(p) * 0.3)
        after = model(x)
        fresh = copy.deepcopy(model)  # a model that never ran eval with the old weights
        expected = fresh(x)
    for a, b in zip(after, expected):
        torch.testing.assert_close(a, b)


def test_eval_computes_the_training_function():
    """With BatchNorm in eval mode, the fusion modules give the same output in train and eval."""
    model = SpatialMamba(SMALL_ARCH, out_indices=(0, 1, 2, 3))
    for p in model.parameters():
        if p.dim() == 4 and p.shape[-1] == 3:
            torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 3, 40, 24)
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
        for module in model.modules():
            if type(module).__name__ == 'StateFusion':
                module.train()
        train_fusion_out = model(x)
    for a, b in zip(eval_out, train_fusion_out):
        torch.testing.assert_close(a, b)


def test_upstream_eval_padding_option_differs_near_borders():
    model = SpatialMamba(SMALL_ARCH, out_indices=(0, ), eval_fusion_padding='zeros').eval()
    default = SpatialMamba(SMALL_ARCH, out_indices=(0, )).eval()
    default.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(model(x)[0], default(x)[0])


def test_norm_eval_keeps_batchnorm_in_eval():
    model = SpatialMamba(SMALL_ARCH, norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)


def test_ssm_initialisation_follows_upstream():
    block = SpatialMamba(SMALL_ARCH).layers[0].blocks[0].self_attention
    assert torch.all(block.A_logs == 0) and torch.all(block.Ds == 1)
    dt = torch.nn.functional.softplus(block.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert block.dt_projs_weight.abs().max() <= block.dt_rank**-0.5
    assert torch.all(block.state_fusion.kernel_3 == 1) and torch.all(block.state_fusion.alpha == 1)
