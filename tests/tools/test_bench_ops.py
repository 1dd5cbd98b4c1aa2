"""tools/analysis_tools/bench_ops.py's bandwidth fractions, tables, target verdicts and cross-scan cases (the timing
needs a GPU)."""
import pytest
import torch
from conftest import load_tool

bench_ops = load_tool('tools/analysis_tools/bench_ops.py')

COPY_BW = 4e12  # bytes/s


def _table(fusion_ms=(0.2, 1.0), three_convs_ms=(3.0, 12.0), det_fusion_ms=(0.3, 1.4), det_three_ms=(1.0, 4.0)):
    table = bench_ops.Table(COPY_BW)
    el, s = 128 * 128 * 56 * 56, 4
    # A scan whose forward moves 1e9 bytes in 0.5 ms (50% of the copy) and whose backward moves 2e9 bytes in 0.8 ms.
    table.add('scan-state', 'SM-T s1 128x128x3136', 'fp32', 'cuda kernel', 0.5, 1.3, 1e9, 2e9)
    table.add('scan-state', 'SM-T s1 128x128x3136', 'fp32', 'torch reference', 10.0, 30.0, 1e9, 2e9)
    table.add('scan-state', 'SM-T s3 128x512x196', 'fp32', 'cuda kernel', 0.5, 1.0, 1e8, 1e8)
    table.add('scan-state', 'SM-T det s1 2x128x67200', 'fp32', 'cuda kernel', 0.5, 1.0, 1e8, 1e8)
    table.add('state-fusion', 'SM-T s1 128x128x56x56', 'fp32', 'fused kernel', *fusion_ms, 2 * el * s, 3 * el * s)
    table.add('state-fusion', 'SM-T s1 128x128x56x56', 'fp32', '3x cuDNN dilated+pad', *three_convs_ms, 2 * el * s,
              3 * el * s)
    det_el = 2 * 128 * 200 * 336
    # The detection shape's call is host-bound: 1.3 ms of its 1.4 ms is the host's (>= 90%).
    table.add('state-fusion', 'SM-T det s1 2x128x200x336', 'fp32', 'fused kernel', *det_fusion_ms, 2 * det_el * s,
              3 * det_el * s, 1.3)
    table.add('state-fusion', 'SM-T det s1 2x128x200x336', 'fp32', '3x cuDNN dilated+pad', *det_three_ms,
              2 * det_el * s, 3 * det_el * s)
    table.add('dwconv11x11', '128x128x56x56', 'bf16', 'cuda kernel', 1.0, 5.0, el * 4, el * 6)
    table.add('dwconv11x11', '128x128x56x56', 'bf16', 'cuDNN F.conv2d', 3.0, 16.0, el * 4, el * 6)
    return table


def test_rows_carry_bandwidth_fractions_of_the_copy(capsys):
    row = _table().rows[0]
    assert row['fwd_frac'] == pytest.approx(0.5)  # 1e9 B / 0.5 ms = 2e12 B/s of 4e12
    assert row['bwd_frac'] == pytest.approx(2e9 / 0.8e-3 / COPY_BW)  # the backward alone: 1.3 - 0.5 ms
    assert row['fwd_bwd_frac'] == pytest.approx(3e9 / 1.3e-3 / COPY_BW)
    assert 'scan-state' in capsys.readouterr().out


def test_target_verdicts():
    verdicts = {name: (measured, status) for name, measured, status in bench_ops.target_rows(_table().rows)}
    # Only the kernel rows at stages 1/2 count for the scan (not the reference, stage 3 or the detection shape).
    assert verdicts['scan fwd >= 70% of copy, stages 1/2'] == ('state s1 fp32: 50%', 'not met')
    assert verdicts['scan bwd >= 50% of copy, stages 1/2'] == ('state s1 fp32: 62%', 'met')
    fwd_measured, fwd_status = verdicts['state fusion fwd >= 50% of copy']
    assert fwd_measured.startswith('s1 fp32: 51%') and 'det s1 fp32' in fwd_measured
    assert fwd_status == 'not met at det s1 fp32'
    assert verdicts['state fusion fwd+bwd >= 5x three cuDNN convs'] == (
        's1 fp32: 12.0x, det s1 fp32 (host-bound): 2.9x', 'not met at det s1 fp32 (host-bound)')
    assert verdicts['dense 11x11 fwd+bwd >= 3x F.conv2d'] == ('bf16: 3.2x', 'met')


def test_markdown_tables():
    rows = _table().rows
    lines = bench_ops.markdown_table(rows).splitlines()
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    assert len(lines) == 2 + len(rows)
    cells = [dict(zip(header, (c.strip() for c in line.strip('|').split('|')))) for line in lines[2:]]
    first = cells[0]
    assert (first['op'], first['implementation'], first['fwd ms'], first['fwd % copy']) == (
        'scan-state', 'cuda kernel', '0.500', '50%')
    det = next(c for c in cells if 'det s1' in c['shape'] and c['implementation'] == 'fused kernel')
    assert float(det['host ms per fwd+bwd']) == pytest.approx(1.3)
    targets = bench_ops.targets_markdown(rows).splitlines()
    assert len(targets) == 2 + len(bench_ops.target_rows(rows)) == 2 + 5


