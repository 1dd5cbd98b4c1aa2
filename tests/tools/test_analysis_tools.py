"""tools/analysis_tools/erf.py, tools/analysis_tools/plot_curves.py and tools/misc/print_config.py."""
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, load_tool
from mmengine.config import Config
from PIL import Image
from torch import nn

CLS_CONFIG = REPO_ROOT / 'classification/configs/vmamba/vmamba-tiny_8xb128_in1k.py'
TINY_ARCHS = {  # family -> (a config of that family, a small arch)
    'VMamba': ('classification/configs/vmamba/vmamba-tiny_8xb128_in1k.py',
               dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], ssm_ratio=1.0)),
    'SpatialMamba': ('detection/configs/spatial_mamba/mask-rcnn_spatial-mamba-t_fpn_1x_coco.py',
                     dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1])),
    'SpectralVMamba': ('segmentation/configs/spectral_vmamba/spectral-vmamba-tiny_upernet_8xb2-160k_ade20k-512x512.py',
                       dict(dims=[256, 32, 64, 128], depths=[1, 1, 1, 1])),
}


def _tool(relative: str) -> ModuleType:
    return load_tool(relative)


@pytest.fixture(scope='module')
def erf():
    return _tool('tools/analysis_tools/erf.py')


@pytest.fixture(scope='module')
def plot_curves():
    return _tool('tools/analysis_tools/plot_curves.py')


@pytest.fixture(scope='module')
def print_config():
    return _tool('tools/misc/print_config.py')


def _tiny_config(tmp_path: Path, family: str) -> str:
    """A config inheriting one of ours with a small arch (an arch dict cannot be given through --cfg-options)."""
    base, arch = TINY_ARCHS[family]
    path = tmp_path / f'tiny_{family}.py'
    path.write_text(f'_base_ = {str(REPO_ROOT / base)!r}\n'
                    f'model = dict(backbone=dict(arch=dict(_delete_=True, **{arch!r})))\n')
    return str(path)


