"""Property-based tests (hypothesis) of the pure-PyTorch ops against naive loops over random cases.

The cases come from ``tests/ops/fuzz.py`` (CPU bounds): shapes, every flag combination, float64/32/16 and
bfloat16, and contiguous, transposed, sliced (NaN in the gaps), stride-0 and channels-last inputs. Each test
compares the op's output and the gradient of every input with a naive float64 loop on the same (rounded) values;
the references of the Triton elementwise ops (LayerNorm, bias + GELU, the residual add, the token merge) against
float64 autograd of their formulas written out.
``derandomize=True`` makes every run draw the same examples (for a given hypothesis version) and ``database=None``
keeps a run from replaying the failures of earlier ones. Also here: the fuzz module's own layouts and parameter
space, and the kernel-vs-reference harness of ``tests/ops/test_fuzz_kernels_cuda.py`` on the CPU (a stand-in
kernel that matches, and one that does not).
"""
import dataclasses
import itertools
import math
from functools import partial
from typing import Dict, Optional, Sequence, Tuple, TypeVar, Union

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mmcv.cnn.bricks import DropPath
from ops import fuzz
from ops.naive import naive_dwconv, naive_scan, naive_state_fusion

T = TypeVar('T')
Tensors = Dict[str, torch.Tensor]
DTYPE_NAMES = ['float64', 'float32', 'float16', 'bfloat16']
LAYOUT_MODES = ['contiguous', 'strided']  # every input contiguous / every input in a drawn non-contiguous layout
# Examples per dtype and layout mode: the quick suite's, and 5x as many under ``slow``.
EXAMPLES = {'scan': 40, 'dwconv': 30, 'fusion': 20, 'layer-norm-2d': 15, 'layer-norm-last': 15, 'bias-gelu': 15,
            'add-residual': 20, 'token-merge': 15}
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
# The Triton elementwise ops' references (LayerNorm, bias + GELU, the residual add, the token merge) against float64
# autograd of their formulas written out: elementwise |got - expected| <= t * (|expected| + scale), scale the
# tensor's largest entry but at least 1 (the absolute floor of the ops' own GPU tests' atol: LayerNorm's x gradient
# of a row of 2 channels vanishes but for terms in eps, and its rounding noise is measured against 1). t is that of
# the coarsest dtype the tensor went through: x's and out_dtype for LayerNorm's output (the reference rounds to x's
# dtype, then casts), y's for the residual's. LayerNorm's statistics come from off-centre values (mean 3): the
# variance of a row of nearly equal values cancels in float32 and the backward's recomputed normalized values carry
# that rounding times 1 / sqrt(var + eps), so t is scaled by 1 + max(mean^2 / (var + eps)) over the rows. Observed
# maxima over 3000 random cases per op (fuzz.CPU_ELEMENTWISE, RandomChooser), in units of t: 8.5e-16, 1.4e-6, 2.8e-3,
# 1.3e-2 (float64, float32, float16, bfloat16; the largest in the bias gradients, which the 16-bit references sum to
# 16 bits).
ELEMENTWISE_TOL = {'float64': 1e-12, 'float32': 1e-5, 'float16': 1e-2, 'bfloat16': 5e-2}


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


def _layer_norm_formula(x, weight, bias, *, eps: float, last: bool):
    """LayerNorm written out: over the last dim (rows of channels, ``last``), else over dim 1 of (B, C, H, W) maps."""
    dim, shape = (-1, (-1, )) if last else (1, (-1, 1, 1))
    centred = x - x.mean(dim, keepdim=True)
    return centred / torch.sqrt(centred.square().mean(dim, keepdim=True) + eps) * weight.view(shape) + bias.view(shape)


def _bias_gelu_formula(h, bias):
    t = h + bias[:, None, None]
    return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))


def _residual_formula(x, y, bias=None, *, keep_mask: Optional[torch.Tensor], keep_prob: float):
    if bias is not None:
        y = y + bias[:, None, None]
    if keep_mask is not None:
        y = y / keep_prob * keep_mask.view(-1, *(1, ) * (y.dim() - 1))
    return x + y


