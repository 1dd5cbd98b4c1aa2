"""SpatialMamba backbone on CPU: contract, sizes, upstream compatibility, fusion fixes."""
import copy
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from fixture_utils import fixture_weights, load_fixture, load_manifest, rel_err
from mmengine.registry import DefaultScope
from mmpretrain.registry import MODELS

from vssm.models import SpatialMamba
from vssm.models.spatial_mamba import convert_upstream_state_dict

SMALL_ARCH = dict(dims=[8, 16, 32, 64], depths=[1, 1, 2, 1])


def build_classifier(arch, num_classes=1000, **backbone_kwargs):
    dim = SpatialMamba.arch_zoo[arch]['dims'][-1] if isinstance(arch, str) else arch['dims'][-1]
    with DefaultScope.overwrite_default_scope('mmpretrain'):  # other tests may have set mmdet/mmseg
        return MODELS.build(
            dict(type='ImageClassifier', backbone=dict(type='SpatialMamba', arch=arch, **backbone_kwargs),
                 neck=dict(type='GlobalAveragePooling'),
                 head=dict(type='LinearClsHead', num_classes=num_classes, in_channels=dim)))


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown arch 'huge'.*\['base', 'small', 'tiny'\]"):
        SpatialMamba('huge')
    with pytest.raises(ValueError, match='needs the keys'):
        SpatialMamba(dict(dims=[8, 16, 32, 64]))
    with pytest.raises(ValueError, match='unknown arch keys'):
        SpatialMamba(dict(dims=8, depths=[1, 1, 1, 1], heads=4))


def test_strict_constructor_rejects_unknown_keys():
    with pytest.raises(TypeError, match='window_size'):
        SpatialMamba('tiny', window_size=7)


def test_bad_options_raise():
    with pytest.raises(ValueError, match='d_state must be 1'):
        SpatialMamba(SMALL_ARCH, d_state=16)
    with pytest.raises(ValueError, match='out_indices'):
        SpatialMamba(SMALL_ARCH, out_indices=(4, ))
    with pytest.raises(ValueError, match='eval_fusion_padding'):
        SpatialMamba(SMALL_ARCH, eval_fusion_padding='reflect')
    with pytest.raises(ValueError, match='Unknown ops backend'):
        SpatialMamba(SMALL_ARCH, ops_backend='triton')
    with pytest.raises(ValueError, match=r'expected images \(B, 3, H, W\)'):
        SpatialMamba(SMALL_ARCH)(torch.randn(1, 1, 32, 32))


def test_arch_dict_with_int_dims_and_aliases():
    model = SpatialMamba(dict(dims=8, depths=[1, 1, 1, 1]))
    assert model.dims == [8, 16, 32, 64]
    assert SpatialMamba('t').depths == SpatialMamba('tiny').depths


@pytest.mark.parametrize('out_indices, expected', [
    ((0, 1, 2, 3), [(8, 16, 20), (16, 8, 10), (32, 4, 5), (64, 2, 3)]),
    ((3, ), [(64, 2, 3)]),
    ((-1, 1), [(16, 8, 10), (64, 2, 3)]),
])
def test_output_shapes(out_indices, expected):
    model = SpatialMamba(SMALL_ARCH, out_indices=out_indices)
    outs = model(torch.randn(2, 3, 64, 80))
    assert [tuple(o.shape[1:]) for o in outs] == expected
    assert all(o.is_contiguous() and o.shape[0] == 2 for o in outs)
    assert model.out_channels == tuple(c for c, _, _ in expected)


