"""Pretrained weights load strictly (mmengine's Pretrained init only warns): another family's or size's checkpoint,
a truncated file and a missing file fail with errors that say what to do; data paths are checked before training."""
import pytest
import torch
from mmengine.config import Config

from vssm.engine.launch import check_data_paths
from vssm.models import SpatialMamba, VMamba

ARCH = dict(dims=[8, 16, 32, 64], depths=[1, 1, 2, 1], ssm_ratio=1.0)


def _classifier_checkpoint(tmp_path, model, name='cls.pth'):
    path = tmp_path / name
    state = {f'backbone.{k}': v for k, v in model.state_dict().items()}
    state.update({'head.fc.weight': torch.zeros(10, 64), 'head.fc.bias': torch.zeros(10)})
    torch.save({'state_dict': state, 'meta': {}}, path)
    return path


def _pretrained(path, **extra):
    return dict(type='Pretrained', checkpoint=str(path), prefix='backbone.', **extra)


def test_classifier_checkpoint_loads_into_a_dense_prediction_backbone(tmp_path):
    source = VMamba(ARCH)  # out_indices (3,): the classifier's backbone holds outnorm3 only
    path = _classifier_checkpoint(tmp_path, source)
    target = VMamba(ARCH, out_indices=(0, 1, 2, 3), init_cfg=_pretrained(path))
    target.init_weights()
    own = target.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(own[key], value), key


def test_checkpoint_of_another_family_or_size_fails_listing_keys(tmp_path):
    path = _classifier_checkpoint(tmp_path, SpatialMamba(dict(dims=[8, 16, 32, 64], depths=[1, 1, 2, 1])))
    with pytest.raises(ValueError, match=r'does not fit this backbone(.|\n)*missing keys: .*unexpected keys: '
                                         r'.*model_converters'):
        VMamba(ARCH, init_cfg=_pretrained(path)).init_weights()
    bigger = _classifier_checkpoint(tmp_path, VMamba(dict(ARCH, dims=[16, 32, 64, 128])), 'bigger.pth')
    with pytest.raises(ValueError, match=r'shape mismatches: .*checkpoint \(16'):
        VMamba(ARCH, init_cfg=_pretrained(bigger)).init_weights()
    model = VMamba(ARCH, init_cfg=_pretrained(bigger, strict=False))  # an explicit partial load works
    model.init_weights()


def test_truncated_missing_and_prefixless_checkpoints(tmp_path):
    path = _classifier_checkpoint(tmp_path, VMamba(ARCH))
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match='not a complete checkpoint'):
        VMamba(ARCH, init_cfg=_pretrained(truncated)).init_weights()
    with pytest.raises(FileNotFoundError, match='does not exist .*init_cfg=None'):
        VMamba(ARCH, init_cfg=_pretrained(tmp_path / 'missing.pth')).init_weights()
    with pytest.raises(ValueError, match="no keys under prefix 'neck.'"):
        VMamba(ARCH, init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='neck.')).init_weights()


def test_missing_data_root_and_annotation_file(tmp_path):
    cfg = Config(dict(train_dataloader=dict(dataset=dict(data_root=str(tmp_path / 'coco'), ann_file='a.json'))))
    with pytest.raises(FileNotFoundError, match=r"train_dataloader.dataset.data_root .*coco' does not exist.*--demo"):
        check_data_paths(cfg, ('train', ))
    (tmp_path / 'coco').mkdir()
    with pytest.raises(FileNotFoundError, match=r"train_dataloader.dataset.ann_file .*a.json' does not exist"):
        check_data_paths(cfg, ('train', ))
    (tmp_path / 'coco' / 'a.json').write_text('{}')
    check_data_paths(cfg, ('train', 'val'))  # complete, and no val loader: nothing to check