def _merge_formula(y, *, index: torch.Tensor):
    """``out[b, :, p]`` = the sum of ``y[b, k, :, i]`` over every (k, i) with ``index[b, k, i] = p``."""
    rows = []
    for b in range(y.shape[0]):
        row = y.new_zeros(y.shape[2], y.shape[3])
        for k in range(y.shape[1]):
            row = row.index_add(1, index[min(b, index.shape[0] - 1), k], y[b, k])
        rows.append(row)
    return torch.stack(rows)


def _keep_mask(case: fuzz.ResidualCase, y: torch.Tensor) -> torch.Tensor:
    """The images mmcv's DropPath keeps (1.) and drops (0.) on the CPU's generator seeded with the case's seed (as
    call_op seeds it for the op)."""
    ones = torch.ones((y.shape[0], ) + (1, ) * (y.dim() - 1), dtype=y.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(case.seed)
        return (DropPath(case.drop_prob).train()(ones) != 0).flatten().double()


def _coarsest(*dtypes: torch.dtype) -> str:
    return max((name for name, dtype in fuzz.DTYPES.items() if dtype in dtypes), key=DTYPE_NAMES.index)


def expected_elementwise(case: Union[fuzz.LayerNormCase, fuzz.BiasGeluCase, fuzz.ResidualCase, fuzz.TokenMergeCase],
                         inputs: Tensors, dout: torch.Tensor) -> Tuple[Tensors, Tensors]:
    """The formula's output and gradients in float64, and the error allowed at each of their elements."""
    floats = {k: v for k, v in inputs.items() if v.is_floating_point()}  # the merge's index maps get no gradient
    conditioning = 1.
    if isinstance(case, fuzz.LayerNormCase):
        fn = partial(_layer_norm_formula, eps=case.eps, last=case.last)
        x, dim = inputs['x'].double(), -1 if case.last else 1
        conditioning += (x.mean(dim).square() / (x.var(dim, unbiased=False) + case.eps)).max().item()
    elif isinstance(case, fuzz.BiasGeluCase):
        fn = _bias_gelu_formula
    elif isinstance(case, fuzz.ResidualCase):
        mask = _keep_mask(case, inputs['y']) if case.drop_prob else None
        fn = partial(_residual_formula, keep_mask=mask, keep_prob=1 - case.drop_prob)
    else:
        fn = partial(_merge_formula, index=inputs['index'])
    expected = _run_naive(fn, floats, dout)
    dtypes = dict({k: v.dtype for k, v in floats.items()}, out=fuzz.output_dtype(case))
    allowed = {}
    for name, value in expected.items():
        tol = ELEMENTWISE_TOL[_coarsest(case.torch_dtype, dtypes[name])] * conditioning
        allowed[name] = tol * (value.abs() + value.abs().max().clamp_min(1.))
    return expected, allowed


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
    """The op's output and the gradients of all its inputs against the naive float64 loop (the elementwise ops:
    float64 autograd of their formulas)."""
    inputs = fuzz.make_inputs(case)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if v.is_floating_point()}  # strides kept
    out = fuzz.call_op(case, {**inputs, **leaves}, backend='torch')
    assert out.dtype == fuzz.output_dtype(case) and out.shape == case.out_shape
    dout = fuzz.grad_output(case, out.dtype)  # float64 holding values of the output's dtype
    got = {'out': out, **dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), dout.to(out.dtype))))}
    for name, leaf in leaves.items():
        assert got[name].dtype == leaf.dtype and got[name].shape == leaf.shape, name

    if isinstance(case, fuzz.ScanCase):
        expected, allowed = expected_scan(case, inputs, dout)
    elif isinstance(case, (fuzz.DWConvCase, fuzz.FusionCase)):
        expected, allowed = expected_conv(case, inputs, dout)
    else:
        expected, allowed = expected_elementwise(case, inputs, dout)
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


