"""Tests for tools/make_demo_data.py: determinism, skipping, layouts, and loading through the OpenMMLab datasets."""
import hashlib
from pathlib import Path
from types import ModuleType
from typing import Dict

import cv2
import mmseg.datasets  # noqa: F401  registers mmseg's datasets and transforms (scope 'mmseg')
import numpy as np
import pytest
from conftest import load_tool
from mmdet.datasets import CocoDataset
from mmpretrain.datasets import CustomDataset
from mmseg.datasets import BaseSegDataset
from mmseg.datasets.transforms import LoadAnnotations
from pycocotools.coco import COCO


def _load_tool() -> ModuleType:
    return load_tool('tools/make_demo_data.py')


tool = _load_tool()
ADE_ROOT = Path('ade', 'ADEChallengeData2016')


def _file_hashes(root: Path) -> Dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob('*')) if path.is_file()
    }


@pytest.fixture(scope='module')
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp('demo')
    result = tool.make_demo_data(str(out), seed=0)
    assert not result['skipped']
    return out


def test_same_seed_gives_identical_files(demo: Path, tmp_path: Path) -> None:
    again = tool.make_demo_data(str(tmp_path / 'again'), seed=0)
    assert not again['skipped']
    assert _file_hashes(tmp_path / 'again') == _file_hashes(demo)

    other = tmp_path / 'other_seed'
    tool.make_demo_data(str(other), seed=1)
    assert _file_hashes(other).keys() == _file_hashes(demo).keys()
    assert _file_hashes(other) != _file_hashes(demo)


def test_second_call_skips_and_rewrites_nothing(demo: Path) -> None:
    before = {path: path.stat().st_mtime_ns for path in demo.rglob('*')}
    result = tool.make_demo_data(str(demo), seed=0)
    assert result['skipped']
    assert {path: path.stat().st_mtime_ns for path in demo.rglob('*')} == before
    assert result['counts']['imagenet/train'] == 4 * tool.CLS_PER_CLASS['train']


