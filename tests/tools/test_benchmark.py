"""tools/analysis_tools/benchmark.py on a CPU with tiny settings (the numbers mean nothing here; the plumbing does)."""
import json
from types import ModuleType

import pytest
import torch
from conftest import load_tool
from torch import nn

TINY = ['--batch', '2', '--size', '64', '--warmup', '1', '--iters', '1', '--torch-warmup', '1', '--torch-iters', '1',
        '--device', 'cpu']


@pytest.fixture(scope='module')
def benchmark() -> ModuleType:
    return load_tool('tools/analysis_tools/benchmark.py')


def test_help_states_the_protocol(benchmark, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    for phrase in ('--no-tf32', 'max_memory_allocated', 'AdamW', '--torch-iters', 'ops_backend=\'torch\'',
                   'data_preprocessor', 'det-latency'):
        assert phrase in text


def test_unknown_model_lists_the_valid_names(benchmark, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(['--models', 'vmamba-xl'])
    assert 'vmamba-t' in capsys.readouterr().err


def test_every_model_config_exists(benchmark):
    for spec in benchmark.SPECS.values():
        paths = [spec.detector, spec.segmentor] + ([spec.classifier] if spec.ours else [])
        for path in paths:
            assert benchmark._config_file(path).is_file(), (spec.name, path)


def test_pretrained_weights_are_cleared():
    from vssm.engine.launch import clear_pretrained
    cfg = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='x.pth'), rfn_pretrained='torchvision://r'),
               head=dict(init_cfg=[dict(type='Normal', std=0.01)]), pretrained='y.pth')
    clear_pretrained(cfg)
    assert cfg['backbone'] == dict(init_cfg=None, rfn_pretrained=None) and cfg['pretrained'] is None
    assert cfg['head']['init_cfg'] == [dict(type='Normal', std=0.01)]  # initializers stay


def _row(benchmark, model, backend, mode, images_per_s, peak_gib=None, status='ok'):
    spec = benchmark.SPECS[model]
    row = dict(model=model, title=spec.title, backend=backend, mode=mode, dtype=mode.rsplit('-', 1)[1], batch=8,
               images_per_s=images_per_s, ms_per_image=None if images_per_s is None else 1e3 / images_per_s,
               peak_mem_gib=peak_gib, status=status, note='' if status == 'ok' else 'why')
    return row


def test_markdown_ratios(benchmark):
    meta = dict(device='GPU', torch='2', cuda='13', tf32=True, cudnn_benchmark=False, date='today', batch=8, size=224,
                warmup=1, iters=2, torch_batch=4, torch_warmup=0, torch_iters=1, det_size=[1333, 800], seg_size=512,
                command='python x')
    rows = [_row(benchmark, 'vmamba-t', 'torch', 'train-bf16', 100.0, 4.0),
            _row(benchmark, 'vmamba-t', 'cuda', 'train-bf16', 300.0, 2.0),
            _row(benchmark, 'swin-t', '-', 'train-bf16', 150.0, 1.0),
            _row(benchmark, 'convnext-t', '-', 'train-bf16', None, status='error')]
    lines = benchmark.markdown(meta, rows).splitlines()
    assert '| VMamba-T | cuda | 8 | 300.0 | 3.33 | 2.00x | 2.00 | 2.00x | 3.00x |  |' in lines
    assert '| VMamba-T | torch | 8 | 100.0 | 10.00 | 0.67x | 4.00 | 4.00x | - |  |' in lines
    assert '| Swin-T | - | 8 | 150.0 | 6.67 | 1.00x | 1.00 | 1.00x | - |  |' in lines
    assert '| ConvNeXt-T | - | 8 | - | - | - | - | - | - | error: why |' in lines
    assert any('TF32 on' in line for line in lines) and any('batch 4, 0 + 1 iterations' in line for line in lines)


class _StandIn(nn.Module):
    """A classifier stand-in; ``fail`` raises from the forward."""

    def __init__(self, fail: bool) -> None:
        super().__init__()
        self.fail = fail
        self.head = nn.Linear(3, 10)
        self.head.num_classes = 10

    def forward(self, x, mode):
        if self.fail:
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 1 TiB')
        return self.head(x.mean((2, 3)))


