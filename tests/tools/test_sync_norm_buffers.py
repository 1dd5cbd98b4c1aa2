"""What is validated is what is saved: SyncNormBuffersHook averages the ranks' BatchNorm statistics before validation
and before each checkpoint, so the in-training validation of a 2-process run equals tools/dist_test.sh on the saved
checkpoint (metric and every score)."""
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mmengine.hooks import CheckpointHook

sys.path.insert(0, str(Path(__file__).parent))
from tiny_runs import REPO_ROOT, config, make_demo_data, run  # noqa: E402

import vssm.engine.hooks as hooks  # noqa: E402
from vssm.engine import SyncNormBuffersHook  # noqa: E402
from vssm.engine.hooks import norm_buffers  # noqa: E402


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.LayerNorm(4),
                               torch.nn.InstanceNorm2d(4, track_running_stats=True), torch.nn.BatchNorm1d(4,
                                                                                                        affine=False))


def test_norm_buffers_are_the_running_statistics_only():
    model = _model()
    buffers = norm_buffers(model, model)
    expected = [model[1].running_mean, model[1].running_var, model[3].running_mean, model[3].running_var,
                model[4].running_mean, model[4].running_var]
    assert len(buffers) == len(expected) and all(a is b for a, b in zip(buffers, expected))  # no counters, once each


@pytest.fixture
def reduced(monkeypatch):
    """Pretend to be one of 2 ranks; record what the hook all-reduces."""
    calls = []
    monkeypatch.setattr(hooks, 'get_world_size', lambda: 2)
    monkeypatch.setattr(hooks, 'all_reduce_params', lambda params, op: calls.append((len(list(params)), op)))
    return calls


def _runner(iteration: int, max_iters: int, checkpoint: CheckpointHook):
    return SimpleNamespace(model=_model(), hooks=[checkpoint], iter=iteration, max_iters=max_iters, epoch=0,
                           max_epochs=1)


def test_syncs_on_the_iterations_that_save_a_checkpoint_and_before_validation(reduced):
    hook = SyncNormBuffersHook()
    checkpoint = CheckpointHook(interval=3, by_epoch=False)
    for iteration in range(7):  # iterations 1..7 of 7: checkpoints after 3, 6 and the last one
        hook.after_train_iter(_runner(iteration, 7, checkpoint), iteration)
    assert reduced == [(6, 'mean')] * 3  # three norms' running mean and variance
    hook.before_val_epoch(_runner(7, 7, checkpoint))
    hook.after_train(_runner(7, 7, checkpoint))
    assert len(reduced) == 5
    hook.after_train_epoch(_runner(7, 7, checkpoint))  # an iteration-based CheckpointHook saves nothing here
    assert len(reduced) == 5


def test_does_nothing_in_a_single_process(monkeypatch):
    monkeypatch.setattr(hooks, 'all_reduce_params', lambda *a, **k: pytest.fail('no collective in one process'))
    SyncNormBuffersHook().before_val_epoch(_runner(0, 1, CheckpointHook(interval=1)))


@pytest.mark.slow
def test_validation_during_training_equals_testing_the_saved_checkpoint(tmp_path):
    """2 processes train a tiny Spatial-Mamba (BatchNorm in its stem and downsampling) for 2 iterations and validate
    on 16 images, dumping every score; dist_test.sh on the saved checkpoint must give the same metric and scores.
    Without the hook the scores differ (by about 4e-4 here): each rank validated with its own BatchNorm statistics
    while the checkpoint held rank 0's."""
    from vssm.engine.launch import load_config
    data = make_demo_data(tmp_path / 'data')
    cfg = load_config(config('classification'), demo=True)
    cfg.model.backbone.arch = dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1])
    cfg.model.head.in_channels = 64
    for loader in (cfg.train_dataloader, cfg.val_dataloader):
        loader.update(num_workers=0, persistent_workers=False)
        loader.dataset.data_root = str(data / 'imagenet')
    cfg.val_dataloader.dataset.indices = 16
    cfg.merge_from_dict({'train_cfg.max_iters': 2, 'train_cfg.val_interval': 2,
                         'default_hooks.checkpoint.interval': 2})
    cfg.test_dataloader = cfg.val_dataloader
    cfg.val_evaluator = [dict(type='Accuracy', topk=(1, )),
                         dict(type='DumpResults', out_file_path=str(tmp_path / 'val.pkl'))]
    cfg.dump(str(tmp_path / 'tiny.py'))

    train = run([REPO_ROOT / 'tools/dist_train.sh', tmp_path / 'tiny.py', 2, '--work-dir', 'wd'],
                tmp_path / 'train.log', cwd=tmp_path)
    validated = float(train.stdout.split('Iter(val) [8/8]')[-1].split('accuracy/top1:')[1].split()[0])
    test = run([REPO_ROOT / 'tools/dist_test.sh', tmp_path / 'tiny.py', 'wd/iter_2.pth', 2, '--work-dir', 'wd', '--out',
                'test.pkl'], tmp_path / 'test.log', cwd=tmp_path)
    assert f'"accuracy/top1": {validated}' in test.stdout
    during = pickle.loads((tmp_path / 'val.pkl').read_bytes())
    after = pickle.loads((tmp_path / 'test.pkl').read_bytes())
    assert [d['img_path'] for d in during] == [a['img_path'] for a in after] and len(after) == 16
    for d, a in zip(during, after):
        torch.testing.assert_close(d['pred_score'], a['pred_score'], rtol=0, atol=1e-6)