def test_force_and_other_seed_regenerate(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / 'demo'
    tool.make_demo_data(str(out), seed=0)
    assert not tool.make_demo_data(str(out), seed=0, force=True)['skipped']
    assert not tool.make_demo_data(str(out), seed=3)['skipped']
    assert tool.make_demo_data(str(out), seed=3)['skipped']
    assert not tool.make_demo_data(str(out), seed=0)['skipped']
    assert _file_hashes(out) == _file_hashes(demo)


def test_interrupted_run_is_regenerated(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / 'demo'

    def interrupt(*args) -> Dict[str, int]:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(tool, '_make_ade', interrupt)
        with pytest.raises(KeyboardInterrupt):
            tool.make_demo_data(str(out), seed=0)
    assert not (out / '.complete').exists()

    assert not tool.make_demo_data(str(out), seed=0)['skipped']
    assert _file_hashes(out) == _file_hashes(demo)


def test_refuses_folders_it_did_not_write(tmp_path: Path) -> None:
    foreign = tmp_path / 'coco' / 'annotations' / 'instances_train2017.json'
    foreign.parent.mkdir(parents=True)
    foreign.write_text('{}')
    with pytest.raises(FileExistsError, match='--force'):
        tool.make_demo_data(str(tmp_path), seed=0)
    assert foreign.read_text() == '{}'

    assert not tool.make_demo_data(str(tmp_path), seed=0, force=True)['skipped']
    assert foreign.read_text() != '{}'


def test_negative_seed_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='non-negative'):
        tool.make_demo_data(str(tmp_path), seed=-1)


def test_scale_multiplies_every_split_and_regenerates(demo: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='scale must be a positive integer'):
        tool.make_demo_data(str(tmp_path), seed=0, scale=0)
    base = tool.make_demo_data(str(demo), seed=0)
    assert base['skipped']
    scaled = tool.make_demo_data(str(tmp_path), seed=0, scale=2)
    assert not scaled['skipped']
    assert scaled['counts'].keys() == base['counts'].keys()
    for key, count in base['counts'].items():
        if '/instances_' in key:  # the shapes per image are random
            assert scaled['counts'][key] > count, key
        else:
            assert scaled['counts'][key] == 2 * count, key
    assert len(list((tmp_path / ADE_ROOT / 'images' / 'training').glob('*.jpg'))) == 2 * tool.SEG_IMAGES['training']
    assert tool.make_demo_data(str(tmp_path), seed=0, scale=2)['skipped']
    assert not tool.make_demo_data(str(tmp_path), seed=0)['skipped']  # another scale regenerates
    assert _file_hashes(tmp_path) == _file_hashes(demo)


def test_counts_and_layout(demo: Path) -> None:
    for split, per_class in tool.CLS_PER_CLASS.items():
        for name in tool.CLASSES:
            files = sorted((demo / 'imagenet' / split / name).glob('*.JPEG'))
            assert len(files) == per_class, (split, name)
        assert len((demo / 'imagenet' / 'meta' / f'{split}.txt').read_text().splitlines()) == 4 * per_class
    assert (demo / 'imagenet' / 'classes.txt').read_text().split() == sorted(tool.CLASSES)
    assert cv2.imread(str(demo / 'imagenet' / 'train' / 'cross' / 'cross_0.JPEG')).shape == (64, 64, 3)

    assert len(list((demo / 'coco' / 'train2017').glob('*.jpg'))) == 24
    assert len(list((demo / 'coco' / 'val2017').glob('*.jpg'))) == 8
    for split, num in (('training', 24), ('validation', 8)):
        images = sorted(p.stem for p in (demo / ADE_ROOT / 'images' / split).glob('*.jpg'))
        labels = sorted(p.stem for p in (demo / ADE_ROOT / 'annotations' / split).glob('*.png'))
        assert len(images) == num and images == labels


@pytest.mark.parametrize('split', ['train2017', 'val2017'])
def test_coco_annotations_are_consistent(demo: Path, split: str) -> None:
    coco = COCO(str(demo / 'coco' / 'annotations' / f'instances_{split}.json'))
    assert [cat['name'] for cat in coco.loadCats(coco.getCatIds())] == list(tool.CLASSES)
    assert len(coco.getImgIds()) == (24 if split == 'train2017' else 8)
    for img in coco.loadImgs(coco.getImgIds()):
        assert (img['width'], img['height']) == (160, 128)
        assert (demo / 'coco' / split / img['file_name']).is_file()
        assert 1 <= len(coco.getAnnIds(imgIds=img['id'])) <= 3
    for ann in coco.loadAnns(coco.getAnnIds()):
        x, y, w, h = ann['bbox']
        points = np.array(ann['segmentation'][0]).reshape(-1, 2)
        assert ann['area'] > 0 and ann['iscrowd'] == 0
        assert points[:, 0].min() >= x and points[:, 0].max() <= x + w
        assert points[:, 1].min() >= y and points[:, 1].max() <= y + h
        assert x >= 0 and y >= 0 and x + w < 160 and y + h < 128
        assert 19 <= max(w, h) <= 65  # circumscribed diameter 24-64 px; a triangle spans sqrt(3)/2 of it


@pytest.mark.parametrize('split', ['train2017', 'val2017'])
def test_coco_masks_match_drawn_shapes(demo: Path, split: str) -> None:
    coco = COCO(str(demo / 'coco' / 'annotations' / f'instances_{split}.json'))
    kernel = np.ones((3, 3), np.uint8)
    for ann in coco.loadAnns(coco.getAnnIds()):
        image = cv2.imread(str(demo / 'coco' / split / coco.imgs[ann['image_id']]['file_name'])).astype(int)
        mask = coco.annToMask(ann)  # (H, W) uint8
        inner = cv2.erode(mask, kernel).astype(bool)
        ring = cv2.dilate(mask, kernel, iterations=4).astype(bool) & ~cv2.dilate(mask, kernel).astype(bool)
        colour = np.median(image[inner], axis=0)
        shape_coloured = np.abs(image - colour).max(axis=-1) <= 40  # (H, W)
        assert shape_coloured[inner].mean() > 0.95, f'annotation {ann["id"]}: mask covers background'
        assert shape_coloured[ring].mean() < 0.05, f'annotation {ann["id"]}: shape extends beyond the mask'


def test_coco_loads_with_mmdet(demo: Path) -> None:
    dataset = CocoDataset(data_root=str(demo / 'coco'), ann_file='annotations/instances_val2017.json',
                          data_prefix=dict(img='val2017/'), metainfo=dict(classes=tool.CLASSES), pipeline=[])
    assert len(dataset) == 8
    for info in dataset:
        assert Path(info['img_path']).is_file()
        assert info['instances'] and all(0 <= inst['bbox_label'] < 4 for inst in info['instances'])


def test_ade_label_maps(demo: Path) -> None:
    values = set()
    for path in sorted((demo / ADE_ROOT / 'annotations').rglob('*.png')):
        label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert label.shape == (128, 128) and label.dtype == np.uint8, path
        assert 0 < (label == 0).mean() < 0.2, path  # the boundary rings only
        assert 2 <= cv2.connectedComponents((label >= 2).astype(np.uint8))[0] - 1 <= 4, path
        values.update(np.unique(label).tolist())
    assert values == {0, 1, 2, 3, 4, 5}


def test_ade_loads_with_mmseg(demo: Path) -> None:
    dataset = BaseSegDataset(
        data_root=str(demo / ADE_ROOT),
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        img_suffix='.jpg',
        seg_map_suffix='.png',
        reduce_zero_label=True,
        metainfo=dict(classes=tool.SEG_CLASSES, palette=tool.SEG_PALETTE),
        pipeline=[])
    assert len(dataset) == 8
    assert dataset.metainfo['classes'] == ('background', 'circle', 'square', 'triangle', 'cross')
    results = LoadAnnotations()(dict(dataset[0], seg_fields=[]))
    assert set(np.unique(results['gt_seg_map']).tolist()) <= {0, 1, 2, 3, 4, 255}
    assert 255 in results['gt_seg_map'] and 0 in results['gt_seg_map']


def test_classification_loads_with_mmpretrain(demo: Path) -> None:
    train = CustomDataset(data_root=str(demo / 'imagenet'), data_prefix='train', pipeline=[])
    assert len(train) == 4 * tool.CLS_PER_CLASS['train']
    assert train.CLASSES == ('circle', 'cross', 'square', 'triangle')
    val = CustomDataset(data_root=str(demo / 'imagenet'), ann_file='meta/val.txt', data_prefix='val',
                        metainfo=dict(classes=sorted(tool.CLASSES)), pipeline=[])
    assert len(val) == 4 * tool.CLS_PER_CLASS['val']
    for info in val:
        assert val.CLASSES[info['gt_label']] == Path(info['img_path']).parent.name
