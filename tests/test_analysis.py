"""vssm.analysis: FLOPs (the papers' numbers at 224x224, per family and size), models built from configs without
weights, the saved-tensor recorder, the timing helpers; and tools/analysis_tools/get_flops.py."""
import warnings

import pytest
import torch
from conftest import REPO_ROOT, load_tool
from models.families import FAMILIES, build_classifier

from vssm.analysis import count_flops, memory, models, timing

# The T models in the default suite, S and B under `slow`: each count traces a full-size model at 224 px.
CASES = [pytest.param(f, size, gflops, id=f'{f.name}-{size}', marks=[pytest.mark.slow] if size != 'tiny' else [])
         for f in FAMILIES for size, gflops in f.gflops.items()]
TINY_VMAMBA = dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], ssm_ratio=1.0)
TINY_OPTIONS = ['model.backbone.arch._delete_=True', 'model.backbone.arch.dims=[8,16,32,64]',
                'model.backbone.arch.depths=[1,1,1,1]']  # --cfg-options of a tiny arch


@pytest.mark.parametrize('family, size, gflops', CASES)
def test_flops_match_upstream(family, size, gflops):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        flops = count_flops(build_classifier(family, size), (3, 224, 224))
    assert flops / 1e9 == pytest.approx(gflops, abs=1e-3)


@pytest.mark.parametrize('config, options, what', [
    ('classification/configs/vmamba/vmamba-tiny_8xb128_in1k.py', [*TINY_OPTIONS, 'model.head.in_channels=64'],
     'classifier'),
    ('detection/configs/spatial_mamba/mask-rcnn_spatial-mamba-t_fpn_1x_coco.py', TINY_OPTIONS, 'backbone'),
])
def test_get_flops_prints_flops_and_parameters(config, options, what, capsys):
    get_flops = load_tool('tools/analysis_tools/get_flops.py')
    get_flops.main([str(REPO_ROOT / config), '--shape', '64', '--cfg-options', *options])
    out = capsys.readouterr().out
    assert f'{what}: input 3x64x64' in out and 'GFLOPs (train mode)' in out and 'M parameters' in out


# --- models ------------------------------------------------------------------------------------------------------
def test_every_model_spec_config_exists():
    for spec in models.MODEL_SPECS.values():
        tasks = ('cls', 'det', 'seg') if spec.ours else ('det', 'seg')
        for task in tasks:
            assert models.config_file(spec.config(task)).is_file(), (spec.name, task)
    with pytest.raises(ValueError, match='built from a dict'):
        models.MODEL_SPECS['swin-t'].config('cls')


@pytest.mark.parametrize('name, millions', [
    ('swin-s', dict(cls=49.61, det=69.11, seg=81.26)),
    pytest.param('swin-b', dict(cls=87.77, det=107.14, seg=121.28), marks=pytest.mark.slow)])
def test_swin_peers_of_each_size_have_the_published_sizes(name, millions):
    """The S and B peers: mmpretrain's classifiers, Mask R-CNN from mmdet's Swin-T 1x config with the backbone and FPN
    of that size, mmseg's UPerNet configs; parameters as the libraries' model zoos list them. Our S and B models
    are compared with them."""
    spec = models.MODEL_SPECS[name]
    for task, expected in millions.items():
        model = models.build_spec_model(spec, task)
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(expected, abs=0.01), task
    size = name[-1]
    assert {s.name for s in models.MODEL_SPECS.values() if s.reference == name} == {
        name, f'spatial-mamba-{size}', f'vmamba-{size}', f'spectral-vmamba-{size}'}

def test_prepared_configs_load_nothing_and_overrides_apply():
    arch = dict(_delete_=True, dims=[256, 32, 64, 128], depths=[1, 1, 1, 1])
    cfg = models.prepare_config('classification/configs/spectral_vmamba/spectral-vmamba-tiny_8xb128_in1k.py',
                                {'model.backbone.arch': arch})
    assert cfg.model.backbone.rfn_pretrained is None and not cfg.model.backbone.get('init_cfg')
    backbone = models.build_backbone(cfg, ops_backend='torch', out_indices=(1, ))
    assert backbone.out_indices == (1, ) and cfg.model.backbone.get('out_indices') != (1, )  # the config unchanged
    with pytest.raises(FileNotFoundError, match="config file 'missing.py' does not exist"):
        models.prepare_config('missing.py')