@pytest.mark.parametrize('budget', BUDGETS)
@pytest.mark.parametrize('layout_mode', LAYOUT_MODES)
@pytest.mark.parametrize('dtype', DTYPE_NAMES)
@pytest.mark.parametrize('op, draw', [
    ('layer-norm-2d', fuzz.draw_layer_norm_case),
    ('layer-norm-last', fuzz.draw_layer_norm_last_case),
    ('bias-gelu', fuzz.draw_bias_gelu_case),
    ('add-residual', fuzz.draw_residual_case),
    ('token-merge', fuzz.draw_token_merge_case),
])
def test_elementwise_refs_match_float64_formulas(op, draw, dtype, layout_mode, budget):
    """The references that the Triton elementwise kernels are fuzzed against (call_op, backend='torch'): LayerNorm
    of maps and of rows of channels with every out_dtype, bias + GELU, the residual add with and without its bias
    and DropPath (the same keep mask as mmcv's DropPath from the same seed) and a float32 stream, the token merge
    over VMamba's four directions and random permutations."""
    _check_drawn_cases(op, fuzz.CPU_ELEMENTWISE, draw, dtype, layout_mode, budget)


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


def test_elementwise_spaces_cover_every_flag_combination():
    """The Triton elementwise ops' GPU spaces: every flag combination each op accepts, every dtype and out_dtype, the
    special channel counts and sizes, and rows of pixels (bias + GELU, the residual) and of channels (LayerNorm) on both
    sides of the kernels' 1024-element limits; sizes within max_elements."""
    residual = _draw_many(fuzz.draw_residual_case, fuzz.GPU_RESIDUAL, 2000, 'coverage')
    dtypes = fuzz.GPU_RESIDUAL.dtypes
    flags = {(c.form, c.with_bias, c.drop_prob > 0, c.float32_stream, c.dtype) for c in residual}
    assert flags == {(form, bias, drop, stream, dtype)
                     for form, bias, drop, stream, dtype in itertools.product(
                         fuzz.RESIDUAL_FORMS, (False, True), (False, True), (False, True), dtypes)
                     if (form == 'nchw' or not bias) and (dtype != 'float32' or not stream)}
    assert {c.drop_prob for c in residual} == {0., *fuzz.DROP_PROBS}
    pixels = [c.height * c.width for c in residual]
    assert min(pixels) == 1 and 1024 in pixels and max(pixels) > 10000
    norms = _draw_many(fuzz.draw_layer_norm_case, fuzz.GPU_LAYER_NORM, 1000, 'coverage')
    assert {(c.dtype, c.out_dtype) for c in norms} == set(itertools.product(dtypes, (None, *dtypes)))
    assert set(fuzz.GPU_LAYER_NORM.channels) <= {c.channels for c in norms}  # 1 to 2100: both sides of 1024, 2048
    rows = _draw_many(fuzz.draw_layer_norm_last_case, fuzz.GPU_LAYER_NORM_LAST, 500, 'coverage')
    assert all(c.last for c in rows) and max(c.channels for c in rows) == 256 and min(c.channels for c in rows) == 1
    merges = _draw_many(fuzz.draw_token_merge_case, fuzz.GPU_TOKEN_MERGE, 500, 'coverage')
    assert {(c.order, c.per_image, c.sequences) for c in merges} == {('cross', False, 4)} | set(
        itertools.product(('permutations', ), (False, True), fuzz.GPU_TOKEN_MERGE.sequences))
    gelus = _draw_many(fuzz.draw_bias_gelu_case, fuzz.GPU_BIAS_GELU, 500, 'coverage')
    assert max(c.batch * c.channels for c in gelus) > 10000  # many rows: the grid's first axis
    for cases, bounds, per_element in ((residual, fuzz.GPU_RESIDUAL, None), (norms, fuzz.GPU_LAYER_NORM, None),
                                       (rows, fuzz.GPU_LAYER_NORM_LAST, None), (gelus, fuzz.GPU_BIAS_GELU, None),
                                       (merges, fuzz.GPU_TOKEN_MERGE, 'sequences')):
        for c in cases:
            elements = c.batch * c.channels * c.height * c.width * (getattr(c, per_element) if per_element else 1)
            assert elements <= bounds.max_elements or c.batch == c.channels == 1


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
    if isinstance(case, fuzz.FusionCase):
        return dict(h=case.out_shape, **{k: (case.channels, 1, 3, 3) for k in fuzz.FUSION_KERNELS}, alpha=(3, ))
    channel = (case.channels, )
    if isinstance(case, fuzz.LayerNormCase):
        return dict(x=case.out_shape, weight=channel, bias=channel)
    if isinstance(case, fuzz.BiasGeluCase):
        return dict(h=case.out_shape, bias=channel)
    if isinstance(case, fuzz.ResidualCase):
        return dict(x=case.out_shape, y=case.out_shape, **(dict(bias=channel) if case.with_bias else {}))
    maps = (case.batch if case.per_image else 1, case.sequences, case.length)  # token merge
    return dict(y=(case.batch, case.sequences, case.channels, case.length), index=maps, inverse=maps)