@pytest.mark.parametrize('size', [(33, 47), (7, 9), (1, 1)])
def test_odd_input_sizes(size):
    model = SpatialMamba(SMALL_ARCH, out_indices=(0, 1, 2, 3)).eval()  # BatchNorm: batch statistics need > 1 value
    outs = model(torch.randn(1, 3, *size))
    assert len(outs) == 4 and all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('arch, cls_params, backbone_params', [
    ('tiny', 26_748_862, 26_236_758),
    ('small', 43_074_280, 42_562_176),
    ('base', 95_745_592, 94_977_936),
])
def test_parameter_counts_match_upstream(arch, cls_params, backbone_params):
    backbone = SpatialMamba(arch, out_indices=(0, 1, 2, 3))
    assert sum(p.numel() for p in backbone.parameters()) == backbone_params
    assert sum(p.numel() for p in build_classifier(arch).parameters()) == cls_params


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_upstream_layouts_load_strictly(arch):
    """Every upstream key and shape: the det/seg backbone layout directly, the classifier via the converter."""
    manifest = load_manifest('spatial_mamba', arch, 'backbone')
    backbone = SpatialMamba(arch, out_indices=(0, 1, 2, 3))
    ours = [(k, list(v.shape)) for k, v in backbone.state_dict().items()]
    assert ours == [(k, s) for k, s in manifest['state_dict']]
    manifest = load_manifest('spatial_mamba', arch, 'cls')
    upstream = {'model': {k: torch.zeros(s) for k, s in manifest['state_dict']}}
    build_classifier(arch).load_state_dict(convert_upstream_state_dict(upstream), strict=True)


def _fixture_models(fixture, mode):
    weights = fixture_weights(fixture)
    kwargs = fixture['cls']['constructor_kwargs']
    arch = dict(dims=kwargs['dims'], depths=kwargs['depths'])
    padding = 'zeros' if mode == 'eval' else 'replicate'
    classifier = build_classifier(arch, num_classes=kwargs['num_classes'], eval_fusion_padding=padding)
    cls_keys = {k for k, _, _ in fixture['cls']['state_dict']}
    classifier.load_state_dict(convert_upstream_state_dict({k: v for k, v in weights.items() if k in cls_keys}),
                               strict=True)
    backbone = SpatialMamba(arch, out_indices=(0, 1, 2, 3), eval_fusion_padding=padding)
    bb_keys = {k for k, _, _ in fixture['backbone']['state_dict']}
    backbone.load_state_dict({k: v for k, v in weights.items() if k in bb_keys}, strict=True)
    classifier.train(mode == 'train')
    backbone.train(mode == 'train')
    return classifier, backbone


@pytest.mark.parametrize('name', ['spatial_mamba_a', 'spatial_mamba_b'])
@pytest.mark.parametrize('mode', ['eval', 'train', 'eval_replicate_fusion'])
def test_upstream_fixture_outputs(name, mode):
    """'eval' is upstream's zero-padded merged kernel (eval_fusion_padding='zeros'); the other two are our default."""
    fixture = load_fixture(name)
    tol = fixture['tolerances']
    classifier, backbone = _fixture_models(fixture, mode)
    for input_name, x in fixture['inputs'].items():
        with torch.no_grad():
            logits = classifier(x, mode='tensor')
            outs = backbone(x)
        expected = fixture['expected']
        assert rel_err(logits, expected['cls'][input_name][mode]['logits']) < tol['logits']
        for out, ref in zip(outs, expected['backbone'][input_name][mode]):
            assert out.shape == ref.shape
            assert rel_err(out, ref) < tol['backbone_outputs']


@pytest.mark.parametrize('name', ['spatial_mamba_a', 'spatial_mamba_b'])
def test_upstream_fixture_input_gradient(name):
    fixture = load_fixture(name)
    grad = fixture['expected']['cls_input_grad']
    classifier, _ = _fixture_models(fixture, grad['mode'])
    x = fixture['inputs'][grad['input']].clone().requires_grad_()
    (classifier(x, mode='tensor') * grad['logit_weights']).sum().backward()
    assert rel_err(x.grad, grad['d_input']) < fixture['tolerances']['cls_input_grad']


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


