"""tools/benchmarks/ncu_kernels.py: reading Nsight Compute's raw CSV and assigning kernels to the profiled parts (the
profiling itself needs ncu and a GPU: tools/gpu/session.sh ncu)."""
import pytest
from conftest import load_tool

ncu = load_tool('tools/benchmarks/ncu_kernels.py')

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","dram__bytes_read.sum","dram__bytes_write.sum",'
          '"dram__throughput.avg.pct_of_peak_sustained_elapsed","gpu__time_duration.sum",'
          '"launch__block_size","launch__grid_size","launch__registers_per_thread",'
          '"sm__throughput.avg.pct_of_peak_sustained_elapsed","sm__warps_active.avg.pct_of_peak_sustained_active"')
UNITS = '"","","","","","","","","","","","byte","byte","%","nsecond","","","register/thread","%","%"'


def _row(i, name, read, write, dram_pct, ns, regs=40, sm_pct=30.0, occ=60.0):
    return (f'"{i}","123","python3","host","{name}","1","7","(256, 1, 1)","(100, 1, 1)","0","9.0",'
            f'"{read:,}","{write:,}","{dram_pct}","{ns:,}","256","100","{regs}","{sm_pct}","{occ}"')


CSV = '\n'.join([
    '==PROF== Disconnected from process 123',
    HEADER, UNITS,
    _row(0, 'spin_kernel', 0, 0, 0.1, 1000),
    _row(1, 'dw_rows_fwd_kernel', 200_000_000, 200_000_000, 44.0, 220_000),
    _row(2, 'spin_kernel', 0, 0, 0.1, 1000),
    _row(3, 'dw_rows_bwd_kernel', 450_000_000, 200_000_000, 40.0, 900_000),
    _row(4, 'dw_fold_kernel', 1_000_000, 100_000, 2.0, 100_000),
])
PARTS_LOG = 'some output\nPART fusion-s1-fp32 fwd 411041792\nPART fusion-s1-fp32 bwd 616562688\n'


def test_reads_kernel_rows_in_launch_order_and_the_plan():
    rows = ncu.read_raw_csv(CSV)
    assert [r['Kernel Name'] for r in rows] == ['spin_kernel', 'dw_rows_fwd_kernel', 'spin_kernel',
                                                'dw_rows_bwd_kernel', 'dw_fold_kernel']  # units row dropped
    assert ncu.read_parts(PARTS_LOG) == [('fusion-s1-fp32 fwd', 411041792.0), ('fusion-s1-fp32 bwd', 616562688.0)]


def test_summary_assigns_kernels_to_parts_between_markers():
    entries = ncu.summarize(ncu.read_raw_csv(CSV), ncu.read_parts(PARTS_LOG))
    assert [(e['part'], e['kernel']) for e in entries] == [('fusion-s1-fp32 fwd', 'dw_rows_fwd_kernel'),
                                                           ('fusion-s1-fp32 bwd', 'dw_rows_bwd_kernel'),
                                                           ('fusion-s1-fp32 bwd', 'dw_fold_kernel')]
    fwd, bwd, fold = entries
    assert fwd['us'] == pytest.approx(220.0) and fwd['share'] == pytest.approx(1.0)
    assert fwd['dram_mb'] == pytest.approx(400.0)  # thousands separators parsed
    assert fwd['dram_over_minimal'] == pytest.approx(400e6 / 411041792)
    assert fwd['dram_pct'] == 44.0 and fwd['registers'] == 40 and fwd['grid'] == 100 and fwd['block'] == 256
    assert bwd['share'] == pytest.approx(0.9) and fold['share'] == pytest.approx(0.1)
    table = ncu.markdown(entries).splitlines()
    assert len(table) == 2 + 3
    assert table[2].startswith('| fusion-s1-fp32 fwd | dw_rows_fwd_kernel | 220.0 | 400.0 | 0.97 | 44 | 30 | 60 |')


def test_marker_count_must_match_the_plan():
    with pytest.raises(ValueError, match='2 marker kernels in the report but 3 parts'):
        ncu.summarize(ncu.read_raw_csv(CSV), ncu.read_parts(PARTS_LOG + 'PART x fwd 1\n'))


def test_metric_list_and_cases():
    assert 'dram__bytes_read.sum' in ncu.METRICS and 'gpu__time_duration.sum' in ncu.METRICS
    assert set(ncu.CASES) >= {'fusion-s1-fp32', 'fusion-det-fp32', 'scan-state-s2-bf16'}


def test_run_prints_the_plan_of_parts(capsys):
    """The driver on the CPU (reference ops, batch 1): forward and backward of each case, a PART line for each."""
    parts = ncu.run(['fusion-s2-fp32', 'scan-output-s2-bf16', 'scan-state-s2-fp32'], device='cpu', batch=1)
    assert [p for p, _ in parts] == ['fusion-s2-fp32 fwd', 'fusion-s2-fp32 bwd', 'scan-output-s2-bf16 fwd',
                                     'scan-output-s2-bf16 bwd', 'scan-state-s2-fp32 fwd', 'scan-state-s2-fp32 bwd']
    assert parts[0][1] == 2 * 256 * 28 * 28 * 4  # the fusion forward reads and writes one fp32 map
    assert ncu.read_parts(capsys.readouterr().out) == parts
