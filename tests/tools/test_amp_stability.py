"""tools/benchmarks/amp_stability.py: the synthetic batches, the scan dtype probe, the skipped-step accounting and the
verdicts on a CPU, and (slow) a whole bf16 run of VMamba-T's Mask R-CNN and UPerNet at tiny sizes for 2 iterations."""
import importlib
import json
import math
import subprocess
import sys
from types import ModuleType

import pytest
import torch
from conftest import REPO_ROOT, load_tool


@pytest.fixture(scope='module')
def tool() -> ModuleType:
    import vssm  # noqa: F401  (registers the backbones before mmdet/mmseg are imported)
    return load_tool('tools/benchmarks/amp_stability.py')


def test_every_config_exists(tool):
    for spec in tool.SPECS.values():
        for task in tool.TASKS:
            assert (REPO_ROOT / spec.config(task)).is_file(), (spec.name, task)


@pytest.mark.skipif(torch.cuda.is_available(), reason='the refusal is for machines without CUDA')
def test_fp16_is_refused_on_a_cpu(tool, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(['--dtypes', 'fp16', '--device', 'cpu'])
    assert 'fp16 needs CUDA' in capsys.readouterr().err


def test_det_batch_is_what_the_pipeline_gives(tool):
    from mmdet.structures.bbox import HorizontalBoxes
    from mmdet.structures.mask import BitmapMasks
    data = tool.det_batch(2, 96, 64, 80, seed=3, device=torch.device('cpu'))
    assert len(data['inputs']) == len(data['data_samples']) == 2
    for image, sample in zip(data['inputs'], data['data_samples']):
        assert image.dtype == torch.uint8 and image.shape == (3, 64, 96)
        assert sample.img_shape == (64, 96)
        gt = sample.gt_instances
        assert isinstance(gt.bboxes, HorizontalBoxes) and isinstance(gt.masks, BitmapMasks)
        boxes, masks = gt.bboxes.tensor, torch.from_numpy(gt.masks.masks).bool()
        assert len(boxes) == len(gt.labels) == len(masks) >= 1
        assert ((gt.labels >= 0) & (gt.labels < 80)).all()
        for box, mask in zip(boxes, masks):  # each box is its (visible) mask's extent
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    again = tool.det_batch(2, 96, 64, 80, seed=3, device=torch.device('cpu'))
    assert torch.equal(again['inputs'][1], data['inputs'][1])  # the same seed gives the same batch


def test_seg_batch_is_what_the_pipeline_gives(tool):
    data = tool.seg_batch(2, 48, 150, 255, seed=1, device=torch.device('cpu'))
    for image, sample in zip(data['inputs'], data['data_samples']):
        assert image.dtype == torch.uint8 and image.shape == (3, 48, 48)
        seg = sample.gt_sem_seg.data
        assert seg.shape == (1, 48, 48) and seg.dtype == torch.long
        values = seg.unique()
        assert (((values >= 0) & (values < 150)) | (values == 255)).all() and len(values[values < 150]) >= 2


def _scan_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    b, d, n, length = 1, 4, 3, 5
    u = torch.randn(b, d, length, generator=g).to(dtype).requires_grad_()
    delta = torch.randn(b, d, length, generator=g).to(dtype)
    A = -torch.rand(d, n, generator=g)
    B = torch.randn(b, 1, n, length, generator=g).to(dtype)
    C = torch.randn(b, 1, n, length, generator=g).to(dtype)
    return u, delta, A, B, C, torch.ones(d), torch.zeros(d)


def test_scan_probe_reports_the_dtypes_and_flags_a_half_precision_state_matrix(tool):
    vmamba = importlib.import_module('vssm.models.vmamba')
    original = vmamba.selective_scan
    with tool.ScanProbe('cpu') as probe:
        u, delta, A, B, C, D, bias = _scan_inputs(torch.bfloat16)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = vmamba.selective_scan(u, delta, A, B, C, D, bias, delta_softplus=True, backend='torch')
        out.sum().backward()
        report = probe.report()
        assert report['fp32_ok'], report
        (key, count), = report['calls'].items()
        assert count == 1 and key.startswith('torch autocast=on u=bfloat16') and 'A=float32' in key
        assert key.endswith('-> out=float32')
        assert set(report['state_recurrences']) == {'a=float32 b=float32'}  # forward and backward recurrences
        assert report['output_grads'] == {'float32': 1}
        vmamba.selective_scan(u, delta, A.bfloat16(), B, C, D, bias, backend='torch')  # A must stay float32
        assert not probe.report()['fp32_ok'] and probe.report()['violations'] == {'A is bfloat16': 1}
    assert vmamba.selective_scan is original


def test_step_probe_counts_the_steps_the_scaler_skips(tool):
    from mmengine.optim import AmpOptimWrapper
    param = torch.nn.Parameter(torch.ones(3))
    with tool._amp_on_cpu(torch.device('cpu')):
        ow = AmpOptimWrapper(optimizer=torch.optim.SGD([param], lr=0.1), dtype='bfloat16')
    ow.loss_scaler = torch.amp.GradScaler('cpu', init_scale=2.0**16)  # a working scaler, as on a GPU
    probe = tool.StepProbe(ow)
    probe.begin()
    ow.update_params((param * 1e36).sum())  # 1e36 * 2**16 overflows float32: the scaler skips and halves the scale
    assert not probe.stepped and not probe.grad_finite and probe.scale == 2.0**16
    assert torch.equal(param.detach(), torch.ones(3))
    probe.begin()
    ow.update_params((param * 2).sum())
    assert probe.stepped and probe.grad_finite and probe.scale == 2.0**15
    assert probe.grad_norm == pytest.approx(2 * math.sqrt(3))  # unscaled
    assert torch.allclose(param.detach(), torch.full((3, ), 0.8))


def _row(**kw):
    row = dict(status='ok', iters_done=500, nonfinite_losses=0, skipped_steps=0, scan=dict(fp32_ok=True, violations={}))
    row.update(kw)
    return row


def test_verdicts(tool):
    args = tool.parse_args(['--device', 'cpu', '--dtypes', 'bf16'])
    assert tool._verdict(_row(), args) == (False, [])
    assert tool._verdict(_row(skipped_steps=5), args) == (False, [])  # a few skips at the start are normal
    assert tool._verdict(_row(skipped_steps=26), args)[0]  # > 5% of 500
    assert tool._verdict(_row(nonfinite_losses=1), args) == (True, ['1 non-finite losses'])
    assert tool._verdict(_row(status='error'), args)[0]
    assert tool._verdict(_row(scan=dict(fp32_ok=False, violations={'output is bfloat16': 2})), args)[0]
    assert not tool._verdict(_row(status='time-limit', iters_done=100), args)[0]
    assert tool._longest_run([0, 1, 2, 7, 9, 10]) == 3 and tool._longest_run([]) == 0


@pytest.mark.slow
def test_vmamba_t_trains_in_bf16_on_a_cpu(tmp_path):
    """Both tasks, bf16, tiny sizes, 2 iterations: finite losses, the runs complete, the scan report says float32."""
    out = tmp_path / 'amp.json'
    command = [sys.executable, 'tools/benchmarks/amp_stability.py', '--models', 'vmamba-t', '--tasks', 'seg', 'det',
               '--dtypes', 'bf16', '--iters', '2', '--det-size', '128', '128', '--seg-size', '64', '--device', 'cpu',
               '--json', str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report['summary'] == dict(runs=2, failed=0, incomplete=0)
    assert [(r['task'], r['dtype']) for r in report['runs']] == [('seg', 'bf16'), ('det', 'bf16')]
    for run in report['runs']:
        assert run['status'] == 'ok' and run['iters_done'] == 2 and not run['failed'], run
        assert len(run['losses']) == 2 and all(math.isfinite(x) for x in run['losses'])
        assert run['nonfinite_losses'] == 0 and run['skipped_steps'] == 0 and run['grad_nonfinite_steps'] == 0
        assert all(math.isfinite(x) and x > 0 for x in run['grad_norm'])
        assert math.isfinite(run['max_loss']) and math.isfinite(run['final_loss'])
        assert {'loss', 'loss_cls' if run['task'] == 'det' else 'decode.loss_ce'} <= set(run['last_terms'])
        scan = run['scan']
        assert scan['fp32_ok'] and not scan['violations']
        assert scan['calls'] and all('autocast=on' in k and 'u=bfloat16' in k and 'A=float32' in k and
                                     'D=float32' in k and 'delta_bias=float32' in k and k.endswith('out=float32')
                                     for k in scan['calls'])
        assert set(scan['state_recurrences']) == {'a=float32 b=float32'} and set(scan['output_grads']) == {'float32'}
    assert report['runs'][1]['autocast'] == 'features'  # bf16 Mask R-CNN: heads in fp32 (mmcv has no bf16 RoIAlign)
    assert 'scan call:' in result.stdout and 'FAIL' not in result.stdout
