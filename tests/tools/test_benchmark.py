"""tools/analysis_tools/benchmark.py on a CPU with tiny settings (the numbers mean nothing here; the plumbing does)."""
import json
from types import ModuleType

import pytest
import torch
from conftest import load_tool
from torch import nn

from vssm.analysis.timing import call_site, call_sites, profile_top_ops

TINY = ['--batch', '2', '--size', '64', '--warmup', '1', '--iters', '1', '--torch-warmup', '1', '--torch-iters', '1',
        '--device', 'cpu']
TINY_VMAMBA = dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], ssm_ratio=1.0)


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


META = dict(device='GPU', torch='2', cuda='13', tf32=True, cudnn_benchmark=False, date='today', batch=8, size=224,
            warmup=1, iters=2, torch_batch=4, torch_warmup=0, torch_iters=1, det_size=[1333, 800], seg_size=512,
            command='python x')


def _row(benchmark, model, backend, mode, images_per_s, peak_gib=None, status='ok'):
    spec = benchmark.MODEL_SPECS[model]
    row = dict(model=model, title=spec.title, backend=backend, mode=mode, dtype=mode.rsplit('-', 1)[1], batch=8,
               images_per_s=images_per_s, ms_per_image=None if images_per_s is None else 1e3 / images_per_s,
               peak_mem_gib=peak_gib, status=status, note='' if status == 'ok' else 'why')
    return row


def _tables(markdown: str) -> dict:
    """(section title, model title, backend) -> {column header: cell} of every Markdown table."""
    cells, title, header = {}, None, None
    for line in markdown.splitlines():
        if line.startswith('### '):
            title = line[4:]
        elif line.startswith('| model |'):
            header = [c.strip() for c in line.strip('|').split('|')]
        elif line.startswith('| ') and header:
            row = dict(zip(header, (c.strip() for c in line.strip('|').split('|'))))
            cells[title, row['model'], row['backend']] = row
    return cells


def test_markdown_ratios(benchmark):
    rows = [_row(benchmark, 'vmamba-t', 'torch', 'train-bf16', 100.0, 4.0),
            _row(benchmark, 'vmamba-t', 'cuda', 'train-bf16', 300.0, 2.0),
            _row(benchmark, 'swin-t', '-', 'train-bf16', 150.0, 1.0),
            _row(benchmark, 'convnext-t', '-', 'train-bf16', None, status='error')]
    text = benchmark.markdown(META, rows)
    assert 'TF32 on' in text and 'batch 4, 0 + 1 iterations' in text
    tables = _tables(text)
    title = 'Training step (forward + backward + AdamW), bf16 autocast'
    kernels, reference = tables[title, 'VMamba-T', 'cuda'], tables[title, 'VMamba-T', 'torch']
    assert float(kernels['images/s vs Swin-T'].rstrip('x')) == pytest.approx(2.0)
    assert float(kernels['memory vs Swin-T'].rstrip('x')) == pytest.approx(2.0)
    assert float(kernels['kernel vs torch'].rstrip('x')) == pytest.approx(3.0)
    assert float(reference['images/s vs Swin-T'].rstrip('x')) == pytest.approx(100 / 150, abs=0.01)
    assert 'error' in tables[title, 'ConvNeXt-T', '-']['note']


def test_markdown_ratios_to_the_swin_of_each_size(benchmark):
    rows = [_row(benchmark, 'swin-t', '-', 'infer-fp32', 400.0, 1.0),
            _row(benchmark, 'swin-s', '-', 'infer-fp32', 200.0, 2.0),
            _row(benchmark, 'vmamba-t', 'cuda', 'infer-fp32', 300.0, 1.5),
            _row(benchmark, 'vmamba-s', 'cuda', 'infer-fp32', 300.0, 1.0),
            _row(benchmark, 'vmamba-b', 'cuda', 'infer-fp32', 100.0, 1.0)]
    table = {model: row for (_, model, _), row in _tables(benchmark.markdown(META, rows)).items()}
    column = 'images/s vs Swin of its size'
    assert table['VMamba-T'][column] == '0.75x' and table['VMamba-S'][column] == '1.50x'
    assert table['VMamba-S']['memory vs Swin of its size'] == '0.50x'
    assert table['VMamba-B'][column] == '-' and table['Swin-S'][column] == '1.00x'  # Swin-B not measured

