"""The contract every vssm backbone keeps, on CPU, per family: arch handling, errors, shapes, freezing, checkpoints,
upstream sizes, strict upstream loading, the upstream numeric fixtures, and the checkpoint converters."""
import runpy
import sys

import pytest
import torch
from conftest import REPO_ROOT
from fixture_utils import fixture_weights, load_fixture, load_manifest, rel_err
from models.families import BY_NAME, FAMILIES, build_classifier, expected_shapes, meta_model, on_meta

FAMILY_IDS = [f.name for f in FAMILIES]
SIZES = ['tiny', 'small', 'base']


@pytest.fixture(params=FAMILIES, ids=FAMILY_IDS)
def family(request):
    return request.param


def test_unknown_arch_lists_valid_names(family):
    with pytest.raises(ValueError, match=r"unknown arch 'huge'.*\['base', 'small', 'tiny'\]"):
        family.cls('huge')
    with pytest.raises(ValueError, match='needs the keys'):
        family.cls(dict(dims=[8, 16, 32, 64]))
    with pytest.raises(ValueError, match='unknown arch keys'):
        family.cls(dict(dims=8, depths=[1, 1, 1, 1], heads=4))


def test_strict_constructor_rejects_unknown_keys(family):
    with pytest.raises(TypeError, match='window_size'):
        family.cls('tiny', window_size=7)


def test_bad_options_raise(family):
    with pytest.raises(ValueError, match='out_indices'):
        family.cls(family.small_arch, out_indices=(4, ))
    with pytest.raises(ValueError, match='frozen_stages'):
        family.cls(family.small_arch, frozen_stages=5)
    with pytest.raises(ValueError, match='Unknown ops backend'):
        family.cls(family.small_arch, ops_backend='triton')
    with pytest.raises(ValueError, match=r'expected images \(B, 3, H, W\)'):
        family.cls(family.small_arch)(torch.randn(1, 1, 64, 64))


def test_arch_dict_with_int_dims_and_aliases(family):
    if family.int_dims:
        model = family.cls({**family.small_arch, 'dims': family.int_dims})
        assert model.dims == [family.int_dims * 2**i for i in range(4)]
    assert family.cls.arch_zoo['t'] == family.cls.arch_zoo['tiny']


@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (3, ), (-1, 1)])
def test_output_shapes(family, out_indices):
    model = family.cls(family.small_arch, out_indices=out_indices)
    height, width = 8 * family.strides[0], 10 * family.strides[0]  # stage grids 8x10, 4x5, 2x3, 1x2 (odd sides)
    outs = model(torch.randn(2, 3, height, width))
    normalized = sorted({i % 4 for i in out_indices})
    expected = expected_shapes(family, family.small_arch['dims'], height, width, normalized)
    assert [tuple(o.shape[1:]) for o in outs] == expected
    assert all(o.is_contiguous() and o.shape[0] == 2 for o in outs)
    assert model.out_channels == tuple(c for c, _, _ in expected)


@pytest.mark.parametrize('index', range(3))
def test_odd_input_sizes(family, index):
    size = family.odd_sizes[index]
    model = family.cls(family.small_arch, out_indices=(0, 1, 2, 3)).eval()  # BatchNorm needs > 1 value to train
    outs = model(torch.randn(1, 3, *size))
    assert [tuple(o.shape[1:]) for o in outs] == expected_shapes(family, family.small_arch['dims'], *size, range(4))
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('frozen_stages', [0, 2])
def test_frozen_stages_stay_in_eval(family, frozen_stages):
    model = family.cls(family.small_arch, out_indices=(0, 1, 2, 3), frozen_stages=frozen_stages)
    model.train()
    frozen = [model.patch_embed] + [model.layers[i] for i in range(frozen_stages)]
    frozen += [getattr(model, f'outnorm{i}') for i in range(frozen_stages)]
    for module in frozen:
        assert all(not p.requires_grad for p in module.parameters())
        assert all(not m.training for m in module.modules())
    for module in model.layers[frozen_stages:]:
        assert all(p.requires_grad for p in module.parameters())
        assert module.training


