"""Property-based tests (hypothesis) of the pure-PyTorch ops against naive loops over random cases.

The cases come from ``tests/ops/fuzz.py`` (CPU bounds): shapes, every flag combination, float64/32/16 and
bfloat16, and contiguous, transposed, sliced (NaN in the gaps), stride-0 and channels-last inputs. Each test
compares the op's output and the gradient of every input with a naive float64 loop on the same (rounded) values.
``derandomize=True`` makes every run draw the same examples (for a given hypothesis version) and ``database=None``
keeps a run from replaying the failures of earlier ones. Also here: the fuzz module's own layouts and parameter
space, and the kernel-vs-reference harness of ``tests/ops/test_fuzz_kernels_cuda.py`` on the CPU (a stand-in
kernel that matches, and one that does not).
"""
import dataclasses
import itertools
from functools import partial
from typing import Dict, Optional, Sequence, Tuple, TypeVar, Union

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ops import fuzz
from ops.naive import naive_dwconv, naive_scan, naive_state_fusion

T = TypeVar('T')
Tensors = Dict[str, torch.Tensor]
DTYPE_NAMES = ['float64', 'float32', 'float16', 'bfloat16']
LAYOUT_MODES = ['contiguous', 'strided']  # every input contiguous / every input in a drawn non-contiguous layout
# Examples per dtype and layout mode: the quick suite's, and 5x as many under ``slow``.
EXAMPLES = dict(scan=40, dwconv=30, fusion=20)
BUDGETS = ['quick', pytest.param('thorough', marks=pytest.mark.slow)]

# Tolerances. Observed maxima below: over 3000 random cases per op (fuzz.CPU_* bounds, RandomChooser).
# Selective scan: elementwise |got - expected| <= t * (max|expected| + |expected|) against the float64 loop, a
# relative error for large entries and relative to the tensor's largest one for small ones (cancellations); for
# the gradients of A, D and delta_bias, sums over Bt and L, the sum of their terms' magnitudes replaces |expected|.
# Computed in float64, or in float32 for every other input dtype (the output is float32): observed 1.3e-15, 4.6e-7.
SCAN_TOL = {'float64': 1e-12, 'float32': 1e-5}
# The gradients of fp16/bf16 u, delta, B, C: computed in float32, rounded once to their dtype (half an ulp is
# 2.4e-4 / 2e-3 in this measure): observed 2.4e-4 / 1.9e-3. Those of A, D, delta_bias stay float32: SCAN_TOL.
SCAN_ROUNDED_TOL = {'float16': 1e-3, 'bfloat16': 8e-3}
# dwconv2d and state_fusion are sums of products: elementwise |got - expected| <= t * (bound + tiny), with bound
# the same sum over the magnitudes of its terms (the naive op on |inputs|, and |dout| for the gradients), so that
# cancellations cannot fail a test, and tiny the dtype's smallest normal number (fp16's gradual underflow).
# fp16/bf16 are computed in their dtype by PyTorch's conv and pad (the fusion's float32 kernels and alpha are cast
# to h's dtype first), accumulating up to k*k taps and the replicate padding's border sums in it. Observed:
# 7e-16, 3.8e-7, 2.1e-3, 1.3e-2 (about 6 bf16 ulps, in the gradient of x).
CONV_TOL = {'float64': 1e-12, 'float32': 1e-5, 'float16': 1e-2, 'bfloat16': 8e-2}


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """One intra-op thread while this module runs: its ops are tiny, and on 2 busy cores two threads made them
    10-400x slower (threads waiting for each other), one thread none."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _HypothesisChooser:
    """A :class:`fuzz.Chooser` on hypothesis' ``draw``: each parameter shrinks on its own."""

    def __init__(self, data: st.DataObject):
        self.data = data

    def choice(self, options: Sequence[T]) -> T:
        return self.data.draw(st.sampled_from(options))

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))


def _run_naive(fn, inputs: Tensors, dout: torch.Tensor) -> Tensors:
    """``fn``'s output (``'out'``) and its gradients with respect to ``inputs`` (new float64 leaves)."""
    leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    out = fn(**leaves)
    return {'out': out, **dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), dout)))}


