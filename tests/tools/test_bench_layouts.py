"""tools/benchmarks/bench_layouts.py on a CPU with tiny shapes: every variant of every piece runs, and computes the
same function as the piece's first variant (the claim the layout choices in the models rest on)."""
import pytest
from conftest import load_tool


@pytest.fixture(scope='module')
def bench_layouts():
    return load_tool('tools/benchmarks/bench_layouts.py')


def test_every_variant_runs_and_matches_the_first(bench_layouts):
    rows = bench_layouts.main(['--device', 'cpu', '--batch', '2', '--hw', '6', '--iters', '1'])
    pieces = {row['piece'] for row in rows}
    assert pieces == {'cpe', 'local', 'ln2d', 'linear2d', 'x_proj', 'dt_proj', 'sm_x_proj', 'cross_scan', 'cross_merge',
                      'copy', 'stem'}
    assert {row['dtype'] for row in rows} == {'fp32', 'bf16'}
    for row in rows:
        assert 'error' not in row, row
        assert row['fwd_ms'] > 0 and row['fwd_bwd_ms'] > 0, row
        # bf16 variants may round at different points (e.g. an fp32 conv1d vs a bf16 GEMM under autocast).
        assert row['max_rel_diff'] < (1e-5 if row['dtype'] == 'fp32' else 2e-2), row
    now = [row for row in rows if row['name'].startswith('now:')]
    assert {row['piece'] for row in now} >= {'cpe', 'local', 'x_proj', 'dt_proj'}


def test_unknown_piece_is_named(bench_layouts, capsys):
    with pytest.raises(SystemExit, match='unknown'):
        bench_layouts.main(['--device', 'cpu', '--pieces', 'attention'])
