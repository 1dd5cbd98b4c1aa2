"""vssm.engine.launch: config overrides, CPU adaptation, safe checkpoint loading."""
import pickle

import pytest
import torch
from conftest import REPO_ROOT
from mmengine.config import Config

from vssm.engine.launch import _replace_sync_bn, apply_demo_override, load_config, prepare_for_device
from vssm.fileio import register_safe_globals

CLS_CONFIG = str(REPO_ROOT / 'classification/configs/spatial_mamba/spatial-mamba-tiny_8xb128_in1k.py')
SEG_CONFIG = str(REPO_ROOT / 'segmentation/configs/spatial_mamba'
                 / 'spatial-mamba-tiny_upernet_8xb2-160k_ade20k-512x512.py')


def test_sync_bn_becomes_bn_in_nested_configs():
    cfg = dict(a=dict(norm_cfg=dict(type='SyncBN', requires_grad=True)),
               heads=[dict(norm_cfg=dict(type='SyncBN')), dict(norm_cfg=dict(type='LN'))])
    assert _replace_sync_bn(cfg) == 2
    assert cfg['a']['norm_cfg']['type'] == 'BN' and cfg['heads'][0]['norm_cfg']['type'] == 'BN'
    assert cfg['heads'][1]['norm_cfg']['type'] == 'LN'


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU adaptation')
def test_prepare_for_device_on_cpu():
    cfg = Config.fromfile(SEG_CONFIG)
    changes = prepare_for_device(cfg, 'none')
    assert any('SyncBN' in c for c in changes)
    assert 'SyncBN' not in str(cfg.model)
    with pytest.raises(RuntimeError, match='tools/dist_train.sh'):
        prepare_for_device(Config.fromfile(CLS_CONFIG), 'slurm')


def test_demo_override_then_cfg_options():
    cfg = load_config(CLS_CONFIG, {'train_cfg.max_iters': 2}, demo=True)
    assert cfg.train_cfg.max_iters == 2 and cfg.train_cfg.type == 'IterBasedTrainLoop'
    assert cfg.train_dataloader.dataset.type == 'CustomDataset'
    assert cfg.model.head.num_classes == 4 and cfg.work_dir.endswith('_demo')
    assert load_config(CLS_CONFIG, work_dir='x').work_dir == 'x'


def test_demo_override_needs_a_known_scope():
    cfg = Config(dict(default_scope='mmocr'))
    with pytest.raises(ValueError, match='no demo override'):
        apply_demo_override(cfg, REPO_ROOT)


def test_missing_config_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_config('nope.py')


class _Evil:
    """Pickles as getattr(HistoryBuffer, '__init__'): a getattr that the stand-in must refuse."""

    def __reduce__(self):
        from mmengine.logging import HistoryBuffer
        return getattr, (HistoryBuffer, '__init__')


def test_safe_globals_load_mmengine_state_but_refuse_arbitrary_getattr(tmp_path):
    from mmengine.logging import MessageHub
    register_safe_globals()
    hub = MessageHub.get_instance('vssm-test')
    hub.update_scalar('train/loss', 1.5)
    path = tmp_path / 'ckpt.pth'
    torch.save({'message_hub': hub.state_dict(), 'meta': {'seed': 0}}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded['message_hub']['log_scalars']['train/loss'].current() == 1.5
    torch.save({'x': _Evil()}, tmp_path / 'evil.pth')
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / 'evil.pth', weights_only=True)