def expected_scan(case: fuzz.ScanCase, inputs: Tensors, dout: torch.Tensor) -> Tuple[Tensors, Tensors]:
    """The naive loop's output and gradients, and the error allowed at each of their elements."""
    terms = dict(inputs, A=inputs['A'].expand(case.length, case.batch, *inputs['A'].shape))  # (L, Bt, D, N)
    expected = _run_naive(partial(naive_scan, delta_softplus=case.delta_softplus), terms, dout)
    # A, D and delta_bias get sums over Bt and L: bounded by the sums of their terms' magnitudes.
    bounds = dict(A=expected['A'].abs().sum((0, 1)))
    expected['A'] = expected['A'].sum((0, 1))
    if 'D' in expected:
        bounds['D'] = (dout * inputs['u'].double()).abs().sum((0, 2))
    if 'delta_bias' in expected:
        bounds['delta_bias'] = expected['delta'].abs().sum((0, 2))  # delta and delta_bias enter the same sum
    wide_tol = SCAN_TOL['float64' if case.dtype == 'float64' else 'float32']
    allowed = {}
    for name, x in expected.items():
        tol = SCAN_ROUNDED_TOL.get(case.dtype, wide_tol) if name in ('u', 'delta', 'B', 'C') else wide_tol
        allowed[name] = tol * (x.abs().max() + bounds.get(name, x.abs()))
    return expected, allowed


def expected_conv(case: Union[fuzz.DWConvCase, fuzz.FusionCase], inputs: Tensors,
                  dout: torch.Tensor) -> Tuple[Tensors, Tensors]:
    """The naive tap sums' output and gradients, and the error allowed at each of their elements."""
    if isinstance(case, fuzz.DWConvCase):

        def fn(x, weight, bias=None):
            return naive_dwconv(x, weight, bias, case.dilation, case.padding_mode)
    else:
        fn = partial(naive_state_fusion, padding_mode=case.padding_mode)
    expected = _run_naive(fn, inputs, dout)
    bounds = _run_naive(fn, {k: v.abs() for k, v in inputs.items()}, dout.abs())  # sums of |terms|
    underflow = torch.finfo(case.torch_dtype).tiny  # fp16 results below 6e-5 lose relative precision (subnormals)
    return expected, {name: CONV_TOL[case.dtype] * (bound + underflow) for name, bound in bounds.items()}


def assert_within(got: torch.Tensor, expected: torch.Tensor, allowed: torch.Tensor, what: str) -> None:
    err = (got.double() - expected).abs()
    bad = ~(err <= allowed)  # NaN fails
    if bad.any():
        worst = torch.where(bad, (err / allowed).nan_to_num(torch.inf), -1.0).argmax()
        index = tuple(i.item() for i in torch.unravel_index(worst, err.shape))
        raise AssertionError(f'{what}: {bad.sum().item()} of {err.numel()} elements off; worst at {index}: got '
                             f'{got[index].item():.6g}, expected {expected[index].item():.6g}, error allowed '
                             f'{allowed[index].item():.3g}')


def check_against_naive(case: fuzz.Case) -> None:
    """The op's output and the gradients of all its inputs against the naive float64 loop."""
    scan = isinstance(case, fuzz.ScanCase)
    inputs = fuzz.make_inputs(case)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}  # keeps each input's strides
    out = fuzz.call_op(case, leaves, backend='torch')
    out_dtype = torch.float64 if case.dtype == 'float64' else (torch.float32 if scan else case.torch_dtype)
    assert out.dtype == out_dtype and out.shape == case.out_shape
    dout = fuzz.grad_output(case, out.dtype)  # float64 holding values of the output's dtype
    got = {'out': out, **dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), dout.to(out.dtype))))}
    for name, leaf in leaves.items():
        assert got[name].dtype == leaf.dtype and got[name].shape == leaf.shape, name

    expected, allowed = (expected_scan if scan else expected_conv)(case, inputs, dout)
    assert got.keys() == expected.keys()
    for name in got:
        what = f'output of {case}' if name == 'out' else f'gradient of {name} of {case}'
        assert_within(got[name], expected[name], allowed[name], what)


def _check_drawn_cases(op: str, bounds, draw, dtype: str, layout_mode: str, budget: str) -> None:
    """The op's reference against the naive loop on ``EXAMPLES[op]`` (x5 for ``'thorough'``) drawn cases."""
    bounds = dataclasses.replace(bounds, dtypes=(dtype, ), layout_modes=(layout_mode, ))
    examples = EXAMPLES[op] * (5 if budget == 'thorough' else 1)

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None)
    @given(data=st.data())
    def check(data):
        check_against_naive(draw(_HypothesisChooser(data), bounds))

    check()