def test_saved_and_order_tables(benchmark):
    saved = [dict(_row(benchmark, name, backend, 'saved-bf16', None), saved_gib=gib, end_of_forward_gib=gib + 1,
                  saved_top={'SS2D': gib / 2}) for name, backend, gib in (('vmamba-t', 'cuda', 3.0),
                                                                           ('swin-t', '-', 2.0))]
    order = [dict(_row(benchmark, 'spectral-vmamba-t', 'cuda', 'order-fp32', 50.0), size='512x512', forward_ms=20.0,
                  order_ms=2.5, order_share=0.125, tokens=1024)]
    tables = _tables(benchmark.markdown(META, saved + order))
    row = tables['Saved for backward by a training forward, bf16 autocast', 'VMamba-T', 'cuda']
    assert float(row['saved vs Swin-T'].rstrip('x')) == pytest.approx(1.5)
    assert 'SS2D' in row['largest module types (GiB)']
    row = tables['Spectral ordering inside the backbone forward, fp32', 'Spectral VMamba-T', 'cuda']
    assert float(row['ordering share'].rstrip('%')) == pytest.approx(12.5)
    line = benchmark.format_row(dict(order[0], seconds=1.0, params_m=1.0, warmup=1, iters=2))
    assert 'ordering 2.50 ms' in line and '12.5%' in line


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
    assert 'error: out of memory' in (tmp_path / 'rows.md').read_text()


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
    assert 'batch 2 at 64x64' in text
    assert 'recomputation on' in text and data['meta']['recompute'] is True


def test_no_recompute_turns_the_recomputations_off_and_says_so(benchmark, tmp_path, monkeypatch):
    from vssm.models.layers import recompute
    from vssm.ops import _backend
    monkeypatch.setattr(_backend, '_RECOMPUTE', True)  # restored after the test
    json_path = tmp_path / 'bench.json'
    benchmark.main(['--models', 'swin-t', '--modes', 'infer-fp32', '--no-recompute', '--json', str(json_path)] + TINY)
    assert json.loads(json_path.read_text())['meta']['recompute'] is False
    assert not recompute.recompute_enabled()


@pytest.mark.slow
def test_det_and_seg_latency_through_predict(benchmark, tmp_path):
    """Mask R-CNN and UPerNet VMamba-T through data_preprocessor + predict (6 s on 2 idle cores, 40 s on busy ones)."""
    rows = benchmark.main(['--latency-models', 'vmamba-t', '--modes', 'seg-latency', 'det-latency', '--backends',
                           'torch', '--seg-size', '64', '--det-size', '64', '64', '--inference-graphs', '--markdown',
                           str(tmp_path / 'bench.md')] + TINY + ['--torch-warmup', '0'])
    # --inference-graphs: the same model with its backbone's graphs on (eager on a CPU), rows of their own
    assert [(r['mode'], r['backend'], r['dtype']) for r in rows] == [
        (m, b, d) for m in ('seg-latency', 'det-latency') for b in ('torch', 'torch+graphs') for d in ('fp32', 'bf16')]
    for row in rows:
        assert row['status'] == 'ok' and row['batch'] == 1 and row['ms_per_image'] > 0, row
    assert 'UPerNet latency, bf16' in (tmp_path / 'bench.md').read_text()


def _tiny_classifier(backend: str = 'torch') -> nn.Module:
    from vssm.analysis.models import build_model
    return build_model(dict(type='ImageClassifier', backbone=dict(type='VMamba', arch=TINY_VMAMBA, ops_backend=backend),
                            neck=dict(type='GlobalAveragePooling'),
                            head=dict(type='LinearClsHead', num_classes=10, in_channels=64)))