def test_a_failing_model_is_recorded_and_the_run_goes_on(benchmark, monkeypatch, tmp_path):
    monkeypatch.setattr(benchmark, 'build_classifier', lambda spec, backend, size: _StandIn(spec.name == 'vmamba-t'))
    rows = benchmark.main(['--models', 'vmamba-t', 'swin-t', '--modes', 'infer-fp32', 'train-bf16',
                           '--backends', 'torch', '--json', str(tmp_path / 'rows.json'), '--markdown',
                           str(tmp_path / 'rows.md')] + TINY)
    by_model = {(r['model'], r['mode']): r for r in rows}
    assert by_model['vmamba-t', 'infer-fp32']['status'] == 'error'
    assert by_model['vmamba-t', 'train-bf16']['note'] == 'out of memory'
    assert all(by_model['swin-t', mode]['images_per_s'] > 0 for mode in ('infer-fp32', 'train-bf16'))
    assert len(json.loads((tmp_path / 'rows.json').read_text())['rows']) == 4
    table = (tmp_path / 'rows.md').read_text()
    assert '| VMamba-T | torch | 2 | - | - | - | - | - | - | error: out of memory |' in table


@pytest.mark.slow
def test_vmamba_and_swin_rows_json_and_markdown(benchmark, tmp_path):
    """The real VMamba-T and Swin-T classifiers (4 s on 2 idle cores, up to a minute on busy ones)."""
    json_path, md_path = tmp_path / 'bench.json', tmp_path / 'bench.md'
    benchmark.main(['--models', 'vmamba-t', 'swin-t', '--modes', 'infer-fp32', 'train-bf16', '--json', str(json_path),
                    '--markdown', str(md_path)] + TINY)
    data = json.loads(json_path.read_text())
    assert data['meta']['tf32'] is True and data['meta']['batch'] == 2
    rows = {(r['model'], r['backend'], r['mode']): r for r in data['rows']}
    assert set(rows) == {(m, b, mode) for m, b in (('vmamba-t', 'torch'), ('vmamba-t', 'cuda'), ('swin-t', '-'))
                         for mode in ('infer-fp32', 'train-bf16')}
    for key in [k for k in rows if k[1] != 'cuda']:
        assert rows[key]['status'] == 'ok' and rows[key]['images_per_s'] > 0, rows[key]
    for mode in ('infer-fp32', 'train-bf16'):  # no kernels on a CPU: skipped, with the reason
        assert rows['vmamba-t', 'cuda', mode]['status'] == 'skipped'
        assert 'CUDA device' in rows['vmamba-t', 'cuda', mode]['note']
    assert "PyTorch reference" in rows['vmamba-t', 'torch', 'infer-fp32']['ops']
    text = md_path.read_text()
    assert 'images/s vs Swin-T' in text and 'memory vs Swin-T' in text and 'kernel vs torch' in text
    assert '| Swin-T | - | 2 |' in text and '1.00x' in text and 'batch 2 at 64x64' in text
    assert 'recomputation on' in text and data['meta']['recompute'] is True


def test_no_recompute_turns_the_recomputations_off_and_says_so(benchmark, tmp_path, monkeypatch):
    from vssm.models.layers import recompute
    monkeypatch.setattr(recompute, '_ENABLED', True)  # restored after the test
    json_path = tmp_path / 'bench.json'
    benchmark.main(['--models', 'swin-t', '--modes', 'infer-fp32', '--no-recompute', '--json', str(json_path)] + TINY)
    assert json.loads(json_path.read_text())['meta']['recompute'] is False
    assert not recompute.recompute_enabled()


@pytest.mark.slow
def test_det_and_seg_latency_through_predict(benchmark, tmp_path):
    """Mask R-CNN and UPerNet VMamba-T through data_preprocessor + predict (6 s on 2 idle cores, 40 s on busy ones)."""
    rows = benchmark.main(['--latency-models', 'vmamba-t', '--modes', 'seg-latency', 'det-latency', '--backends',
                           'torch', '--seg-size', '64', '--det-size', '64', '64', '--markdown',
                           str(tmp_path / 'bench.md')] + TINY + ['--torch-warmup', '0'])
    assert [(r['mode'], r['dtype']) for r in rows] == [(m, d) for m in ('seg-latency', 'det-latency')
                                                       for d in ('fp32', 'bf16')]
    for row in rows:
        assert row['status'] == 'ok' and row['batch'] == 1 and row['ms_per_image'] > 0, row
    assert 'UPerNet latency, bf16' in (tmp_path / 'bench.md').read_text()


def test_profile_lists_the_top_operators(benchmark):
    """--profile: the top operators of a step with their time per step, share and calls per step."""
    layer = nn.Linear(64, 64)
    x = torch.randn(32, 64)
    ops = benchmark.profile_top_ops(lambda: layer(x).relu().sum(), iters=2, device=torch.device('cpu'), top=3)
    assert 1 <= len(ops) <= 3 and all(op['ms'] >= 0 and 0 <= op['share'] <= 1 for op in ops)
    assert any('addmm' in op['name'] or 'linear' in op['name'] for op in ops)
    assert ops == sorted(ops, key=lambda op: op['ms'], reverse=True)
