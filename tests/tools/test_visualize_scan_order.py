"""tools/analysis_tools/visualize_scan_order.py: a PNG of the orders on an image and its rotations; checkpoints."""
import json

import numpy as np
import pytest
import torch
from conftest import load_tool
from PIL import Image

from vssm.models import SpectralVMamba

ARCH = dict(dims=[256, 32, 64, 128], depths=[1, 1, 1, 1])


def _tool():
    return load_tool('tools/analysis_tools/visualize_scan_order.py')


@pytest.fixture
def image(tmp_path):
    rgb = np.zeros((80, 80, 3), np.uint8)
    rgb[10:50, 20:70] = (255, 0, 128)
    path = tmp_path / 'shape.png'
    Image.fromarray(rgb).save(path)
    return path


def test_writes_a_png_with_a_checkpoint(image, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / 'cls.pth'
    backbone = SpectralVMamba(ARCH, out_indices=(3, ))
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in backbone.state_dict().items()}}, ckpt)
    out = tmp_path / 'orders.png'
    _tool().main([str(image), '--arch', json.dumps(ARCH), '--size', '64', '--checkpoint', str(ckpt), '--out',
                  str(out), '--path-tokens', '6'])
    with Image.open(out) as png:
        assert png.format == 'PNG' and png.size[0] > 500 and png.size[1] > 500


def test_rank_maps_rotate_with_the_image(image):
    tool = _tool()
    args = tool.parse_args([str(image), '--arch', json.dumps(ARCH), '--size', '64'])
    x, _ = tool.load_image(str(image), 64)
    maps = tool.rank_maps(tool.build_model(args), x, stage=0)
    assert maps[0].shape == (4, 4, 4)
    for t in range(4):  # every rank is used once per order
        assert sorted(maps[0][t].flatten().tolist()) == list(range(16))


def test_clear_errors(image, tmp_path):
    tool = _tool()
    with pytest.raises(SystemExit, match='does not exist'):
        tool.main([str(tmp_path / 'missing.jpg')])
    with pytest.raises(SystemExit, match='multiple of 16'):
        tool.main([str(image), '--size', '70'])
    wrong = tmp_path / 'wrong.pth'
    torch.save({'state_dict': {'backbone.patch_embed.0.weight': torch.zeros(1)}}, wrong)
    with pytest.raises(SystemExit, match='not a SpectralVMamba'):
        tool.main([str(image), '--arch', json.dumps(ARCH), '--size', '64', '--checkpoint', str(wrong)])