def test_build_model_takes_the_ops_backend_and_the_runner_data_preprocessor():
    cfg = models.prepare_config('classification/configs/vmamba/vmamba-tiny_8xb128_in1k.py',
                                {'model.backbone.arch': dict(_delete_=True, **TINY_VMAMBA),
                                 'model.head.in_channels': 64})
    model = models.build_model(cfg, ops_backend='torch')
    assert model.backbone.ops_backend == 'torch'
    assert model.data_preprocessor.num_classes == cfg.data_preprocessor.num_classes  # the top-level one


def test_backbone_state_dict_takes_whole_models_and_backbones(tmp_path):
    weights = {'layers.0.weight': torch.ones(2)}
    torch.save({'state_dict': {'module.backbone.layers.0.weight': torch.ones(2), 'head.fc.bias': torch.zeros(3)}},
               tmp_path / 'model.pth')
    torch.save(weights, tmp_path / 'backbone.pth')
    for name in ('model.pth', 'backbone.pth'):
        state = models.backbone_state_dict(str(tmp_path / name))
        assert state.keys() == weights.keys() and torch.equal(state['layers.0.weight'], torch.ones(2))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        models.backbone_state_dict(str(tmp_path / 'missing.pth'))


# --- saved tensors -----------------------------------------------------------------------------------------------
def test_views_of_one_storage_count_once_and_parameters_not_at_all():
    layer = torch.nn.Linear(8, 8, bias=False)
    x = torch.randn(4, 8, requires_grad=True)

    def step():
        base = layer(x)  # saves x and the weight (a parameter: not counted)
        return (base[:, :4] * base[:, 4:]).sum()  # saves two views of `base`

    saved = memory.record_saved_tensors(layer, step)
    assert sorted((s.nbytes, s.saves) for s in saved.storages) == [(4 * 8 * 4, 1), (4 * 8 * 4, 2)]
    assert saved.saved_bytes == 2 * 4 * 8 * 4 and saved.by_type == {'Linear': saved.saved_bytes}


def test_saved_activations_grow_with_the_batch_and_are_attributed_to_modules():
    from vssm.models import VMamba
    torch.manual_seed(0)
    model = VMamba(TINY_VMAMBA, out_indices=(3, ), ops_backend='torch').train()

    def saved(batch: int) -> memory.SavedMemory:
        images = torch.randn(batch, 3, 32, 32)
        return memory.record_saved_tensors(model, lambda: model(images)[0].sum())

    one, two = saved(2), saved(4)
    assert 0 < one.saved_bytes < two.saved_bytes <= 2 * one.saved_bytes
    assert sum(one.by_type.values()) == sum(one.by_module.values()) == one.saved_bytes
    assert 'SS2D' in one.by_type and list(one.by_type.values()) == sorted(one.by_type.values(), reverse=True)
    static = memory.static_bytes(model)
    assert static['adamw_state'] == 2 * static['gradients'] > 0


# --- timing ------------------------------------------------------------------------------------------------------
def test_timing_on_a_cpu():
    cpu = torch.device('cpu')
    calls = []
    assert timing.timed_span(lambda: calls.append(1), 3, cpu) >= 0 and len(calls) == 3
    assert timing.median_ms(lambda: calls.append(1), cpu, warmup=1, rounds=3, calls=2) >= 0 and len(calls) == 10
    timing.reset_peak(cpu)
    assert timing.peak_bytes(cpu) is None and timing.device_name(cpu).startswith('CPU')
    assert timing.error_text(torch.OutOfMemoryError('CUDA out of memory. Tried')) == 'out of memory'
    assert timing.error_text(ValueError('bad\nmore')) == 'ValueError: bad'