def test_cross_case_runs_the_op_on_any_device():
    """The cross-scan case (its timing needs a GPU): the op on its inputs, gradients for x and the parameters, and
    the minimal bytes (x read and a float32 output written; x, the output gradient read and dx written)."""
    case = bench_ops.cross_case(2, 8, 3, 5, 2, torch.float32, device='cpu')
    out = case.run('auto')
    assert out.shape == (2, 8, 15) and out.dtype == torch.float32
    grads = torch.autograd.grad(out.sum(), case.leaves)
    assert len(grads) == 6 and all(torch.isfinite(g).all() for g in grads)
    el = 2 * 8 * 15
    assert (case.fwd_bytes, case.bwd_bytes) == (el * 8, el * 12)


@pytest.mark.parametrize('spectral', [False, True])
def test_cross_cases_run_on_the_reference(spectral):
    """The cross-scan rows' inputs (VMamba's four directions, Spectral VMamba's eight per-image orders) on the CPU
    reference: the output map and a gradient for every leaf."""
    case = bench_ops.cross_case(2, 8, 3, 5, 2, torch.float32, device='cpu', spectral=spectral)
    assert case.leaves[1].shape[0] == (8 if spectral else 4)  # x_proj's weight: one per sequence
    out = case.run('torch')
    assert out.shape == (2, 8, 15) and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), case.leaves)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_channel_reduction_norm_matches_the_layer_norm_reference():
    """The LayerNorm2d candidate of the norm rows against vssm's reference, float64 statistics on a CPU map."""
    from vssm.ops.layer_norm import layer_norm_2d_ref
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64) * 3 + 1
    weight, bias = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    got = bench_ops.channel_reduction_norm(x, weight, bias, 1e-5, torch.float64)
    torch.testing.assert_close(got, layer_norm_2d_ref(x, weight, bias, 1e-5), rtol=1e-12, atol=1e-12)


def test_plan_covers_every_stage_of_each_op():
    """Each op's cases at the four stage maps (two with --quick), Spectral VMamba's and the detection shapes, per
    dtype; the LayerNorm2d and projection rows at VMamba-T's widths."""
    bf16, fp32 = torch.bfloat16, torch.float32
    names = {op: [args for bench, args in bench_ops.plan({op}, [bf16], 128)] for op in bench_ops.OPS}
    assert [a[-1] for a in names['norm']] == [f'VM-T s{i + 1} 128x{96 * 2**i}x{56 >> i}x{56 >> i}' for i in range(4)]
    assert [a[1] for a in names['norm']] == [96, 192, 384, 768]
    assert [a[-1] for a in names['norm-last']] == [f'SM-T s{i + 1} 128x{56 >> i}x{56 >> i}x{64 * 2**i}'
                                                   for i in range(4)]
    assert len(names['fusion']) == 4 + 1 and names['fusion'][-1][-1] == 'SM-T det s1 2x128x200x336'
    assert len(names['cross']) == 4 + 3 + 1 and sum(a[-1] is True for a in names['cross']) == 3  # Spectral rows
    assert len(names['scan']) == 2 * 4 + 1 and len(names['dwconv']) == 1
    linear = names['linear']
    assert len(linear) == 3 * 4
    assert [a[1:3] for a in linear[:3]] == [(96, 96), (96, 384), (384, 96)] and linear[2][-1] is True
    assert len(bench_ops.plan({'norm'}, [fp32, bf16], 128, quick=True)) == 2 * 2
    assert [a[-2:] for a in names['merge']][-1] == ('SV-T s1 128x8x512x14x14', True) and len(names['merge']) == 4 + 1
    both = bench_ops.plan({'norm', 'fusion'}, [bf16], 8)
    assert [bench.__name__ for bench, _ in both].count('bench_norm') == 4


@pytest.mark.parametrize('spectral', [False, True])
def test_merge_cases_run_on_the_reference(spectral):
    """The token-merge and token-gather cases on a CPU (the plain ops): the maps' shapes, the minimal bytes and the
    gradients (each op's backward the other)."""
    case = bench_ops.merge_case(2, 3, 5, 7, torch.float32, device='cpu', spectral=spectral)
    out = case.run('torch')
    k = 8 if spectral else 4
    assert out.shape == (2, 3, 35) and case.fwd_bytes == 2 * k * 3 * 35 * 4 * (1 + 1 / k)
    out.sum().backward()
    torch.testing.assert_close(case.leaves[0].grad, torch.ones(2, k, 3, 35))
    gather = bench_ops.gather_case(2, 3, 5, 7, torch.float32, device='cpu', spectral=spectral)
    out = gather.run('torch')
    assert out.shape == (2, k, 3, 35) and gather.fwd_bytes == 2 * 3 * 35 * 4 * (1 + k)
    out.sum().backward()  # every token read once per order
    torch.testing.assert_close(gather.leaves[0].grad, torch.full((2, 3, 35), float(k)))