# --- erf -------------------------------------------------------------------------------------------------------------
class _Conv3x3(nn.Module):
    """A stand-in backbone: one 3x3 conv, so the central output pixel sees exactly a 3x3 input window."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return (self.conv(x), )


def test_input_gradient_covers_exactly_the_receptive_field(erf):
    outside = torch.ones(9, 9, dtype=torch.bool)
    outside[3:6, 3:6] = False
    grad = erf.input_gradient(_Conv3x3(), torch.randn(1, 3, 9, 9))
    assert grad.shape == (9, 9)
    assert (grad[3:6, 3:6] > 0).all() and not grad[outside].any()
    relu_grad = erf.input_gradient(_Conv3x3(), torch.randn(1, 3, 9, 9), relu=True)
    assert (relu_grad >= 0).all() and not relu_grad[outside].any()


def test_area_ratios_and_scaling(erf):
    delta = np.zeros((11, 11))
    delta[5, 5] = 7.0
    assert all(r == (1, 1 / 121) for r in erf.area_ratios(delta).values())
    uniform = erf.area_ratios(np.ones((101, 101)))
    ratios = [ratio for _, ratio in uniform.values()]
    assert ratios == sorted(ratios) and 0 < ratios[0] and ratios[-1] <= 1
    assert uniform[0.5][1] == pytest.approx(0.5, abs=0.03)
    assert all(r == (11, 1.0) for r in erf.area_ratios(np.zeros((11, 11))).values())  # nothing: the whole input
    scaled = erf.scale_map(np.array([[0.0, 9.0], [99.0, 0.0]]))
    np.testing.assert_allclose(scaled, [[0.0, 0.5], [1.0, 0.0]])


@pytest.mark.parametrize('family', list(TINY_ARCHS))
def test_erf_of_every_family(erf, family, tmp_path):
    backbone = erf.build_backbone(_tiny_config(tmp_path, family), stage=-1, ops_backend='torch')
    assert type(backbone).__name__ == family and backbone.out_indices == (3, ) and not backbone.training
    erf.drop_output_norm(backbone)
    mean, count = erf.compute_erf(backbone, [('noise', torch.randn(1, 3, 64, 64))])
    assert count == 1 and mean.shape == (64, 64)
    assert np.isfinite(mean).all() and mean.max() > 0  # SpectralVMamba: through the frozen RFN too
    if family == 'SpectralVMamba':
        with pytest.raises(SystemExit, match='multiples of 16'):
            erf.compute_erf(backbone, [('noise', torch.randn(1, 3, 40, 40))])


def test_erf_cli_with_images_and_a_checkpoint(erf, tmp_path, capsys):
    config = _tiny_config(tmp_path, 'VMamba')
    images = tmp_path / 'images'
    (images / 'sub').mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ('a.png', 'sub/b.jpg'):
        Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(images / name)
    torch.manual_seed(0)
    backbone = erf.build_backbone(config, stage=-1, ops_backend='torch')  # classifier keys: only outnorm3
    checkpoint = tmp_path / 'cls.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in backbone.state_dict().items()}}, checkpoint)
    out, raw = tmp_path / 'erf.png', tmp_path / 'erf.npy'
    ratios = erf.main([config, '--images', str(images), '--num-images', '5', '--size', '64', '--stage', '1',
                       '--checkpoint', str(checkpoint), '--out', str(out), '--save-map', str(raw)])
    captured = capsys.readouterr()
    assert 'only 2 images found' in captured.err and 'random' not in captured.err
    assert 'VMamba stage 1, 2 inputs of 64x64, cls.pth' in captured.out
    values = [ratio for _, ratio in ratios.values()]
    assert list(ratios) == [0.2, 0.3, 0.5, 0.99] and values == sorted(values)
    assert all(0 < v <= 1 for v in values)
    assert np.load(raw).shape == (64, 64)
    with Image.open(out) as png:
        assert png.format == 'PNG' and min(png.size) > 300


def test_erf_cli_says_what_is_random_and_fails_clearly(erf, tmp_path, capsys):
    config = _tiny_config(tmp_path, 'VMamba')
    erf.main([config, '--num-images', '1', '--size', '32', '--out', str(tmp_path / 'noise.png')])
    err = capsys.readouterr().err
    assert 'weights are random' in err and 'noise' in err
    with pytest.raises(SystemExit, match='neither an image file nor a folder'):
        erf.main([config, '--images', str(tmp_path / 'missing')])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SystemExit, match='no images'):
        erf.main([config, '--images', str(tmp_path / 'empty')])
    wrong = tmp_path / 'wrong.pth'
    torch.save({'state_dict': {'backbone.patch_embed.0.weight': torch.zeros(1)}}, wrong)
    with pytest.raises(SystemExit, match='does not fit'):
        erf.main([config, '--checkpoint', str(wrong), '--size', '32'])
    with pytest.raises(SystemExit, match='does not exist'):
        erf.main([str(tmp_path / 'missing.py')])
    with pytest.raises(SystemExit, match='out_indices'):
        erf.main([config, '--stage', '4', '--size', '32'])


# --- plot_curves -----------------------------------------------------------------------------------------------------
def _write_log(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))


def _iter_based_run(work_dir: Path) -> None:
    """Two sessions of an iteration-based run (the second resumed at 4), as mmengine writes them."""
    train = [dict(lr=1e-3, loss=3.0 - 0.1 * i, time=1.0, data_time=0.1, iter=i, step=i) for i in range(1, 7)]
    val = [{'accuracy/top1': 20.0 + i, 'time': 0.5, 'data_time': 0.1, 'step': 0} for i in range(3)]
    _write_log(work_dir / '20250101_000000/vis_data/scalars.json', train[:2] + val[:1] + train[2:4] + val[1:2])
    _write_log(work_dir / '20250102_000000/vis_data/scalars.json', train[4:6] + val[2:3])
    (work_dir / '20250103_000000').mkdir()  # a test-only session: no log


def test_plot_curves_reads_resumed_and_epoch_based_runs(plot_curves, tmp_path, capsys):
    _iter_based_run(tmp_path / 'iter_run')
    epoch_log = tmp_path / 'epoch_run/20250101_000000/20250101_000000.json'  # no scalars.json: the timestamp log
    _write_log(epoch_log, [
        dict(lr=1e-3, loss=2.0, epoch=1, iter=5, step=5), dict(lr=1e-3, loss=1.5, epoch=1, iter=10, step=10),
        {'accuracy/top1': 30.0, 'step': 1}, dict(lr=1e-3, loss=1.2, epoch=2, iter=20, step=20),
        {'accuracy/top1': 40.0, 'step': 2}, {'accuracy/top1': 41.0, 'single-test': True}])
    out = tmp_path / 'curves.png'
    runs = plot_curves.main([str(tmp_path / 'iter_run'), str(epoch_log), '--out', str(out)])
    iter_run, epoch_run = runs
    assert [r.name for r in runs] == ['iter_run', 'epoch_run'] and len(iter_run.files) == 2
    assert plot_curves.series(iter_run, 'loss', False)[0] == [1, 2, 3, 4, 5, 6]
    assert plot_curves.series(iter_run, 'accuracy/top1', False) == ([2, 4, 6], [20.0, 21.0, 22.0])
    assert plot_curves.series(iter_run, 'time', False)[1] == [1.0] * 6  # the training one
    assert epoch_run.by_epoch and not iter_run.by_epoch
    assert plot_curves.series(epoch_run, 'accuracy/top1', True) == ([1, 2], [30.0, 40.0])
    assert plot_curves.series(epoch_run, 'accuracy/top1', False) == ([10, 20], [30.0, 40.0])
    assert 'accuracy/top1: 3 points, last 22 at iteration 6' in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.format == 'PNG'


def test_plot_curves_keys_and_legend(plot_curves, tmp_path):
    _iter_based_run(tmp_path / 'run')
    log = tmp_path / 'run/20250101_000000/vis_data/scalars.json'
    out = tmp_path / 'two.png'
    runs = plot_curves.main([str(tmp_path / 'run'), str(log), '--keys', 'lr', 'loss', 'accuracy/top1',
                             '--legend', 'full', 'first', '--out', str(out), '--title', 'demo'])
    assert [r.name for r in runs] == ['full', 'first'] and out.is_file()
    assert plot_curves.default_keys(runs) == ['loss', 'accuracy/top1']


def test_plot_curves_errors(plot_curves, tmp_path):
    _iter_based_run(tmp_path / 'run')
    with pytest.raises(SystemExit, match="does not exist"):
        plot_curves.main([str(tmp_path / 'missing')])
    (tmp_path / 'empty/20250101_000000').mkdir(parents=True)
    with pytest.raises(SystemExit, match='no log in .*scalars.json'):
        plot_curves.main([str(tmp_path / 'empty')])
    with pytest.raises(SystemExit, match=r"no run has the key 'mIoU'(.|\n)*accuracy/top1"):
        plot_curves.main([str(tmp_path / 'run'), '--keys', 'loss', 'mIoU'])
    with pytest.raises(SystemExit, match='2 names for 1 runs'):
        plot_curves.main([str(tmp_path / 'run'), '--legend', 'a', 'b'])
    bad = tmp_path / 'bad.json'
    bad.write_text('{"loss": 1, "iter": 1, "step": 1}\nnot json\n')
    with pytest.raises(SystemExit, match='bad.json:2 is not a JSON object per line'):
        plot_curves.main([str(bad)])


# --- print_config ----------------------------------------------------------------------------------------------------
def test_print_config_applies_demo_and_cfg_options(print_config, tmp_path, capsys):
    saved = tmp_path / 'resolved.py'
    cfg = print_config.main([str(CLS_CONFIG), '--demo', '--cfg-options', 'train_cfg.max_iters=3',
                             'model.backbone.drop_path_rate=0.0', '--save', str(saved)])
    out = capsys.readouterr().out
    assert "data_root = 'data/demo/imagenet'" in out and 'max_iters=3' in out
    assert cfg.model.backbone.drop_path_rate == 0.0 and cfg.model.head.num_classes == 4
    assert cfg.work_dir == 'work_dirs/vmamba-tiny_8xb128_in1k_demo'
    assert Config.fromfile(str(saved)).to_dict() == cfg.to_dict()  # the saved file is the same config


def test_print_config_without_demo_and_errors(print_config, tmp_path, capsys):
    print_config.main([str(CLS_CONFIG)])
    out = capsys.readouterr().out
    assert "data_root='data/imagenet'" in out and 'data/demo' not in out
    assert "_base_" not in out  # bases are merged
    with pytest.raises(SystemExit, match='does not exist'):
        print_config.main([str(tmp_path / 'missing.py')])
    with pytest.raises(SystemExit, match='must end in'):
        print_config.main([str(CLS_CONFIG), '--save', str(tmp_path / 'resolved.txt')])