@pytest.mark.parametrize('budget', BUDGETS)
@pytest.mark.parametrize('layout_mode', LAYOUT_MODES)
@pytest.mark.parametrize('dtype', DTYPE_NAMES)
def test_selective_scan_ref_matches_naive_loop(dtype, layout_mode, budget):
    _check_drawn_cases('scan', fuzz.CPU_SCAN, fuzz.draw_scan_case, dtype, layout_mode, budget)


@pytest.mark.parametrize('budget', BUDGETS)
@pytest.mark.parametrize('layout_mode', LAYOUT_MODES)
@pytest.mark.parametrize('dtype', DTYPE_NAMES)
def test_dwconv2d_ref_matches_tap_sum(dtype, layout_mode, budget):
    _check_drawn_cases('dwconv', fuzz.CPU_DWCONV, fuzz.draw_dwconv_case, dtype, layout_mode, budget)


@pytest.mark.parametrize('budget', BUDGETS)
@pytest.mark.parametrize('layout_mode', LAYOUT_MODES)
@pytest.mark.parametrize('dtype', DTYPE_NAMES)
def test_state_fusion_ref_matches_dilated_branches(dtype, layout_mode, budget):
    _check_drawn_cases('fusion', fuzz.CPU_FUSION, fuzz.draw_fusion_case, dtype, layout_mode, budget)


# ------------------------------------------------------------------------------------------ the fuzz module itself
@pytest.mark.parametrize('layout, shape, contiguous', [
    ('contiguous', (2, 3, 5), True),
    ('transposed', (2, 3, 5), False),
    ('sliced', (2, 3, 5), False),
    ('sliced', (7, ), False),
    ('expanded', (2, 3, 5), False),
    ('expanded', (4, ), False),
    ('channels_last', (2, 3, 4, 5), False),
])
def test_layouts_keep_values_and_change_strides(layout, shape, contiguous):
    values = torch.randn(*shape)
    if layout == 'expanded':
        values = values[:1].expand(shape)  # the layout keeps only the first slice along dim 0
    stored = fuzz.with_layout(values, layout)
    assert stored.is_contiguous() == contiguous
    assert stored.data_ptr() != values.data_ptr()
    torch.testing.assert_close(stored, values, rtol=0, atol=0)
    if layout == 'sliced':  # the gaps are NaN
        gaps = stored.as_strided(stored.shape, stored.stride(), stored.storage_offset() - 1)
        assert gaps.isnan().all()


def test_layout_must_fit_the_rank():
    with pytest.raises(ValueError, match='does not apply to a 1-D tensor'):
        fuzz.with_layout(torch.randn(3), 'transposed')


def _draw_many(draw, bounds, count: int, seed: str):
    chooser = fuzz.RandomChooser(seed)
    return [draw(chooser, bounds) for _ in range(count)]


@pytest.mark.parametrize('bounds', [fuzz.CPU_SCAN, fuzz.GPU_SCAN], ids=['cpu', 'gpu'])
def test_scan_space_covers_every_flag_combination(bounds):
    cases = _draw_many(fuzz.draw_scan_case, bounds, 3000, 'coverage')
    flags = {(c.form, c.shared_b, c.shared_c, c.with_d, c.with_delta_bias, c.delta_softplus, c.spikes) for c in cases}
    valid = {(form, shared_b, shared_c, with_d, bias, softplus, spikes)
             for form, shared_b, shared_c, with_d, bias, softplus, spikes in itertools.product(
                 ('state', 'output'), *[(False, True)] * 6)
             if (form == 'output' or not (with_d or shared_c)) and (softplus or not spikes)}
    assert flags == valid  # every combination the op accepts, no other
    assert {c.dtype for c in cases} == set(bounds.dtypes)
    assert {layout for c in cases for _, layout in c.layouts} == set(fuzz.LAYOUTS)
    assert set(bounds.lengths) <= {c.length for c in cases}
    for c in cases:
        assert c.channels % c.groups == 0 and (c.groups == 1 or not (c.shared_b or c.shared_c))
        smallest = c.batch == 1 and c.channels == c.groups  # the size bound lowers D / G and Bt to 1 at most
        assert c.batch * c.channels * c.d_state * c.length <= bounds.max_elements or smallest
    if bounds is fuzz.GPU_SCAN:
        assert max(c.d_state for c in cases) == 16 and max(c.length for c in cases) >= 3000  # the kernel's N limit