def test_saved_mode_rows(benchmark, monkeypatch, tmp_path):
    monkeypatch.setattr(benchmark, 'build_classifier', lambda spec, backend, size: _tiny_classifier(backend))
    rows = benchmark.main(['--models', 'vmamba-t', '--modes', 'saved-bf16', 'saved-fp32', '--backends', 'torch',
                           '--markdown', str(tmp_path / 'rows.md')] + TINY)
    assert [(r['mode'], r['status']) for r in rows] == [('saved-bf16', 'ok'), ('saved-fp32', 'ok')]
    for row in rows:
        assert 0 < row['saved_gib'] < row['end_of_forward_gib'] and 'SS2D' in row['saved_top']
        assert row['images_per_s'] is None and (row['warmup'], row['iters']) == (0, 1)
    assert 'Saved for backward by a training forward, fp32' in (tmp_path / 'rows.md').read_text()


def _tiny_spectral_backbone() -> nn.Module:
    from vssm.models import SpectralVMamba
    torch.manual_seed(0)
    return SpectralVMamba(dict(dims=[256, 32, 64, 128], depths=[1, 1, 1, 1]), out_indices=(0, 1, 2, 3),
                          rfn_pretrained=None).eval()


def test_order_mode_times_the_orders_the_forward_uses(benchmark):
    backbone = _tiny_spectral_backbone()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = backbone.forward_with_orders(images)[1]
        orders = benchmark.spectral_ordering(backbone, backbone.rfn(images))
    assert len(orders) == len(expected) == 4
    for order, reference in zip(orders, expected):
        assert torch.equal(order, reference)
    cost = benchmark.ordering_cost(backbone, 'fp32', 2, 64, 64, warmup=0, iters=1, device=torch.device('cpu'))
    assert 0 < cost['order_ms'] and 0 < cost['order_share'] == pytest.approx(cost['order_ms'] / cost['forward_ms'])
    assert cost['tokens'] == 16  # 64 / 16 squared at stage 0


def test_order_mode_rows(benchmark, monkeypatch):
    monkeypatch.setattr(benchmark, 'build_ordered_backbone', lambda spec, backend: _tiny_spectral_backbone())
    rows = benchmark.main(['--models', 'vmamba-t', 'spectral-vmamba-t', '--modes', 'order-fp32', '--backends',
                           'torch', '--order-size', '32', '48', '--order-batches', '1', '2'] + TINY)
    assert [(r['model'], r['batch'], r['size'], r['status']) for r in rows] == [
        ('spectral-vmamba-t', 1, '48x32', 'ok'), ('spectral-vmamba-t', 2, '48x32', 'ok')]
    assert all(0 < r['order_share'] and r['forward_ms'] > 0 for r in rows)


@pytest.mark.parametrize('argv, message', [
    (['--models', 'vmamba-t', '--modes', 'order-bf16'], 'add e.g. spectral-vmamba-t'),
    (['--models', 'spectral-vmamba-t', '--modes', 'order-fp32', '--order-size', '500', '512'], 'multiples of 16'),
])
def test_order_mode_options_are_checked(benchmark, capsys, argv, message):
    with pytest.raises(SystemExit):
        benchmark.parse_args(argv)
    assert message in capsys.readouterr().err


def test_profile_lists_the_top_operators():
    """--profile: the top operators of a step with their time per step, share and calls per step."""
    layer = nn.Linear(64, 64)
    x = torch.randn(32, 64)
    ops = profile_top_ops(lambda: layer(x).relu().sum(), iters=2, device=torch.device('cpu'), top=3)
    assert 1 <= len(ops) <= 3 and all(op['ms'] >= 0 and 0 <= op['share'] <= 1 for op in ops)
    assert any('addmm' in op['name'] or 'linear' in op['name'] for op in ops)
    assert ops == sorted(ops, key=lambda op: op['ms'], reverse=True)