@pytest.mark.parametrize('out_indices', [(3, ), (0, 1, 2, 3)])
def test_every_trainable_parameter_gets_a_gradient(family, out_indices):
    """What DDP (find_unused_parameters=False) needs: one backward reaches every trainable parameter."""
    model = family.cls(family.small_arch, out_indices=out_indices).train()
    x = torch.randn(2, 3, 4 * family.strides[0], 4 * family.strides[0])  # the smallest grids (1x1 at the end)
    outs = model(x)
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_with_cp_gives_the_same_outputs_and_gradients(family):
    x = torch.randn(2, 3, family.strides[-1], 2 * family.strides[-1])  # a 1 x 2 grid at the last stage
    plain = family.cls(family.small_arch, out_indices=(0, 3))
    ckpt = family.cls(family.small_arch, out_indices=(0, 3), with_cp=True)
    ckpt.load_state_dict(plain.state_dict())
    outs = [m(x.clone().requires_grad_()) for m in (plain, ckpt)]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    for model, out in zip((plain, ckpt), outs):
        sum(o.sum() for o in out).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_drop_path_is_linear_over_all_blocks(family):
    model = family.cls({**family.small_arch, 'depths': [1, 1, 2, 1]}, drop_path_rate=0.4)
    rates = [getattr(b.drop_path, 'drop_prob', 0.0) for layer in model.layers for b in layer.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_classifier_checkpoint_feeds_the_detection_backbone(family, tmp_path):
    classifier = build_classifier(family, family.small_arch, num_classes=10)
    path = tmp_path / 'cls.pth'
    torch.save({'state_dict': classifier.state_dict()}, path)
    backbone = family.cls(family.small_arch, out_indices=(0, 1, 2, 3),
                          init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    backbone.init_weights()
    for key, value in backbone.state_dict().items():
        if not key.startswith(('outnorm0', 'outnorm1', 'outnorm2')):
            torch.testing.assert_close(value, classifier.state_dict()[f'backbone.{key}'], msg=key)


@pytest.mark.parametrize('size', SIZES)
def test_parameter_counts_match_upstream(family, size):
    cls_params, backbone_params = family.params[size]
    backbone, classifier = meta_model(family.name, size, 'backbone'), meta_model(family.name, size, 'classifier')
    assert sum(p.numel() for p in backbone.parameters()) == backbone_params
    assert sum(p.numel() for p in classifier.parameters()) == cls_params


@pytest.mark.parametrize('size', SIZES)
def test_upstream_layouts_load_strictly(family, size):
    """Every upstream key and shape: the det/seg backbone layout directly, the classifier via the converter (on
    the meta device: loading checks every key and shape, and copies nothing)."""
    manifest = load_manifest(family.manifest, size, 'backbone')
    backbone, classifier = meta_model(family.name, size, 'backbone'), meta_model(family.name, size, 'classifier')
    assert {k: list(v.shape) for k, v in backbone.state_dict().items()} == {k: s for k, s in manifest['state_dict']}
    manifest = load_manifest(family.manifest, size, 'cls')
    upstream = {'model': {k: torch.empty(s, device='meta') for k, s in manifest['state_dict']}}
    classifier.load_state_dict(family.convert(upstream), strict=True)


def test_meta_loading_checks_shapes(family):
    """What the layout test relies on: a meta model refuses a state dict with a wrong shape or a missing key."""
    with on_meta():
        model = family.cls(family.small_arch)
    state = model.state_dict()
    key = next(k for k, v in state.items() if v.dim() >= 2)
    with pytest.raises(RuntimeError, match='size mismatch'):
        model.load_state_dict({**state, key: torch.empty(*state[key].shape[:-1], state[key].shape[-1] + 1,
                                                         device='meta')})
    with pytest.raises(RuntimeError, match='Missing key'):
        model.load_state_dict({k: v for k, v in state.items() if k != key})


@pytest.mark.parametrize('family_name', ['SpatialMamba', 'VMamba'])
def test_builds_under_the_meta_device_context(family_name):
    """Our own constructors need nothing but ``torch.device('meta')`` (Spectral VMamba's RFN is mmpretrain's ResNet,
    which reads tensor values at construction: :func:`models.families.on_meta` covers it)."""
    family = BY_NAME[family_name]
    with torch.device('meta'):
        model = family.cls('tiny', out_indices=(0, 1, 2, 3))
    assert all(t.is_meta for t in model.state_dict().values())
    assert sum(p.numel() for p in model.parameters()) == family.params['tiny'][1]


def _fixture_models(family, fixture, mode):
    weights = fixture_weights(fixture)
    kwargs = fixture['cls']['constructor_kwargs']
    arch = family.fixture_arch(kwargs)
    options = family.fixture_modes[mode]
    classifier = build_classifier(family, arch, num_classes=kwargs['num_classes'], **options)
    cls_keys = {k for k, _, _ in fixture['cls']['state_dict']}
    classifier.load_state_dict(family.convert({k: v for k, v in weights.items() if k in cls_keys}), strict=True)
    backbone = family.cls(arch, out_indices=(0, 1, 2, 3), **options)
    bb_keys = {k for k, _, _ in fixture['backbone']['state_dict']}
    backbone.load_state_dict({k: v for k, v in weights.items() if k in bb_keys}, strict=True)
    classifier.train(mode == 'train')
    backbone.train(mode == 'train')
    return classifier, backbone


FIXTURE_CASES = [pytest.param(f, name, mode, id=f'{name}-{mode}') for f in FAMILIES for name in f.fixtures
                 for mode in f.fixture_modes]


@pytest.mark.parametrize('family, name, mode', FIXTURE_CASES)
def test_upstream_fixture_outputs(family, name, mode):
    fixture = load_fixture(name)
    tol = fixture['tolerances']
    classifier, backbone = _fixture_models(family, fixture, mode)
    for input_name, x in fixture['inputs'].items():
        with torch.no_grad():
            logits = classifier(x, mode='tensor')
            outs = backbone(x)
        expected = fixture['expected']
        assert rel_err(logits, expected['cls'][input_name][mode]['logits']) < tol['logits']
        for out, ref in zip(outs, expected['backbone'][input_name][mode]):
            assert out.shape == ref.shape
            assert rel_err(out, ref) < tol['backbone_outputs']


@pytest.mark.parametrize('family, name', [pytest.param(f, n, id=n) for f in FAMILIES for n in f.fixtures
                                          if n != 'spectral_vmamba_b'])  # the one fixture without a gradient
def test_upstream_fixture_input_gradient(family, name):
    fixture = load_fixture(name)
    grad = fixture['expected']['cls_input_grad']
    classifier, _ = _fixture_models(family, fixture, grad['mode'])
    x = fixture['inputs'][grad['input']].clone().requires_grad_()
    (classifier(x, mode='tensor') * grad['logit_weights']).sum().backward()
    assert rel_err(x.grad, grad['d_input']) < fixture['tolerances']['cls_input_grad']


def test_converter_tool_round_trip(family, tmp_path, monkeypatch, capsys):
    fixture = load_fixture(family.fixtures[0])
    weights = fixture_weights(fixture)
    cls_keys = [k for k, _, _ in fixture['cls']['state_dict']]
    src = tmp_path / 'upstream.pth'
    torch.save({'model': {k: weights[k] for k in cls_keys}, 'epoch': 3}, src)
    dst = tmp_path / 'converted.pth'
    # The script as `python SCRIPT SRC DST` runs it (its folder first on sys.path), in this process: a new
    # interpreter would spend most of the test importing the OpenMMLab libraries again.
    script = REPO_ROOT / 'tools/model_converters' / family.converter
    monkeypatch.syspath_prepend(str(script.parent))
    monkeypatch.setattr(sys, 'argv', [str(script), str(src), str(dst)])
    runpy.run_path(str(script), run_name='__main__')
    assert f'wrote {dst}' in capsys.readouterr().out
    kwargs = fixture['cls']['constructor_kwargs']
    classifier = build_classifier(family, family.fixture_arch(kwargs), num_classes=10,
                                  **family.fixture_modes['eval']).eval()
    classifier.load_state_dict(torch.load(dst, weights_only=True)['state_dict'], strict=True)
    name, x = next(iter(fixture['inputs'].items()))
    with torch.no_grad():
        logits = classifier(x, mode='tensor')
    assert rel_err(logits, fixture['expected']['cls'][name]['eval']['logits']) < 1e-4