@pytest.mark.parametrize('frozen_stages', [0, 2])
def test_frozen_stages_stay_in_eval(frozen_stages):
    model = SpatialMamba(SMALL_ARCH, out_indices=(0, 1, 2, 3), frozen_stages=frozen_stages)
    model.train()
    frozen = [model.patch_embed] + [model.layers[i] for i in range(frozen_stages)]
    frozen += [getattr(model, f'outnorm{i}') for i in range(frozen_stages)]
    for module in frozen:
        assert all(not p.requires_grad for p in module.parameters())
        assert all(not m.training for m in module.modules())
    for module in model.layers[frozen_stages:]:
        assert all(p.requires_grad for p in module.parameters())
        assert module.training


def test_norm_eval_keeps_batchnorm_in_eval():
    model = SpatialMamba(SMALL_ARCH, norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)


def test_with_cp_gives_the_same_outputs_and_gradients():
    x = torch.randn(2, 3, 32, 32)
    plain = SpatialMamba(SMALL_ARCH, out_indices=(0, 3), drop_path_rate=0.0)
    ckpt = SpatialMamba(SMALL_ARCH, out_indices=(0, 3), drop_path_rate=0.0, with_cp=True)
    ckpt.load_state_dict(plain.state_dict())
    outs = [m(x.clone().requires_grad_()) for m in (plain, ckpt)]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    for model, out in zip((plain, ckpt), outs):
        sum(o.sum() for o in out).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_drop_path_is_linear_over_all_blocks():
    model = SpatialMamba(dict(dims=8, depths=[1, 1, 2, 1]), drop_path_rate=0.4)
    rates = [getattr(b.drop_path, 'drop_prob', 0.0) for layer in model.layers for b in layer.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_ssm_initialisation_follows_upstream():
    block = SpatialMamba(SMALL_ARCH).layers[0].blocks[0].self_attention
    assert torch.all(block.A_logs == 0) and torch.all(block.Ds == 1)
    dt = torch.nn.functional.softplus(block.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert block.dt_projs_weight.abs().max() <= block.dt_rank**-0.5
    assert torch.all(block.state_fusion.kernel_3 == 1) and torch.all(block.state_fusion.alpha == 1)


def test_classifier_checkpoint_feeds_the_detection_backbone(tmp_path):
    from mmengine.runner import load_checkpoint
    classifier = build_classifier(SMALL_ARCH, num_classes=10)
    path = tmp_path / 'cls.pth'
    torch.save({'state_dict': classifier.state_dict()}, path)
    backbone = SpatialMamba(SMALL_ARCH, out_indices=(0, 1, 2, 3),
                            init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    backbone.init_weights()
    for key, value in backbone.state_dict().items():
        if not key.startswith(('outnorm0', 'outnorm1', 'outnorm2')):
            torch.testing.assert_close(value, classifier.state_dict()[f'backbone.{key}'], msg=key)
    missing = load_checkpoint(SpatialMamba(SMALL_ARCH), str(path), revise_keys=[(r'^backbone\.', '')], strict=False)
    assert missing is not None


def test_converter_tool_round_trip(tmp_path):
    fixture = load_fixture('spatial_mamba_a')
    weights = fixture_weights(fixture)
    cls_keys = [k for k, _, _ in fixture['cls']['state_dict']]
    src = tmp_path / 'upstream.pth'
    torch.save({'model': {k: weights[k] for k in cls_keys}, 'epoch': 3}, src)
    dst = tmp_path / 'converted.pth'
    subprocess.run([sys.executable, str(REPO_ROOT / 'tools/model_converters/spatial_mamba_to_vssm.py'), str(src),
                    str(dst)], check=True, capture_output=True)
    state_dict = torch.load(dst, weights_only=True)['state_dict']
    kwargs = fixture['cls']['constructor_kwargs']
    classifier = build_classifier(dict(dims=kwargs['dims'], depths=kwargs['depths']), num_classes=10,
                                  eval_fusion_padding='zeros').eval()
    classifier.load_state_dict(state_dict, strict=True)
    x = fixture['inputs']['x_2x3x64x64']
    with torch.no_grad():
        logits = classifier(x, mode='tensor')
    assert rel_err(logits, fixture['expected']['cls']['x_2x3x64x64']['eval']['logits']) < 1e-4