@pytest.mark.parametrize('bounds', [fuzz.CPU_DWCONV, fuzz.GPU_DWCONV], ids=['cpu', 'gpu'])
def test_dwconv_space_covers_every_flag_combination(bounds):
    cases = _draw_many(fuzz.draw_dwconv_case, bounds, 2000, 'coverage')
    flags = {(c.with_bias, c.padding_mode, c.dtype) for c in cases}
    assert flags == set(itertools.product((False, True), ('zeros', 'replicate'), bounds.dtypes))
    assert {c.kernel_size for c in cases} == set(bounds.kernel_sizes)
    assert max(c.dilation for c in cases) == bounds.max_dilation
    assert all(c.dilation * (c.kernel_size // 2) <= bounds.max_reach for c in cases)


@pytest.mark.parametrize('mode', fuzz.LAYOUT_MODES)
def test_layout_modes(mode):
    bounds = dataclasses.replace(fuzz.CPU_FUSION, layout_modes=(mode, ))
    layouts = [layout for case in _draw_many(fuzz.draw_fusion_case, bounds, 200, mode) for _, layout in case.layouts]
    expected = dict(contiguous={'contiguous'}, strided=set(fuzz.LAYOUTS) - {'contiguous'}, mixed=set(fuzz.LAYOUTS))
    assert set(layouts) == expected[mode]


def test_fusion_space_covers_every_flag_combination():
    cases = _draw_many(fuzz.draw_fusion_case, fuzz.CPU_FUSION, 500, 'coverage')
    assert {(c.padding_mode, c.dtype) for c in cases} == set(
        itertools.product(('replicate', 'zeros'), fuzz.CPU_FUSION.dtypes))


def _expected_shapes(case: fuzz.Case) -> Dict[str, Tuple[int, ...]]:
    if isinstance(case, fuzz.ScanCase):
        seq, channel = (case.batch, case.channels, case.length), (case.channels, )
        shared, grouped = (case.batch, case.d_state, case.length), (case.batch, case.groups, case.d_state, case.length)
        shapes = dict(u=seq, delta=seq, A=(case.channels, case.d_state), B=shared if case.shared_b else grouped)
        if case.form == 'output':
            shapes['C'] = shared if case.shared_c else grouped
        if case.with_d:
            shapes['D'] = channel
        if case.with_delta_bias:
            shapes['delta_bias'] = channel
        return shapes
    if isinstance(case, fuzz.CrossCase):
        b, d, k, r, n, length = (case.batch, case.channels, case.sequences, case.rank, case.d_state,
                                 case.height * case.width)
        maps = (b if case.per_image else 1, k, length)
        inverse = {} if case.order == 'maps' else dict(inverse=maps)
        return dict(x=case.out_shape, index=maps, **inverse, x_proj_weight=(k, r + 2 * n, d),
                    dt_weight=(k, d, r), dt_bias=(k, d), A=(k * d, n), Ds=(k * d, ))
    if isinstance(case, fuzz.DWConvCase):
        shapes = dict(x=case.out_shape, weight=(case.channels, 1, case.kernel_size, case.kernel_size))
        return dict(shapes, bias=(case.channels, )) if case.with_bias else shapes
    return dict(h=case.out_shape, **{k: (case.channels, 1, 3, 3) for k in fuzz.FUSION_KERNELS}, alpha=(3, ))


@pytest.mark.parametrize('draw, bounds', [
    (fuzz.draw_scan_case, fuzz.GPU_SCAN),
    (fuzz.draw_dwconv_case, fuzz.GPU_DWCONV),
    (fuzz.draw_fusion_case, fuzz.GPU_FUSION),
    (fuzz.draw_cross_case, fuzz.GPU_CROSS),
    (fuzz.draw_cross_form_case, fuzz.GPU_CROSS),
], ids=['scan', 'dwconv', 'fusion', 'cross', 'cross-form'])
def test_gpu_cases_build_on_cpu_with_the_kernels_dtypes(draw, bounds):
    for case in _draw_many(draw, bounds, 3, 'build'):
        inputs = fuzz.make_inputs(case)
        assert {k: tuple(v.shape) for k, v in inputs.items()} == _expected_shapes(case)
        for name, x in inputs.items():
            if name in ('index', 'inverse'):  # the cross scan's orders: permutations of the tokens, or index maps
                assert x.dtype == torch.int64
                if case.order == 'maps':  # tokens within the map, repeated and skipped
                    assert name == 'index' and 'inverse' not in inputs and 0 <= x.min() <= x.max() < x.shape[-1]
                else:
                    assert torch.equal(x.sort(-1).values, torch.arange(x.shape[-1]).expand_as(x))
                continue
            main_input = name in ('u', 'delta', 'B', 'C', 'x', 'h')  # the kernels take the others in float32
            assert x.dtype == (case.torch_dtype if main_input else torch.float32), name
            assert x.isfinite().all(), name


def test_cases_and_values_are_reproducible():
    first, again = (_draw_many(fuzz.draw_scan_case, fuzz.CPU_SCAN, 20, 'same') for _ in range(2))
    assert first == again
    for case in first[:5]:
        a, b = fuzz.make_inputs(case), fuzz.make_inputs(case)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------- the kernel-vs-reference harness
def test_kernel_cases_are_fixed_by_the_seed_and_each_op_has_its_own_stream():
    first = {op: fuzz.draw_cases(op, 4, seed=3) for op in fuzz.KERNEL_OPS}
    assert {op: fuzz.draw_cases(op, 4, seed=3) for op in fuzz.KERNEL_OPS} == first
    assert fuzz.draw_cases('scan-state', 2, seed=3) == first['scan-state'][:2]  # more cases extend the same stream
    assert fuzz.draw_cases('scan-state', 4, seed=4) != first['scan-state']
    assert all(fuzz.op_name(case) == op for op, cases in first.items() for case in cases)


def _fake_kernel(real_call_op, scale: Optional[float]):
    """call_op whose 'cuda' backend is the reference on the CPU, its output scaled by ``scale`` (None: exact)."""

    def call_op(case, inputs, backend):
        out = real_call_op(case, inputs, backend='torch')
        return out if backend == 'torch' or scale is None else out * scale

    return call_op


@pytest.mark.parametrize('scale', [None, 1.001])
def test_harness_counts_mismatches(monkeypatch, scale):
    monkeypatch.setattr(fuzz, 'call_op', _fake_kernel(fuzz.call_op, scale))
    small = [
        (fuzz.draw_scan_case, dataclasses.replace(fuzz.CPU_SCAN, dtypes=('float32', ), max_length=40)),
        (fuzz.draw_dwconv_case, dataclasses.replace(fuzz.CPU_DWCONV, dtypes=('float32', ))),
        (fuzz.draw_fusion_case, dataclasses.replace(fuzz.CPU_FUSION, dtypes=('float32', ))),
        (fuzz.draw_cross_case, dataclasses.replace(fuzz.GPU_CROSS, dtypes=('float32', ), max_size=6, max_channels=8)),
        (fuzz.draw_cross_form_case, dataclasses.replace(fuzz.GPU_CROSS, dtypes=('float32', ), max_size=6,
                                                        max_channels=8)),
    ]
    for draw, bounds in small:
        cases = _draw_many(draw, bounds, 4, 'harness')
        results = [fuzz.compare_case(case, 'cpu') for case in cases]
        for result in results:
            inputs = fuzz.make_inputs(result.case)
            compared = {'out', *(k for k, v in inputs.items() if v.is_floating_point())}
            assert set(result.errors) == compared
            if scale is None:
                assert result.ok and max(result.errors.values()) == 0.0
            else:  # 1e-3 relative is over every float32 output tolerance (1e-4 at most)
                assert not result.ok and result.errors['out'] == pytest.approx(1e-3, rel=1e-3)
                assert 'out 1.00e-03 > ' in fuzz.describe_failure(0, result)
        summary = fuzz.summarize(results)
        assert sum(row['cases'] for row in summary) == 4
        assert sum(row['mismatches'] for row in summary) == (0 if scale is None else 4)
        assert len(fuzz.format_summary(summary).splitlines()) == 1 + len(summary)