@pytest.mark.parametrize('draw, bounds', [
    (fuzz.draw_scan_case, fuzz.GPU_SCAN),
    (fuzz.draw_dwconv_case, fuzz.GPU_DWCONV),
    (fuzz.draw_fusion_case, fuzz.GPU_FUSION),
    (fuzz.draw_cross_case, fuzz.GPU_CROSS),
    (fuzz.draw_cross_form_case, fuzz.GPU_CROSS),
    (fuzz.draw_layer_norm_case, fuzz.GPU_LAYER_NORM),
    (fuzz.draw_layer_norm_last_case, fuzz.GPU_LAYER_NORM_LAST),
    (fuzz.draw_bias_gelu_case, fuzz.GPU_BIAS_GELU),
    (fuzz.draw_residual_case, fuzz.GPU_RESIDUAL),
    (fuzz.draw_token_merge_case, fuzz.GPU_TOKEN_MERGE),
], ids=['scan', 'dwconv', 'fusion', 'cross', 'cross-form', 'layer-norm-2d', 'layer-norm-last', 'bias-gelu',
        'add-residual', 'token-merge'])
def test_gpu_cases_build_on_cpu_with_the_kernels_dtypes(draw, bounds):
    for case in _draw_many(draw, bounds, 6, 'build'):
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
            main_input = name in ('u', 'delta', 'B', 'C', 'x', 'h', 'y')  # the kernels take the others in float32
            dtype = case.torch_dtype if main_input else torch.float32
            if isinstance(case, fuzz.ResidualCase) and name == 'x':  # the residual stream
                dtype = torch.float32 if case.float32_stream else case.torch_dtype
            assert x.dtype == dtype, name
            assert x.isfinite().all(), name
        if 'inverse' in inputs:  # the inverse permutations of the index maps' rows
            index, inverse = inputs['index'], inputs['inverse']
            assert torch.equal(inverse.gather(-1, index), torch.arange(index.shape[-1]).expand_as(index))


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
        # the elementwise ops: float64 (their float32 tolerances, the ops' GPU tests', are over 1e-3), whose
        # references take float64 inputs as they are; the token merge's float32 one is 2e-6
        (fuzz.draw_layer_norm_case, dataclasses.replace(fuzz.CPU_ELEMENTWISE, dtypes=('float64', ))),
        (fuzz.draw_layer_norm_last_case, dataclasses.replace(fuzz.CPU_ELEMENTWISE, dtypes=('float64', ))),
        (fuzz.draw_bias_gelu_case, dataclasses.replace(fuzz.CPU_ELEMENTWISE, dtypes=('float64', ))),
        (fuzz.draw_residual_case, dataclasses.replace(fuzz.CPU_ELEMENTWISE, dtypes=('float64', ))),
        (fuzz.draw_token_merge_case, dataclasses.replace(fuzz.CPU_ELEMENTWISE, dtypes=('float32', ))),
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
            elif fuzz.error_floor(result.case) == 0:  # 1e-3 relative is over every such float32 output tolerance
                assert not result.ok and result.errors['out'] == pytest.approx(1e-3, rel=1e-3)
                assert 'out 1.00e-03 > ' in fuzz.describe_failure(0, result)
            else:  # 1e-3 of the output's largest entry, measured against at least 1
                assert not result.ok and 0 < result.errors['out'] <= 1.001e-3
                assert f'out {result.errors["out"]:.2e} > ' in fuzz.describe_failure(0, result)
        summary = fuzz.summarize(results)
        assert sum(row['cases'] for row in summary) == 4
        assert sum(row['mismatches'] for row in summary) == (0 if scale is None else 4)
        assert len(fuzz.format_summary(summary).splitlines()) == 1 + len(summary)