def test_profile_names_where_in_the_repository_an_operator_is_called_from():
    """Each profiled operator's call sites: the nearest function of vssm/ or tools/ above it, with counts."""
    from vssm.ops import gather_tokens
    x, index = torch.randn(2, 3, 16), torch.stack([torch.randperm(16) for _ in range(2)])[None]
    ops = profile_top_ops(lambda: gather_tokens(x, index).sum(), iters=2, device=torch.device('cpu'), top=50)
    gather = next(op for op in ops if op['name'] == 'aten::gather')
    assert gather['where'].startswith('vssm/ops/token_maps.py(') and gather['where'].endswith(': _gather x2')


def _tiny_task_model(spec, task: str, backend: str = 'torch') -> nn.Module:
    """Mask R-CNN or UPerNet of a VMamba config with a tiny arch (and the neck/heads narrowed to it)."""
    from vssm.analysis.models import build_model, prepare_config
    cfg = prepare_config(spec.config(task))
    cfg.model.backbone.update(arch=TINY_VMAMBA, ops_backend=backend)
    if task == 'det':
        cfg.model.neck.in_channels = [8, 16, 32, 64]
    else:
        cfg.model.decode_head.update(in_channels=[8, 16, 32, 64], channels=16)
        cfg.model.auxiliary_head.update(in_channels=32, channels=16)
    return build_model(cfg)


@pytest.mark.slow
def test_task_training_modes_run_train_step(benchmark, monkeypatch, tmp_path):
    """det-train-fp16 / seg-train-bf16: model.train_step with the configs' optimizer wrapper on random images and
    ground truth (a tiny VMamba in the full Mask R-CNN and UPerNet, whose heads keep the step at ~10 s on a CPU; on a
    CPU fp16 runs as fp32)."""
    monkeypatch.setattr(benchmark, 'build_spec_model', _tiny_task_model)
    rows = benchmark.main(['--latency-models', 'vmamba-t', '--modes', 'det-train-fp16', 'seg-train-bf16',
                           '--backends', 'torch', '--det-size', '96', '64', '--seg-size', '64',
                           '--det-train-batch', '1', '--seg-train-batch', '2', '--markdown', str(tmp_path / 'rows.md')]
                          + TINY)
    assert [(r['mode'], r['dtype'], r['batch'], r['status']) for r in rows] == [
        ('det-train-fp16', 'fp16', 1, 'ok'), ('seg-train-bf16', 'bf16', 2, 'ok')], rows
    assert all(r['images_per_s'] > 0 for r in rows)
    text = (tmp_path / 'rows.md').read_text()
    assert 'Mask R-CNN training step, fp16' in text and 'UPerNet training step, bf16' in text


def test_inference_graphs_leave_the_peers_eager(benchmark, monkeypatch):
    """--inference-graphs adds graph rows for our models only; a peer (no such switch on its backbone) keeps its
    eager latency rows."""
    def build(spec, task, backend):
        model = nn.Module()
        model.backbone = nn.Identity()  # like mmdet's SwinTransformer: no inference_graphs attribute
        return model

    monkeypatch.setattr(benchmark, 'build_task_model', build)
    monkeypatch.setattr(benchmark, 'task_latency', lambda *args: (2.0, None))
    rows = benchmark.main(['--latency-models', 'swin-t', '--modes', 'seg-latency', '--inference-graphs'] + TINY)
    assert [(r['backend'], r['dtype'], r['status']) for r in rows] == [('-', 'fp32', 'ok'), ('-', 'bf16', 'ok')]
    assert all(r['ms_per_image'] == 2.0 for r in rows)


def test_call_sites_of_gpu_kernels_come_from_the_operators_that_launch_them():
    """On a GPU the kernels hang off the CPU operators that launched them (torch.profiler's ``kernels``); each
    kernel's call sites are those operators' (stand-in events here)."""
    from types import SimpleNamespace as Event

    def op(name, parent, kernels=()):
        return Event(name=name, cpu_parent=parent, kernels=[Event(name=k) for k in kernels])

    site = op('vssm/ops/token_maps.py(56): _gather', op('tools/x.py(3): main', None))
    events = [op('aten::copy_', op('<built-in method to>', site), ['copy_kernel']),
              op('aten::copy_', op('<built-in method to>', site), ['copy_kernel']),
              op('aten::add', None, ['add_kernel', 'copy_kernel'])]
    assert call_sites(events, ['copy_kernel', 'add_kernel'], gpu=True) == {
        'copy_kernel': 'vssm/ops/token_maps.py(56): _gather x2, ? x1', 'add_kernel': '? x1'}


def test_call_sites_of_kernels_launched_outside_the_operator_tree():
    """Where the profiler hangs a kernel off a CUDA runtime launch with no parent operator, its call site is the
    innermost repository frame (not the harness's) enclosing the launch on the same thread; '?' on another thread
    (autograd's backward) or outside every frame."""
    from types import SimpleNamespace as Event

    def event(name, start, end, thread=1, kernels=()):
        return Event(name=name, cpu_parent=None, time_range=Event(start=start, end=end), thread=thread,
                     kernels=[Event(name=k) for k in kernels])

    events = [
        event('tools/analysis_tools/block_profile.py(260): step', 0, 100),
        event('vssm/analysis/timing.py(153): profile_top_ops', 1, 99),
        event('vssm/models/vmamba.py(120): forward', 10, 50),
        event('vssm/ops/token_maps.py(56): _gather', 12, 20),
        event('cudaLaunchKernel', 13, 14, kernels=['gather_kernel']),
        event('cudaLaunchKernel', 30, 31, kernels=['gemm_kernel']),   # in forward, after _gather ended
        event('cudaLaunchKernel', 60, 61, kernels=['gemm_kernel']),   # only the harness and the tool enclose it
        event('cudaLaunchKernel', 30, 31, thread=2, kernels=['gemm_kernel']),  # the backward's thread
        event('cudaLaunchKernel', 200, 201, kernels=['gather_kernel']),  # after every frame
    ]
    assert call_sites(events, ['gather_kernel', 'gemm_kernel'], gpu=True) == {
        'gather_kernel': 'vssm/ops/token_maps.py(56): _gather x1, ? x1',
        'gemm_kernel': 'vssm/models/vmamba.py(120): forward x1, tools/analysis_tools/block_profile.py(260): step x1'}
    assert call_sites(events, ['gemm_kernel'], gpu=True, top=3)['gemm_kernel'].endswith('? x1')


def test_call_sites_from_recorded_python_stacks():
    """Where the profiler records a Python stack with an operator (``stack``, innermost frame first) instead of
    Python-function events, the innermost repository frame of it (not the harness's) is the call site."""
    from types import SimpleNamespace as Event
    root = Event(name='aten::linear', cpu_parent=None, stack=[
        'vssm/analysis/timing.py(153): profile_top_ops', 'torch/nn/modules/module.py(1750): _call_impl',
        'vssm/models/vmamba.py(120): forward', 'tools/analysis_tools/block_profile.py(260): step'])
    op = Event(name='aten::mm', cpu_parent=root, stack=[], kernels=[Event(name='gemm_kernel')])
    assert call_site(op) == 'vssm/models/vmamba.py(120): forward'
    sites = call_sites([root, op], ['gemm_kernel'], gpu=True)
    assert sites == {'gemm_kernel': 'vssm/models/vmamba.py(120): forward x1'}


def test_call_sites_skip_the_measuring_harness():
    """An operator run from vssm/analysis/ (the profiler's own loop, e.g. a backward started there) is attributed to
    the nearest frame outside it, or to none."""
    from types import SimpleNamespace as Event
    harness = Event(name='vssm/analysis/timing.py(153): profile_top_ops', cpu_parent=None)
    assert call_site(Event(name='aten::mm', cpu_parent=harness)) == ''
    tool = Event(name='tools/analysis_tools/block_profile.py(260): step', cpu_parent=None)
    inner = Event(name='vssm/analysis/timing.py(153): profile_top_ops', cpu_parent=tool)
    assert call_site(Event(name='aten::mm', cpu_parent=inner)) == 'tools/analysis_tools/block_profile.py(260): step'
