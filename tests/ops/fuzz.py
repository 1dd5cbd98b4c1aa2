"""Random op cases for fuzzing, and the kernel-vs-reference comparison of one case.

Used by ``tests/ops/test_fuzz_reference.py`` (the references against naive loops, CPU, hypothesis) and
``tests/ops/test_fuzz_kernels_cuda.py`` (the CUDA and Triton kernels against the references, GPU).

Ops: the selective scan (state and output forms), the depthwise conv and the state fusion, the cross scan (Triton
kernel, and the CUDA scan's cross form), and the Triton elementwise ops: ``layer_norm_2d`` and ``layer_norm_last``,
``bias_gelu``, ``add_residual`` and the token merge (``scatter_tokens`` over permutations).

One frozen dataclass per op holds everything a case is made of: shapes, dtype, flags, the memory layout of every
input and the seed of its values. ``draw_*_case`` builds a case from a :class:`Chooser`, so the same parameter
space drives both users: the hypothesis tests wrap hypothesis' ``draw`` in a chooser (so failures shrink field by
field), the GPU tests use :class:`RandomChooser` (:func:`draw_cases`). :func:`make_inputs` turns a case into tensors
on any device (values are drawn on the CPU from the case's seed, so a case gives the same numbers everywhere),
:func:`call_op` runs the op on them with the case's flags, and :func:`compare_case` runs it forward and backward on
the kernel and on the reference and compares every result.

Layouts (how an input's values sit in memory; the values are the same whichever is drawn, except ``'expanded'``):

* ``'contiguous'``: row-major.
* ``'transposed'``: the last two dims stored swapped (unit stride along dim -2).
* ``'sliced'``: every other element of a tensor twice as long along the last dim, from offset 1 (last stride 2);
  the gaps hold NaN, so an op that reads through the wrong strides fails loudly.
* ``'expanded'``: the first slice along dim 0 broadcast with stride 0 (all slices along dim 0 are equal).
* ``'channels_last'``: 4-D tensors stored in (0, 2, 3, 1) order.

A case's inputs are all contiguous (layout mode ``'contiguous'``), all in a drawn non-contiguous layout
(``'strided'``), or each in any drawn layout (``'mixed'``).

Shape legend: as in :mod:`vssm.ops.selective_scan` and :mod:`vssm.ops.dwconv2d`; the elementwise ops' B, C, H, W
as in :mod:`vssm.ops.layer_norm`, K sequences of L = H * W tokens as in :mod:`vssm.ops.token_maps`.
"""
import dataclasses
import math
import random
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, TypeVar, Union

import torch
from conftest import GRAD_TOLERANCES, TOLERANCES
from mmcv.cnn.bricks import DropPath
from torch import Tensor

from vssm.ops import (
    add_residual,
    bias_gelu,
    cross_selective_scan,
    inverse_permutation,
    layer_norm,
    layer_norm_2d,
    layer_norm_last,
    scatter_tokens,
    token_maps,
)
from vssm.ops._backend import cross_form_switch, triton_fusions
from vssm.ops.bias_gelu import kernel_available as bias_gelu_kernel_available
from vssm.ops.cross_scan import kernel_available as cross_kernel_available
from vssm.ops.dwconv2d import FUSION_DILATIONS, dwconv2d, state_fusion
from vssm.ops.dwconv2d import kernel_available as dwconv_kernel_available
from vssm.ops.layer_norm import kernel_available as layer_norm_kernel_available
from vssm.ops.residual import kernel_available as residual_kernel_available
from vssm.ops.selective_scan import cross_form_available, selective_scan
from vssm.ops.selective_scan import kernel_available as scan_kernel_available

__all__ = [
    'DTYPES', 'LAYOUTS', 'LAYOUT_MODES', 'FUSION_KERNELS', 'Chooser', 'RandomChooser', 'ScanBounds', 'ScanCase',
    'DWConvBounds', 'DWConvCase', 'FusionBounds', 'FusionCase', 'Case', 'CPU_SCAN', 'GPU_SCAN', 'CPU_DWCONV',
    'GPU_DWCONV', 'CPU_FUSION', 'GPU_FUSION', 'CrossBounds', 'CrossCase', 'GPU_CROSS', 'draw_scan_case',
    'draw_dwconv_case', 'draw_fusion_case', 'draw_cross_case', 'draw_cross_form_case', 'ElementwiseBounds',
    'LayerNormCase', 'BiasGeluCase', 'ResidualCase', 'TokenMergeCase', 'RESIDUAL_FORMS', 'DROP_PROBS',
    'CPU_ELEMENTWISE', 'GPU_LAYER_NORM', 'GPU_LAYER_NORM_LAST', 'GPU_BIAS_GELU', 'GPU_RESIDUAL', 'GPU_TOKEN_MERGE',
    'draw_layer_norm_case', 'draw_layer_norm_last_case', 'draw_bias_gelu_case', 'draw_residual_case',
    'draw_token_merge_case', 'with_layout', 'make_inputs', 'call_op', 'grad_output', 'KERNEL_OPS', 'op_name',
    'tolerance', 'rel_err', 'error_floor', 'reference_dtype', 'output_dtype', 'STATS_TOL', 'CONDITIONED',
    'conditioning', 'CaseResult', 'compare_case', 'draw_cases', 'summarize', 'format_summary', 'describe_failure'
]

T = TypeVar('T')

DTYPES = {'float64': torch.float64, 'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
LAYOUTS = ('contiguous', 'transposed', 'sliced', 'expanded', 'channels_last')
LAYOUT_MODES = ('contiguous', 'strided', 'mixed')
MAX_SEED = 2**31 - 1
SOFTPLUS_THRESHOLD = 20.0  # softplus(x) = x above it (vssm.ops.selective_scan)


class Chooser(Protocol):
    """Where a case's parameters come from: a seeded ``random.Random`` or hypothesis' ``draw``."""

    def choice(self, options: Sequence[T]) -> T:
        """One of ``options`` (hypothesis shrinks towards the first)."""

    def integer(self, low: int, high: int) -> int:
        """An integer in ``[low, high]``, both included (hypothesis shrinks towards ``low``)."""


class RandomChooser:
    """A :class:`Chooser` on a ``random.Random`` seeded with ``seed``."""

    def __init__(self, seed: Union[int, str]):
        self.rng = random.Random(seed)

    def choice(self, options: Sequence[T]) -> T:
        return self.rng.choice(list(options))

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)


def _layouts_for_rank(rank: int) -> Tuple[str, ...]:
    if rank == 1:
        return ('contiguous', 'sliced', 'expanded')
    if rank == 4:
        return LAYOUTS
    return LAYOUTS[:-1]


def _draw_layouts(chooser: Chooser, modes: Sequence[str], ranks: Dict[str, int]) -> Tuple[Tuple[str, str], ...]:
    """(name, layout) per input of the given ranks, in a layout mode drawn from ``modes``."""
    mode = chooser.choice(modes)
    if mode not in LAYOUT_MODES:
        raise ValueError(f'Unknown layout mode {mode!r}: use one of {LAYOUT_MODES}.')
    if mode == 'contiguous':
        return tuple((name, 'contiguous') for name in ranks)
    first = 1 if mode == 'strided' else 0  # _layouts_for_rank lists 'contiguous' first
    return tuple((name, chooser.choice(_layouts_for_rank(rank)[first:])) for name, rank in ranks.items())


def _draw_size(chooser: Chooser, special: Sequence[int], high: int) -> int:
    """One of the ``special`` sizes (chunk and tile boundaries, model shapes) or any size in ``[1, high]``."""
    if chooser.choice(('special', 'any')) == 'special':
        return chooser.choice(special)
    return chooser.integer(1, high)


class _CaseBase:
    """Helpers common to the case dataclasses (each has ``dtype`` and ``layouts`` fields)."""

    dtype: str
    layouts: Tuple[Tuple[str, str], ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of the float32 parameters (float64 in float64 cases)."""
        return torch.float64 if self.dtype == 'float64' else torch.float32

    def layout(self, name: str) -> str:
        return dict(self.layouts).get(name, 'contiguous')


@dataclass(frozen=True)
class _MapCase(_CaseBase):
    """The fields of a case on one (B, C, H, W) map (and its dtype, layouts and seed); ``out_shape`` that map's unless
    the op says otherwise."""

    batch: int
    channels: int
    height: int
    width: int
    dtype: str
    layouts: Tuple[Tuple[str, str], ...]
    seed: int

    @property
    def out_shape(self) -> Tuple[int, ...]:
        return (self.batch, self.channels, self.height, self.width)


# ----------------------------------------------------------------------------------------------- selective scan
@dataclass(frozen=True)
class ScanBounds:
    """The parameter space of selective scan cases.

    Args:
        forms: ``'state'`` and/or ``'output'``.
        dtypes: dtype names (keys of :data:`DTYPES`) to draw from.
        max_batch: largest Bt.
        groups: numbers G of B/C groups.
        max_channels_per_group: largest D / G.
        d_states: state sizes N.
        lengths: special lengths L, drawn half of the time.
        max_length: the other half, L is drawn from ``[1, max_length]``.
        max_elements: Bt * D * N * L is kept below this by lowering D / G, then Bt (bounds the run time).
        layout_modes: layout modes to draw from (see the module docstring).
    """

    forms: Tuple[str, ...]
    dtypes: Tuple[str, ...]
    max_batch: int
    groups: Tuple[int, ...]
    max_channels_per_group: int
    d_states: Tuple[int, ...]
    lengths: Tuple[int, ...]
    max_length: int
    max_elements: int
    layout_modes: Tuple[str, ...] = LAYOUT_MODES


@dataclass(frozen=True)
class ScanCase(_CaseBase):
    """One selective scan call.

    Args:
        form: ``'state'`` (Spatial-Mamba: no C, no D, returns h) or ``'output'`` (VMamba: returns y).
        batch: Bt.
        channels: D (K*D of the multi-direction scans), a multiple of ``groups``.
        groups: G, groups of B/C.
        d_state: N.
        length: L.
        dtype: the dtype name of u, delta, B and C; A, D and delta_bias are float32 (float64 in float64 cases).
        shared_b: B passed as (Bt, N, L), the one-group layout (``groups`` is 1); else (Bt, G, N, L).
        shared_c: the same for C (output form only).
        with_d: pass D (the skip term; output form only).
        with_delta_bias: pass delta_bias.
        delta_softplus: apply softplus to delta + delta_bias; without it the step sizes are drawn positive.
        spikes: a few steps get delta + delta_bias near and above the softplus threshold of 20.
        layouts: (input name, layout) pairs; see the module docstring.
        seed: the seed of the values.
    """

    form: str
    batch: int
    channels: int
    groups: int
    d_state: int
    length: int
    dtype: str
    shared_b: bool
    shared_c: bool
    with_d: bool
    with_delta_bias: bool
    delta_softplus: bool
    spikes: bool
    layouts: Tuple[Tuple[str, str], ...]
    seed: int

    @property
    def out_shape(self) -> Tuple[int, ...]:
        if self.form == 'state':
            return (self.batch, self.channels, self.d_state, self.length)
        return (self.batch, self.channels, self.length)


CPU_SCAN = ScanBounds(forms=('state', 'output'), dtypes=('float64', 'float32', 'float16', 'bfloat16'), max_batch=2,
                      groups=(1, 2, 4, 8), max_channels_per_group=4, d_states=(1, 2, 3, 4, 16),
                      lengths=(1, 2, 3, 49, 129, 256, 257), max_length=300, max_elements=40_000)
# Lengths around the kernel's 256-step chunks and the models' L = H*W; N up to the kernel's 16.
GPU_SCAN = ScanBounds(forms=('state', 'output'), dtypes=('float32', 'float16', 'bfloat16'), max_batch=4,
                      groups=(1, 2, 4, 8), max_channels_per_group=48, d_states=(1, 2, 3, 4, 5, 8, 16),
                      lengths=(1, 2, 49, 129, 196, 255, 256, 257, 511, 512, 513, 784, 1023, 3136, 4096, 6000),
                      max_length=6000, max_elements=1 << 24)


def draw_scan_case(chooser: Chooser, bounds: ScanBounds) -> ScanCase:
    """A selective scan case drawn from ``bounds``: every flag combination the op accepts."""
    form = chooser.choice(bounds.forms)
    groups = chooser.choice(bounds.groups)
    shared_b = groups == 1 and chooser.choice((False, True))
    shared_c = groups == 1 and form == 'output' and chooser.choice((False, True))
    per_group = chooser.integer(1, bounds.max_channels_per_group)
    d_state = chooser.choice(bounds.d_states)
    length = _draw_size(chooser, bounds.lengths, bounds.max_length)
    batch = chooser.integer(1, bounds.max_batch)
    per_group = max(1, min(per_group, bounds.max_elements // (batch * groups * d_state * length)))
    batch = max(1, min(batch, bounds.max_elements // (per_group * groups * d_state * length)))
    dtype = chooser.choice(bounds.dtypes)
    with_d = form == 'output' and chooser.choice((False, True))
    with_delta_bias = chooser.choice((False, True))
    delta_softplus = chooser.choice((True, False))
    spikes = delta_softplus and chooser.choice((False, True))
    ranks = dict(u=3, delta=3, A=2, B=3 if shared_b else 4)
    if form == 'output':
        ranks['C'] = 3 if shared_c else 4
    if with_d:
        ranks['D'] = 1
    if with_delta_bias:
        ranks['delta_bias'] = 1
    layouts = _draw_layouts(chooser, bounds.layout_modes, ranks)
    return ScanCase(form=form, batch=batch, channels=groups * per_group, groups=groups, d_state=d_state,
                    length=length, dtype=dtype, shared_b=shared_b, shared_c=shared_c, with_d=with_d,
                    with_delta_bias=with_delta_bias, delta_softplus=delta_softplus, spikes=spikes, layouts=layouts,
                    seed=chooser.integer(0, MAX_SEED))


def _scan_values(case: ScanCase) -> Dict[str, Tensor]:
    """The values of a scan case, on the CPU: u, delta, B, C in the case's dtype, the parameters in float32/64.

    delta with softplus is N(-1, 1) (plus spikes), without it uniform in [0.01, 1) so that every step decays;
    A = -exp(U(-2, 1.5)); delta_bias is U(-4, 1) with softplus and U(0, 0.5) without; u, B, C, D are N(0, 1).
    """
    g = torch.Generator().manual_seed(case.seed)
    wide = torch.float64 if case.dtype == 'float64' else torch.float32
    bt, d, n, length = case.batch, case.channels, case.d_state, case.length
    groups_dims = {True: (), False: (case.groups, )}  # shared: (Bt, N, L), else (Bt, G, N, L)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=wide)

    def uniform(low, high, *shape):
        return torch.rand(*shape, generator=g, dtype=wide) * (high - low) + low

    if case.delta_softplus:
        delta = randn(bt, d, length) - 1
        if case.spikes:  # delta + delta_bias lands on both sides of the threshold
            spike = torch.rand(bt, d, length, generator=g) < 0.05
            delta = torch.where(spike, uniform(SOFTPLUS_THRESHOLD - 1, SOFTPLUS_THRESHOLD + 7, bt, d, length), delta)
    else:
        delta = uniform(0.01, 1.0, bt, d, length)
    values = dict(u=randn(bt, d, length), delta=delta, A=-torch.exp(uniform(-2.0, 1.5, d, n)),
                  B=randn(bt, *groups_dims[case.shared_b], n, length))
    if case.form == 'output':
        values['C'] = randn(bt, *groups_dims[case.shared_c], n, length)
    if case.with_d:
        values['D'] = randn(d)
    if case.with_delta_bias:
        values['delta_bias'] = uniform(-4.0, 1.0, d) if case.delta_softplus else uniform(0.0, 0.5, d)
    activations = ('u', 'delta', 'B', 'C')
    return {k: v.to(case.torch_dtype if k in activations else case.param_dtype) for k, v in values.items()}


# --------------------------------------------------------------------------------------------- depthwise conv
@dataclass(frozen=True)
class DWConvBounds:
    """The parameter space of depthwise conv cases.

    Args:
        dtypes: dtype names to draw from.
        max_batch: largest B.
        max_channels: largest C.
        sizes: special heights and widths, drawn half of the time.
        max_size: the other half, H and W are drawn from ``[1, max_size]``.
        kernel_sizes: odd kernel sizes k.
        max_dilation: largest dilation.
        max_reach: dilation * (k // 2) is kept at or below this (the kernel's shared-memory tile must fit).
        fp32_params: whether the weight and bias of fp16/bf16 cases are float32 (the kernel's and autocast's
            layout) or in x's dtype (what the reference's ``F.conv2d`` takes).
        layout_modes: layout modes to draw from (see the module docstring).
    """

    dtypes: Tuple[str, ...]
    max_batch: int
    max_channels: int
    sizes: Tuple[int, ...]
    max_size: int
    kernel_sizes: Tuple[int, ...]
    max_dilation: int
    max_reach: int
    fp32_params: Tuple[bool, ...]
    layout_modes: Tuple[str, ...] = LAYOUT_MODES


@dataclass(frozen=True)
class DWConvCase(_MapCase):
    """One ``dwconv2d`` call.

    Args:
        batch, channels, height, width: B, C, H, W of x.
        kernel_size: k (odd); the weight is (C, 1, k, k).
        dilation: spacing between taps.
        with_bias: pass a (C,) bias.
        padding_mode: ``'zeros'`` or ``'replicate'``.
        dtype: the dtype name of x.
        fp32_params: weight and bias in float32 rather than in x's dtype (float64 cases: float64 always).
        layouts: (input name, layout) pairs; see the module docstring.
        seed: the seed of the values.
    """

    kernel_size: int
    dilation: int
    with_bias: bool
    padding_mode: str
    fp32_params: bool

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of the weight and bias."""
        return super().param_dtype if self.fp32_params else self.torch_dtype


CPU_DWCONV = DWConvBounds(dtypes=('float64', 'float32', 'float16', 'bfloat16'), max_batch=2, max_channels=6,
                          sizes=(1, 2, 3, 7, 14), max_size=20, kernel_sizes=(1, 3, 5, 7, 9, 11), max_dilation=4,
                          max_reach=20, fp32_params=(False, ))
# Sizes around the kernel's 32x32 output tiles and the models' stage grids; k up to the kernel's 31.
GPU_DWCONV = DWConvBounds(dtypes=('float32', 'float16', 'bfloat16'), max_batch=3, max_channels=48,
                          sizes=(1, 2, 7, 14, 28, 31, 32, 33, 56, 64, 65, 100), max_size=130,
                          kernel_sizes=(1, 3, 5, 7, 9, 11, 13, 15, 21, 31), max_dilation=6, max_reach=60,
                          fp32_params=(True, ))


def draw_dwconv_case(chooser: Chooser, bounds: DWConvBounds) -> DWConvCase:
    """A depthwise conv case drawn from ``bounds``."""
    kernel_size = chooser.choice(bounds.kernel_sizes)
    max_dilation = bounds.max_dilation if kernel_size == 1 else min(bounds.max_dilation,
                                                                     bounds.max_reach // (kernel_size // 2))
    dilation = chooser.integer(1, max(1, max_dilation))
    with_bias = chooser.choice((False, True))
    ranks = dict(x=4, weight=4)
    if with_bias:
        ranks['bias'] = 1
    return DWConvCase(batch=chooser.integer(1, bounds.max_batch), channels=chooser.integer(1, bounds.max_channels),
                      height=_draw_size(chooser, bounds.sizes, bounds.max_size),
                      width=_draw_size(chooser, bounds.sizes, bounds.max_size), kernel_size=kernel_size,
                      dilation=dilation, with_bias=with_bias, padding_mode=chooser.choice(('zeros', 'replicate')),
                      dtype=chooser.choice(bounds.dtypes), fp32_params=chooser.choice(bounds.fp32_params),
                      layouts=_draw_layouts(chooser, bounds.layout_modes, ranks), seed=chooser.integer(0, MAX_SEED))


def _dwconv_values(case: DWConvCase) -> Dict[str, Tensor]:
    """x ~ N(0, 1) in the case's dtype; weight ~ N(0, 1) / k and bias ~ N(0, 1) in its ``param_dtype``."""
    g = torch.Generator().manual_seed(case.seed)
    wide = torch.float64 if case.dtype == 'float64' else torch.float32
    c, k = case.channels, case.kernel_size
    values = dict(x=torch.randn(*case.out_shape, generator=g, dtype=wide),
                  weight=torch.randn(c, 1, k, k, generator=g, dtype=wide) / k)
    if case.with_bias:
        values['bias'] = torch.randn(c, generator=g, dtype=wide)
    return {k: v.to(case.torch_dtype if k == 'x' else case.param_dtype) for k, v in values.items()}


# ----------------------------------------------------------------------------------------------- state fusion
@dataclass(frozen=True)
class FusionBounds:
    """The parameter space of state fusion cases (fields as in :class:`DWConvBounds`)."""

    dtypes: Tuple[str, ...]
    max_batch: int
    max_channels: int
    sizes: Tuple[int, ...]
    max_size: int
    layout_modes: Tuple[str, ...] = LAYOUT_MODES


@dataclass(frozen=True)
class FusionCase(_MapCase):
    """One ``state_fusion`` call.

    Args:
        batch, channels, height, width: B, C, H, W of h.
        padding_mode: ``'replicate'`` or ``'zeros'``.
        dtype: the dtype name of h; the kernels and alpha are float32 (float64 in float64 cases).
        layouts: (input name, layout) pairs; see the module docstring.
        seed: the seed of the values.
    """

    padding_mode: str


FUSION_KERNELS = ('kernel_3', 'kernel_3_1', 'kernel_3_2')
CPU_FUSION = FusionBounds(dtypes=('float64', 'float32', 'float16', 'bfloat16'), max_batch=2, max_channels=6,
                          sizes=(1, 2, 5, 6, 11, 14), max_size=24)
GPU_FUSION = FusionBounds(dtypes=('float32', 'float16', 'bfloat16'), max_batch=3, max_channels=64,
                          sizes=(1, 2, 5, 7, 14, 28, 31, 32, 33, 56, 64, 65), max_size=130)


def draw_fusion_case(chooser: Chooser, bounds: FusionBounds) -> FusionCase:
    """A state fusion case drawn from ``bounds``."""
    ranks = dict(h=4, kernel_3=4, kernel_3_1=4, kernel_3_2=4, alpha=1)
    return FusionCase(batch=chooser.integer(1, bounds.max_batch), channels=chooser.integer(1, bounds.max_channels),
                      height=_draw_size(chooser, bounds.sizes, bounds.max_size),
                      width=_draw_size(chooser, bounds.sizes, bounds.max_size),
                      padding_mode=chooser.choice(('replicate', 'zeros')), dtype=chooser.choice(bounds.dtypes),
                      layouts=_draw_layouts(chooser, bounds.layout_modes, ranks), seed=chooser.integer(0, MAX_SEED))


def _fusion_values(case: FusionCase) -> Dict[str, Tensor]:
    """h ~ N(0, 1) in the case's dtype; kernels ~ 0.3 N(0, 1) and alpha ~ N(0, 1) in float32 (float64)."""
    g = torch.Generator().manual_seed(case.seed)
    wide = case.param_dtype
    values = dict(h=torch.randn(*case.out_shape, generator=g, dtype=wide).to(case.torch_dtype))
    for name in FUSION_KERNELS:
        values[name] = torch.randn(case.channels, 1, 3, 3, generator=g, dtype=wide) * 0.3
    values['alpha'] = torch.randn(len(FUSION_DILATIONS), generator=g, dtype=wide)
    return values


# ------------------------------------------------------------------------------------------------- cross scan
@dataclass(frozen=True)
class CrossBounds:
    """The parameter space of :func:`vssm.ops.cross_selective_scan` cases (its Triton kernel against the reference).

    Args:
        dtypes: dtype names of x (the parameters are float32).
        max_batch: largest B.
        max_channels: largest D.
        sizes: special map heights and widths, drawn half of the time; else from ``[1, max_size]``.
        max_size: largest height or width.
        ranks: ranks R of the step sizes.
        d_states: state sizes N.
        sequences: numbers K of sequences of the per-image orders (VMamba's cross scan has K = 4).
        max_elements: B * D * K * L is kept below this by lowering D, then B.
    """

    dtypes: Tuple[str, ...]
    max_batch: int
    max_channels: int
    sizes: Tuple[int, ...]
    max_size: int
    ranks: Tuple[int, ...]
    d_states: Tuple[int, ...]
    sequences: Tuple[int, ...]
    max_elements: int
    layout_modes: Tuple[str, ...] = LAYOUT_MODES


@dataclass(frozen=True)
class CrossCase(_MapCase):
    """One cross_selective_scan call.

    Args:
        batch, channels, height, width: x is (B, D, H * W).
        order: ``'cross'`` (VMamba's four directions), ``'permutations'`` (random orders, as Spectral VMamba's) or
            ``'maps'`` (random index maps that repeat and skip tokens; cross-form cases only).
        per_image: the permutations or maps differ per image (index (B, K, L)) rather than shared ((1, K, L)).
        sequences: K.
        rank: R; ``d_state``: N.
        dtype: x's dtype name.
        layouts: (input name, layout) pairs (x only).
        seed: the seed of the values.
        form: the CUDA scan's cross form against the composition (else the Triton kernel); both forward and
            backward.
    """

    order: str
    per_image: bool
    sequences: int
    rank: int
    d_state: int
    form: bool = False

    @property
    def out_shape(self) -> Tuple[int, ...]:
        return (self.batch, self.channels, self.height * self.width)


# Map sides around the kernel's 16- to 64-step chunks and the models' stage sizes; ranks of VMamba-T to B's stages.
GPU_CROSS = CrossBounds(dtypes=('float32', 'float16', 'bfloat16'), max_batch=3, max_channels=100,
                        sizes=(1, 2, 7, 8, 14, 15, 28, 56), max_size=60, ranks=(1, 2, 6, 12, 24, 48, 64),
                        d_states=(1, 2, 4, 16), sequences=(1, 2, 4, 8), max_elements=1 << 22)


def draw_cross_case(chooser: Chooser, bounds: CrossBounds, form: bool = False) -> CrossCase:
    """A cross-scan case drawn from ``bounds`` (``form``: for the CUDA scan's cross form, index maps that are not
    permutations included)."""
    order = chooser.choice(('cross', 'permutations', 'maps') if form else ('cross', 'permutations'))
    per_image = order != 'cross' and chooser.choice((False, True))
    sequences = 4 if order == 'cross' else chooser.choice(bounds.sequences)
    height = _draw_size(chooser, bounds.sizes, bounds.max_size)
    width = _draw_size(chooser, bounds.sizes, bounds.max_size)
    batch = chooser.integer(1, bounds.max_batch)
    channels = chooser.integer(1, bounds.max_channels)
    per_position = sequences * height * width
    channels = max(1, min(channels, bounds.max_elements // (batch * per_position)))
    batch = max(1, min(batch, bounds.max_elements // (channels * per_position)))
    return CrossCase(batch=batch, channels=channels, height=height, width=width, order=order, per_image=per_image,
                     sequences=sequences, rank=chooser.choice(bounds.ranks), d_state=chooser.choice(bounds.d_states),
                     dtype=chooser.choice(bounds.dtypes),
                     layouts=_draw_layouts(chooser, bounds.layout_modes, dict(x=3)),
                     seed=chooser.integer(0, MAX_SEED), form=form)


def draw_cross_form_case(chooser: Chooser, bounds: CrossBounds) -> CrossCase:
    """A cross-scan case for the CUDA scan's cross form."""
    return draw_cross_case(chooser, bounds, form=True)


def _cross_values(case: CrossCase) -> Dict[str, Tensor]:
    """x ~ N(0, 1) in the case's dtype; the index maps and their inverses (int64); x_proj ~ N(0, 1/D), dt_weight
    ~ N(0, 1/R), dt_bias ~ U(-6, -2) (VMamba's initial step sizes), A = -exp(U(-2, 1.5)), Ds ~ N(0, 1) (float32)."""
    from vssm.models.vmamba import cross_scan_index
    g = torch.Generator().manual_seed(case.seed)
    wide = case.param_dtype
    b, d, k, n, r = case.batch, case.channels, case.sequences, case.d_state, case.rank
    length = case.height * case.width
    rows = b if case.per_image else 1
    maps = {}
    if case.order == 'cross':
        index, inverse = cross_scan_index(case.height, case.width, torch.device('cpu'))
    elif case.order == 'maps':  # no inverse: the composition adds repeated tokens with index_add
        index = torch.randint(0, length, (rows, k, length), generator=g)
    else:
        index = torch.stack([torch.stack([torch.randperm(length, generator=g) for _ in range(k)])
                             for _ in range(rows)])
        inverse = inverse_permutation(index)
    if case.order != 'maps':
        maps['inverse'] = inverse.clone()

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=wide)

    return dict(x=randn(b, d, length).to(case.torch_dtype), index=index.clone(), **maps,
                x_proj_weight=randn(k, r + 2 * n, d) / d**0.5, dt_weight=randn(k, d, r) / r**0.5,
                dt_bias=torch.rand(k, d, generator=g, dtype=wide) * 4 - 6,
                A=-torch.exp(torch.rand(k * d, n, generator=g, dtype=wide) * 3.5 - 2), Ds=randn(k * d))


# ------------------------------------------------------------------------------------ Triton elementwise ops
@dataclass(frozen=True)
class ElementwiseBounds:
    """The parameter space of the Triton elementwise ops' cases: LayerNorm (maps and rows of channels), bias + GELU,
    the residual add and the token merge.

    Args:
        dtypes: dtype names of the maps (the weights and biases are float32, float64 in float64 cases).
        max_batch: largest B.
        channels: special channel counts (the kernels' tile and chunk limits, the models' widths), drawn half of the
            time.
        max_channels: the other half, C is drawn from ``[1, max_channels]``.
        sizes: special heights and widths, drawn half of the time.
        max_size: the other half, H and W are drawn from ``[1, max_size]``.
        max_elements: B * C * H * W (times K for the token merge) is kept below this by lowering C, then B.
        sequences: numbers K of sequences (token merge only; VMamba's four directions always have K = 4).
        layout_modes: layout modes to draw from (see the module docstring).
    """

    dtypes: Tuple[str, ...]
    max_batch: int
    channels: Tuple[int, ...]
    max_channels: int
    sizes: Tuple[int, ...]
    max_size: int
    max_elements: int
    sequences: Tuple[int, ...] = (1, 2, 4, 8)
    layout_modes: Tuple[str, ...] = LAYOUT_MODES


# Small maps for the references on the CPU (every elementwise op).
CPU_ELEMENTWISE = ElementwiseBounds(dtypes=('float64', 'float32', 'float16', 'bfloat16'), max_batch=3,
                                    channels=(1, 2, 3, 8), max_channels=12, sizes=(1, 2, 3, 5), max_size=7,
                                    max_elements=2000)


def _draw_map(chooser: Chooser, bounds: ElementwiseBounds, per_element: int = 1) -> Tuple[int, int, int, int]:
    """(B, C, H, W) with B * C * H * W * ``per_element`` at most ``bounds.max_elements`` (C lowered first, then B;
    1 x 1 x H x W at least)."""
    channels = _draw_size(chooser, bounds.channels, bounds.max_channels)
    height = _draw_size(chooser, bounds.sizes, bounds.max_size)
    width = _draw_size(chooser, bounds.sizes, bounds.max_size)
    batch = chooser.integer(1, bounds.max_batch)
    per_image = height * width * per_element
    channels = max(1, min(channels, bounds.max_elements // (batch * per_image)))
    batch = max(1, min(batch, bounds.max_elements // (channels * per_image)))
    return batch, channels, height, width


@dataclass(frozen=True)
class LayerNormCase(_MapCase):
    """One :func:`vssm.ops.layer_norm_2d` call on a (B, C, H, W) map, or one :func:`vssm.ops.layer_norm_last` call
    on (B, H * W, C) rows of channels (``last``).

    Args:
        last: ``layer_norm_last`` (rows of channels) rather than ``layer_norm_2d``.
        batch, channels, height, width: B, C, H, W.
        eps: added to the variance.
        out_dtype: the dtype name passed as ``out_dtype`` (the dtype of the GEMM that follows), None for the default
            (x's dtype).
        dtype: x's dtype name; the weight and bias are float32 (float64 in float64 cases).
        layouts: (input name, layout) pairs; see the module docstring.
        seed: the seed of the values.
    """

    last: bool
    eps: float
    out_dtype: Optional[str]

    @property
    def out_shape(self) -> Tuple[int, ...]:
        if self.last:
            return (self.batch, self.height * self.width, self.channels)
        return (self.batch, self.channels, self.height, self.width)

    @property
    def torch_out_dtype(self) -> torch.dtype:
        """The output's dtype: ``out_dtype``'s, else x's."""
        return self.torch_dtype if self.out_dtype is None else DTYPES[self.out_dtype]


# Channels across the forward's single tile (up to 2048) and the backward's (up to 1024; wider maps go in chunks of
# 128), one channel, the models' widths; pixels per image across the kernel's 4- to 64-pixel tiles.
GPU_LAYER_NORM = ElementwiseBounds(dtypes=('float32', 'float16', 'bfloat16'), max_batch=4,
                                   channels=(1, 2, 3, 64, 96, 192, 255, 256, 257, 384, 768, 1023, 1024, 1025, 1300,
                                             2048, 2049, 2100),
                                   max_channels=2200, sizes=(1, 2, 3, 7, 14, 28, 56, 64, 65), max_size=100,
                                   max_elements=1 << 21)
# Rows of up to layer_norm_last's KERNEL_MAX_CHANNELS_LAST (256) channels (wider rows take the reference).
GPU_LAYER_NORM_LAST = dataclasses.replace(GPU_LAYER_NORM, max_batch=8,
                                          channels=(1, 2, 3, 7, 32, 64, 96, 128, 129, 192, 255, 256),
                                          max_channels=layer_norm.KERNEL_MAX_CHANNELS_LAST)


def draw_layer_norm_case(chooser: Chooser, bounds: ElementwiseBounds, last: bool = False) -> LayerNormCase:
    """A ``layer_norm_2d`` case (``last``: a ``layer_norm_last`` case) drawn from ``bounds``."""
    batch, channels, height, width = _draw_map(chooser, bounds)
    dtype = chooser.choice(bounds.dtypes)
    return LayerNormCase(last=last, batch=batch, channels=channels, height=height, width=width,
                         eps=chooser.choice((1e-5, 1e-6)), out_dtype=chooser.choice((None, *bounds.dtypes)),
                         dtype=dtype, layouts=_draw_layouts(chooser, bounds.layout_modes,
                                                            dict(x=3 if last else 4, weight=1, bias=1)),
                         seed=chooser.integer(0, MAX_SEED))


def draw_layer_norm_last_case(chooser: Chooser, bounds: ElementwiseBounds) -> LayerNormCase:
    """A ``layer_norm_last`` case: rows of channels."""
    return draw_layer_norm_case(chooser, bounds, last=True)


def _layer_norm_values(case: LayerNormCase) -> Dict[str, Tensor]:
    """x ~ N(3, 4) (off-centre, as in tests/ops/test_layer_norm_2d.py) in the case's dtype; weight, bias ~ N(0, 1)
    in float32 (float64)."""
    g = torch.Generator().manual_seed(case.seed)
    wide = case.param_dtype
    x = torch.randn(*case.out_shape, generator=g, dtype=wide) * 2 + 3
    return dict(x=x.to(case.torch_dtype), weight=torch.randn(case.channels, generator=g, dtype=wide),
                bias=torch.randn(case.channels, generator=g, dtype=wide))


@contextmanager
def _layer_norm_kernel_everywhere() -> Iterator[None]:
    """``layer_norm_2d`` takes its kernel on every map inside, with gradients too (its dispatch takes the kernel for
    a forward with gradients only where the kernel's backward was faster: ``KERNEL_MAX_CHANNELS``,
    ``KERNEL_MIN_PIXELS``); as tests/ops/test_layer_norm_2d.py sets them. The choice is made in the forward, so the
    backward that follows outside still runs the kernel's. Process-wide, like the module attributes."""
    saved = layer_norm.KERNEL_MAX_CHANNELS, layer_norm.KERNEL_MIN_PIXELS
    layer_norm.KERNEL_MAX_CHANNELS, layer_norm.KERNEL_MIN_PIXELS = 1 << 30, 0
    try:
        yield
    finally:
        layer_norm.KERNEL_MAX_CHANNELS, layer_norm.KERNEL_MIN_PIXELS = saved


@dataclass(frozen=True)
class BiasGeluCase(_MapCase):
    """One :func:`vssm.ops.bias_gelu` call.

    Args:
        batch, channels, height, width: B, C, H, W of h.
        dtype: h's dtype name; the bias is float32 (float64 in float64 cases), as fc1's under autocast.
        layouts: (input name, layout) pairs; see the module docstring.
        seed: the seed of the values.
    """


# Rows (one image's channel) of 1 to 16900 pixels: shorter than the kernels' 1024-pixel blocks (several rows per
# program), 32 x 32 = 1024 exactly, longer (several blocks per row, the last one partial); one channel up to an MLP's
# 4 x 384; B * C up to about 25000 rows.
GPU_BIAS_GELU = ElementwiseBounds(dtypes=('float32', 'float16', 'bfloat16'), max_batch=16,
                                  channels=(1, 2, 3, 96, 192, 384, 768, 1536), max_channels=1600,
                                  sizes=(1, 2, 3, 7, 14, 28, 31, 32, 33, 56, 64, 65), max_size=130,
                                  max_elements=1 << 22)


def draw_bias_gelu_case(chooser: Chooser, bounds: ElementwiseBounds) -> BiasGeluCase:
    """A ``bias_gelu`` case drawn from ``bounds``."""
    batch, channels, height, width = _draw_map(chooser, bounds)
    return BiasGeluCase(batch=batch, channels=channels, height=height, width=width,
                        dtype=chooser.choice(bounds.dtypes),
                        layouts=_draw_layouts(chooser, bounds.layout_modes, dict(h=4, bias=1)),
                        seed=chooser.integer(0, MAX_SEED))


def _bias_gelu_values(case: BiasGeluCase) -> Dict[str, Tensor]:
    """h ~ N(0, 4) (as in tests/ops/test_bias_gelu.py) in the case's dtype; bias ~ N(0, 1) in float32 (float64)."""
    g = torch.Generator().manual_seed(case.seed)
    wide = case.param_dtype
    return dict(h=(torch.randn(*case.out_shape, generator=g, dtype=wide) * 2).to(case.torch_dtype),
                bias=torch.randn(case.channels, generator=g, dtype=wide))


RESIDUAL_FORMS = ('nchw', 'nhwc', 'tokens')
DROP_PROBS = (0.1, 0.3, 0.5)  # keep probabilities 0.9, 0.7 (1 / keep inexact in float32) and 0.5


@dataclass(frozen=True)
class ResidualCase(_MapCase):
    """One :func:`vssm.ops.add_residual` call: ``x + drop_path(y + bias)``.

    Args:
        form: ``'nchw'`` ((B, C, H, W) maps: VMamba's and Spectral VMamba's blocks), ``'nhwc'`` ((B, H, W, C)
            maps, as Spatial-Mamba's) or ``'tokens'`` ((B, H * W, C)).
        batch, channels, height, width: B, C, H, W.
        with_bias: pass a (C,) bias (``'nchw'`` only: the op adds it over the channels of (B, C, H, W) maps).
        drop_prob: a DropPath of this probability in training (mmcv's, as the models'); 0 for none.
        float32_stream: x (the residual stream) is float32 whatever y's dtype (autocast's layout); else x's dtype is
            y's.
        dtype: y's dtype name (the branch's output); the bias is float32 (float64 in float64 cases).
        layouts: (input name, layout) pairs; see the module docstring.
        seed: the seed of the values and of the keep mask.
    """

    form: str
    with_bias: bool
    drop_prob: float
    float32_stream: bool

    @property
    def out_shape(self) -> Tuple[int, ...]:
        b, c, h, w = self.batch, self.channels, self.height, self.width
        return dict(nchw=(b, c, h, w), nhwc=(b, h, w, c), tokens=(b, h * w, c))[self.form]

    @property
    def stream_dtype(self) -> torch.dtype:
        """x's dtype."""
        return torch.float32 if self.float32_stream else self.torch_dtype


GPU_RESIDUAL = GPU_BIAS_GELU  # the same row tiles as bias_gelu's kernels


def draw_residual_case(chooser: Chooser, bounds: ElementwiseBounds) -> ResidualCase:
    """An ``add_residual`` case drawn from ``bounds``: every combination of form, bias, DropPath and stream dtype the
    op accepts."""
    with_bias = chooser.choice((False, True))  # VMamba's blocks' usual form: half of the cases
    form = 'nchw' if with_bias else chooser.choice(RESIDUAL_FORMS)
    drop_prob = chooser.choice(DROP_PROBS) if chooser.choice((False, True)) else 0.
    dtype = chooser.choice(bounds.dtypes)
    float32_stream = dtype != 'float32' and chooser.choice((True, False))
    batch, channels, height, width = _draw_map(chooser, bounds)
    rank = 3 if form == 'tokens' else 4
    ranks = dict(x=rank, y=rank, **(dict(bias=1) if with_bias else {}))
    return ResidualCase(form=form, batch=batch, channels=channels, height=height, width=width, with_bias=with_bias,
                        drop_prob=drop_prob, float32_stream=float32_stream, dtype=dtype,
                        layouts=_draw_layouts(chooser, bounds.layout_modes, ranks), seed=chooser.integer(0, MAX_SEED))


def _residual_values(case: ResidualCase) -> Dict[str, Tensor]:
    """x ~ N(0, 1) in the stream's dtype, y ~ N(0, 1) in the case's dtype, bias ~ N(0, 1) in float32 (float64)."""
    g = torch.Generator().manual_seed(case.seed)
    wide = case.param_dtype
    values = dict(x=torch.randn(*case.out_shape, generator=g, dtype=wide).to(case.stream_dtype),
                  y=torch.randn(*case.out_shape, generator=g, dtype=wide).to(case.torch_dtype))
    if case.with_bias:
        values['bias'] = torch.randn(case.channels, generator=g, dtype=wide)
    return values


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The default random generator of ``device`` seeded with ``seed`` inside, its state restored after: DropPath's
    keep mask is drawn from it, so the kernel and the reference drop the same images (as tests/ops/test_residual.py
    seeds both calls)."""
    with torch.random.fork_rng(devices=[device.index] if device.type == 'cuda' else []):
        generator = torch.cuda.default_generators[device.index] if device.type == 'cuda' else torch.default_generator
        generator.manual_seed(seed)
        yield


@dataclass(frozen=True)
class TokenMergeCase(_MapCase):
    """One :func:`vssm.ops.scatter_tokens` call with the inverse permutations: the K sequences added back onto the
    tokens (the merge kernel; its backward the gather kernel).

    Args:
        batch, sequences, channels: B, K, D of y (B, K, D, L).
        height, width: the map; L = H * W.
        order: ``'cross'`` (VMamba's four directions, one index for the batch) or ``'permutations'`` (random
            orders, as Spectral VMamba's).
        per_image: the permutations differ per image (index (B, K, L)) rather than shared ((1, K, L)).
        dtype: y's dtype name.
        layouts: (input name, layout) pairs (y only; the index maps are contiguous).
        seed: the seed of the values.
    """

    sequences: int
    order: str
    per_image: bool

    @property
    def length(self) -> int:
        return self.height * self.width

    @property
    def out_shape(self) -> Tuple[int, ...]:
        return (self.batch, self.channels, self.length)


# Token counts across the kernel's 16- to 256-token tiles (and one token), channels across its 8- to 64-channel tiles.
GPU_TOKEN_MERGE = ElementwiseBounds(dtypes=('float32', 'float16', 'bfloat16'), max_batch=4,
                                    channels=(1, 2, 3, 8, 9, 96, 192, 384), max_channels=400,
                                    sizes=(1, 2, 7, 8, 14, 15, 16, 17, 28, 56), max_size=60, max_elements=1 << 22)


def draw_token_merge_case(chooser: Chooser, bounds: ElementwiseBounds) -> TokenMergeCase:
    """A token merge case drawn from ``bounds``."""
    order = chooser.choice(('cross', 'permutations'))
    per_image = order != 'cross' and chooser.choice((False, True))
    sequences = 4 if order == 'cross' else chooser.choice(bounds.sequences)
    batch, channels, height, width = _draw_map(chooser, bounds, per_element=sequences)
    return TokenMergeCase(batch=batch, sequences=sequences, channels=channels, height=height, width=width, order=order,
                          per_image=per_image, dtype=chooser.choice(bounds.dtypes),
                          layouts=_draw_layouts(chooser, bounds.layout_modes, dict(y=4)),
                          seed=chooser.integer(0, MAX_SEED))


def _token_merge_values(case: TokenMergeCase) -> Dict[str, Tensor]:
    """y ~ N(0, 1) in the case's dtype; the index maps and their inverses (int64)."""
    from vssm.models.vmamba import cross_scan_index
    g = torch.Generator().manual_seed(case.seed)
    length = case.length
    if case.order == 'cross':
        index, inverse = cross_scan_index(case.height, case.width, torch.device('cpu'))
    else:
        rows = case.batch if case.per_image else 1
        index = torch.stack([torch.stack([torch.randperm(length, generator=g) for _ in range(case.sequences)])
                             for _ in range(rows)])
        inverse = inverse_permutation(index)
    y = torch.randn(case.batch, case.sequences, case.channels, length, generator=g, dtype=case.param_dtype)
    return dict(y=y.to(case.torch_dtype), index=index.clone(), inverse=inverse.clone())


# ------------------------------------------------------------------------------------------------------ shared
Case = Union[ScanCase, DWConvCase, FusionCase, CrossCase, LayerNormCase, BiasGeluCase, ResidualCase, TokenMergeCase]
_CASE_VALUES: Dict[type, Callable[..., Dict[str, Tensor]]] = {
    ScanCase: _scan_values, DWConvCase: _dwconv_values, FusionCase: _fusion_values, CrossCase: _cross_values,
    LayerNormCase: _layer_norm_values, BiasGeluCase: _bias_gelu_values, ResidualCase: _residual_values,
    TokenMergeCase: _token_merge_values,
}
_CASE_NAMES = ', '.join(t.__name__ for t in _CASE_VALUES)  # for the error messages


def with_layout(values: Tensor, layout: str) -> Tensor:
    """``values`` stored with ``layout`` (see the module docstring); a new tensor, never a view of ``values``."""
    if layout == 'contiguous':
        return values.clone(memory_format=torch.contiguous_format)
    if layout == 'expanded':
        return values[:1].clone().expand(values.shape)
    if layout == 'transposed' and values.dim() >= 2:
        swapped = values.new_empty(*values.shape[:-2], values.shape[-1], values.shape[-2])  # (..., last, -2)
        return swapped.transpose(-1, -2).copy_(values)
    if layout == 'sliced':
        wide = torch.full((*values.shape[:-1], 2 * values.shape[-1]), float('nan'), dtype=values.dtype,
                          device=values.device)  # (..., 2 * last)
        return wide[..., 1::2].copy_(values)
    if layout == 'channels_last' and values.dim() == 4:
        return values.clone(memory_format=torch.channels_last)
    raise ValueError(f'Layout {layout!r} does not apply to a {values.dim()}-D tensor; use one of {LAYOUTS}.')


def make_inputs(case: Case, device: Union[str, torch.device] = 'cpu') -> Dict[str, Tensor]:
    """The op's tensor arguments for ``case``, by name, on ``device``, each stored with its layout.

    The values depend only on the case (they are drawn on the CPU from its seed), not on the device.
    """
    values_of = _CASE_VALUES.get(type(case))
    if values_of is None:
        raise TypeError(f'make_inputs: expected one of {_CASE_NAMES}, got {type(case).__name__}.')
    values = values_of(case)
    return {name: with_layout(v.to(device), case.layout(name)) for name, v in values.items()}


def call_op(case: Case, inputs: Dict[str, Tensor], backend: str) -> Tensor:
    """Run the case's op on ``inputs`` (as :func:`make_inputs` returns them, maybe cast) with its flags."""
    if isinstance(case, ScanCase):
        return selective_scan(**inputs, delta_softplus=case.delta_softplus, backend=backend)
    if isinstance(case, DWConvCase):
        return dwconv2d(**inputs, dilation=case.dilation, padding_mode=case.padding_mode, backend=backend)
    if isinstance(case, FusionCase):
        return state_fusion(**inputs, padding_mode=case.padding_mode, backend=backend)
    if isinstance(case, CrossCase):
        args = dict(inputs)
        x, index = args.pop('x'), args.pop('index')
        if case.form:  # the CUDA scan's cross form (any backend but 'torch'), no Triton kernel
            with triton_fusions(False), cross_form_switch(True):
                return cross_selective_scan(x, index, **args, backend=backend)
        with triton_fusions(backend != 'torch'):  # the Triton kernel under VSSM_TRITON_FUSIONS=1
            return cross_selective_scan(x, index, **args, backend='auto' if backend == 'cuda' else backend)
    # The Triton elementwise ops: their kernels under VSSM_TRITON_FUSIONS=1 whatever the environment says.
    if isinstance(case, LayerNormCase):
        norm = layer_norm_last if case.last else layer_norm_2d
        out_dtype = None if case.out_dtype is None else DTYPES[case.out_dtype]
        with triton_fusions(backend != 'torch'), _layer_norm_kernel_everywhere():
            return norm(**inputs, eps=case.eps, out_dtype=out_dtype, backend=backend)
    if isinstance(case, BiasGeluCase):
        with triton_fusions(backend != 'torch'):
            return bias_gelu(**inputs, backend=backend)
    if isinstance(case, ResidualCase):
        drop_path = DropPath(case.drop_prob).train() if case.drop_prob else None
        with triton_fusions(backend != 'torch'), _seeded(case.seed, inputs['y'].device):  # the same keep mask
            return add_residual(inputs['x'], inputs['y'], drop_path, inputs.get('bias'), backend=backend)
    if isinstance(case, TokenMergeCase):
        with triton_fusions(backend != 'torch'):
            return scatter_tokens(inputs['y'], inputs['index'], case.length, inputs['inverse'], backend=backend)
    raise TypeError(f'call_op: expected one of {_CASE_NAMES}, got {type(case).__name__}.')


def grad_output(case: Case, dtype: torch.dtype, device: Union[str, torch.device] = 'cpu') -> Tensor:
    """N(0, 1) incoming gradient of the op's output, ``case.out_shape``, rounded to ``dtype``, in float64.

    Rounding to the dtype of the op's output lets every implementation receive the very same numbers.
    """
    g = torch.Generator().manual_seed(case.seed + 1)  # not the inputs' stream
    return torch.randn(*case.out_shape, generator=g, dtype=torch.float64).to(dtype).double().to(device)


# ----------------------------------------------------------------------------------- kernels against references
# op name -> (draw function, GPU bounds, whether its kernel is built)
KERNEL_OPS: Dict[str, Tuple[Callable, object, Callable[[], bool]]] = {
    'scan-state': (draw_scan_case, dataclasses.replace(GPU_SCAN, forms=('state', )), scan_kernel_available),
    'scan-output': (draw_scan_case, dataclasses.replace(GPU_SCAN, forms=('output', )), scan_kernel_available),
    'dwconv2d': (draw_dwconv_case, GPU_DWCONV, dwconv_kernel_available),
    'state-fusion': (draw_fusion_case, GPU_FUSION, dwconv_kernel_available),
    'cross-scan': (draw_cross_case, GPU_CROSS, cross_kernel_available),
    'cross-form': (draw_cross_form_case, GPU_CROSS, cross_form_available),
    'layer-norm-2d': (draw_layer_norm_case, GPU_LAYER_NORM, layer_norm_kernel_available),
    'layer-norm-last': (draw_layer_norm_last_case, GPU_LAYER_NORM_LAST, layer_norm_kernel_available),
    'bias-gelu': (draw_bias_gelu_case, GPU_BIAS_GELU, bias_gelu_kernel_available),
    'add-residual': (draw_residual_case, GPU_RESIDUAL, residual_kernel_available),
    'token-merge': (draw_token_merge_case, GPU_TOKEN_MERGE, lambda: token_maps._KERNEL is not None),
}

# max|kernel - reference| / max|reference|, the values of tests/ops/test_selective_scan_cuda.py and
# test_dwconv2d_cuda.py. Scan: both accumulate in float32 from the same rounded inputs, whatever their dtype; the
# gradients of u, delta, B and C are rounded to that dtype; A, D and delta_bias get float32 sums over Bt and L.
SCAN_OUT_TOL = 2e-5
SCAN_GRAD_TOL = {'float32': 5e-5, 'float16': 2e-3, 'bfloat16': 1e-2}
SCAN_PARAM_GRAD_TOL = 5e-4
# Depthwise conv and state fusion against float32 references: the output and the input's gradient are in the input's
# dtype; weight, bias, the fusion's kernels and alpha get float32 sums over B x H x W.
CONV_TOL = {'float32': 1e-5, 'float16': 2e-3, 'bfloat16': 1e-2}
CONV_PARAM_GRAD_TOL = 1e-4
# Cross scan: both paths round the GEMMs' outputs (projections, step sizes) to x's dtype; they accumulate in different
# orders (the kernel's projections on the raster map, its step sizes with tl.dot, atomics), so a rounding step of
# the 16-bit dtype can differ, and every later value follows it.
CROSS_TOL = {'float32': 1e-4, 'float16': 1e-2, 'bfloat16': 5e-2}
ACTIVATIONS = ('u', 'delta', 'B', 'C', 'x', 'h')
# The Triton elementwise ops: the (rtol, atol) of their own GPU tests' assert_close, conftest.TOLERANCES for outputs
# and conftest.GRAD_TOLERANCES for gradients (tests/ops/test_layer_norm_2d.py, test_bias_gelu.py, test_residual.py),
# and test_token_maps.py's for the merge. Their errors are measured against max(max|reference|, 1) (error_floor), and
# there each is rtol + atol: |kernel - reference| <= atol + rtol |reference| elementwise bounds max|kernel -
# reference| by (rtol + atol) max(max|reference|, 1) (test_layer_norm_2d.py scales atol by max(max|reference|, 1)).
# The residual's x gradient is the output's, exactly (test_residual.py: rtol = atol = 0).
MERGE_TOL = {'float32': (1e-6, 1e-6), 'float16': (1e-2, 1e-2), 'bfloat16': (1e-2, 1e-2)}


def _summed(rtol_atol: Tuple[float, float]) -> float:
    return rtol_atol[0] + rtol_atol[1]


def op_name(case: Case) -> str:
    """The :data:`KERNEL_OPS` name of a case's op."""
    if isinstance(case, ScanCase):
        return f'scan-{case.form}'
    if isinstance(case, CrossCase):
        return 'cross-form' if case.form else 'cross-scan'
    if isinstance(case, LayerNormCase):
        return 'layer-norm-last' if case.last else 'layer-norm-2d'
    names = {BiasGeluCase: 'bias-gelu', ResidualCase: 'add-residual', TokenMergeCase: 'token-merge',
             DWConvCase: 'dwconv2d', FusionCase: 'state-fusion'}
    return names[type(case)]


def tolerance(case: Case, name: str) -> float:
    """The tolerance of the output (``name='out'``) or of the gradient of input ``name``."""
    if isinstance(case, ScanCase):
        if name == 'out':
            return SCAN_OUT_TOL
        return SCAN_GRAD_TOL[case.dtype] if name in ACTIVATIONS else SCAN_PARAM_GRAD_TOL
    if isinstance(case, CrossCase):
        return CROSS_TOL[case.dtype]
    if isinstance(case, LayerNormCase):
        # The gradients keyed by x's dtype, as in its test; the output by out_dtype, or for layer_norm_last by the
        # coarser of the two: its fallback for non-contiguous rows rounds to x's dtype before casting to out_dtype.
        if name == 'out':
            coarser = max(case.torch_dtype, case.torch_out_dtype, key=lambda t: torch.finfo(t).eps)
            return _summed(TOLERANCES[coarser if case.last else case.torch_out_dtype])
        return _summed(GRAD_TOLERANCES[case.torch_dtype])
    if isinstance(case, (BiasGeluCase, ResidualCase)):  # keyed by h's / y's dtype
        if isinstance(case, ResidualCase) and name == 'x':
            return 0.
        return _summed((TOLERANCES if name == 'out' else GRAD_TOLERANCES)[case.torch_dtype])
    if isinstance(case, TokenMergeCase):
        return _summed(MERGE_TOL[case.dtype])
    return CONV_TOL[case.dtype] if name in ('out', *ACTIVATIONS) else CONV_PARAM_GRAD_TOL


def rel_err(got: Tensor, expected: Tensor, floor: float = 0.) -> float:
    """max|expected - got| / max(max|expected|, floor); ``inf`` where either holds NaN or inf."""
    got, expected = got.detach().double(), expected.detach().double()
    err = ((got - expected).abs().max() / expected.abs().max().clamp_min(max(floor, 1e-30))).item()
    return err if math.isfinite(err) else math.inf


def error_floor(case: Case) -> float:
    """The least scale :func:`compare_case` measures a case's errors against (:func:`rel_err`'s ``floor``): 1 for the
    Triton elementwise ops, whose GPU tests' atol is absolute (or scaled by max(max|reference|, 1)), so that a
    gradient that vanishes but for rounding (LayerNorm's x gradient of 2 channels) compares as the tests compare it; 0
    (purely relative) for the others."""
    return 1. if isinstance(case, (LayerNormCase, BiasGeluCase, ResidualCase, TokenMergeCase)) else 0.


@dataclass
class CaseResult:
    """One case's comparison.

    Args:
        case: the case.
        errors: relative error per compared tensor: ``'out'`` and the input names (their gradients).
        tolerances: the tolerance per compared tensor.
        error: why the case could not be compared (an exception or a shape/dtype difference), else ``None``.
    """

    case: Case
    errors: Dict[str, float]
    tolerances: Dict[str, float]
    error: Optional[str] = None

    @property
    def op(self) -> str:
        return op_name(self.case)

    @property
    def ok(self) -> bool:
        return self.error is None and all(err <= self.tolerances[name] for name, err in self.errors.items())

    def worst(self) -> Tuple[str, float, float]:
        """(tensor, error, error / tolerance) of the tensor closest to, or furthest past, its tolerance."""
        if self.error is not None:
            return 'error', math.inf, math.inf
        ratios = {k: _ratio(err, self.tolerances[k]) for k, err in self.errors.items()}
        name = max(ratios, key=ratios.get)
        return name, self.errors[name], ratios[name]


def _ratio(err: float, tol: float) -> float:
    """err / tol, for a tolerance of zero (an exact result) 0 or inf."""
    if tol > 0:
        return err / tol
    return 0. if err == 0 else math.inf


def reference_dtype(case: Case) -> Optional[torch.dtype]:
    """The dtype the reference's floating inputs are cast to in :func:`compare_case`, None for the kernel's inputs as
    they are: what each op's own GPU test compares with. The scans compute in float32 themselves; the residual add and
    the token merge round each step as their references do (tests/ops/test_residual.py and test_token_maps.py compare
    with ``backend='torch'`` on the same inputs); the depthwise conv and the state fusion against float32 references;
    LayerNorm against float64 autograd (test_layer_norm_2d.py). Bias + GELU against its reference on the same inputs
    (test_bias_gelu.py's last comparison): the kernel rounds the sum to h's dtype before the GELU, as the reference
    does, and in GELU's steep negative tail that rounding moves the 16-bit gradients by tens of percent from
    float64's."""
    if isinstance(case, (DWConvCase, FusionCase)):
        return torch.float32
    if isinstance(case, LayerNormCase):
        return torch.float64
    return None


def output_dtype(case: Case) -> torch.dtype:
    """The dtype of the kernel's output."""
    if isinstance(case, (ScanCase, CrossCase)):  # float32 whatever the inputs' dtype (float64 from float64)
        return torch.float64 if case.dtype == 'float64' else torch.float32
    if isinstance(case, LayerNormCase):
        return case.torch_out_dtype
    if isinstance(case, ResidualCase):
        return torch.promote_types(case.stream_dtype, case.torch_dtype)
    return case.torch_dtype


# LayerNorm's statistics are float32 (the kernel's, and the float32 reference's where layer_norm_last falls back to it):
# where a row holds nearly equal, off-centre values (mean^2 >> var: 2 channels, or 1, where var = 0), the rounding of
# x - mean grows by 1 / sqrt(var + eps) in the normalized values and in the gradients of x and of the weight, against
# the float64 reference, beyond its tests' tolerances (their maps are well conditioned). Those two tolerances get
# STATS_TOL times that growth, 1 + max(mean^2 / (var + eps)) over the rows (:func:`conditioning`).
STATS_TOL = 1e-5
CONDITIONED = ('x', 'weight')


def conditioning(case: Case, inputs: Dict[str, Tensor]) -> float:
    """1 + max(mean^2 / (var + eps)) over the rows of a LayerNorm case's x, computed in float64; 1 for the other
    ops."""
    if not isinstance(case, LayerNormCase):
        return 1.
    x = inputs['x'].double()
    dim = -1 if case.last else 1
    return 1. + (x.mean(dim).square() / (x.var(dim, unbiased=False) + case.eps)).max().item()


def compare_case(case: Case, device: str = 'cuda') -> CaseResult:
    """Run ``case`` forward and backward on the kernel (``backend='cuda'``) and on the reference
    (``backend='torch'``) and compare the output and every input's gradient.

    The reference runs on the inputs cast to :func:`reference_dtype` (or on the same inputs). Both receive the same
    incoming gradient, rounded to the kernel's output dtype (:func:`output_dtype`). The errors are measured against
    at least :func:`error_floor`; the tolerances are :func:`tolerance`'s, those of LayerNorm's x and weight gradients
    plus ``STATS_TOL`` times the growth of the statistics' rounding (:func:`conditioning`) beyond 1.
    """
    inputs = make_inputs(case, device)
    wide = reference_dtype(case)
    floats = [k for k, v in inputs.items() if v.is_floating_point()]  # the index maps get no gradient
    leaves_k = {k: v.detach().requires_grad_() if k in floats else v for k, v in inputs.items()}  # layouts kept
    leaves_r = {k: (v.detach() if wide is None else v.detach().to(wide)).requires_grad_() if k in floats else v
                for k, v in inputs.items()}
    expected_dtype = output_dtype(case)
    try:
        out_k = call_op(case, leaves_k, backend='cuda')
        out_r = call_op(case, leaves_r, backend='torch')
        if out_k.dtype != expected_dtype or out_k.shape != out_r.shape:
            return CaseResult(case, {}, {}, f'output {out_k.dtype} {tuple(out_k.shape)}, expected {expected_dtype} '
                              f'{tuple(out_r.shape)}')
        dout = grad_output(case, out_k.dtype, device)
        grads_k = torch.autograd.grad(out_k, [leaves_k[k] for k in floats], dout.to(out_k.dtype))
        grads_r = torch.autograd.grad(out_r, [leaves_r[k] for k in floats], dout.to(out_r.dtype))
    except (RuntimeError, ValueError) as exc:  # reported as a failing case; the other cases still run
        return CaseResult(case, {}, {}, f'{type(exc).__name__}: {exc}')
    floor = error_floor(case)
    errors = {'out': rel_err(out_k, out_r, floor)}
    for name, grad_k, grad_r in zip(floats, grads_k, grads_r):
        leaf = leaves_k[name]
        if grad_k.dtype != leaf.dtype or grad_k.shape != leaf.shape:
            return CaseResult(case, {}, {}, f'gradient of {name}: {grad_k.dtype} {tuple(grad_k.shape)}, expected '
                              f'{leaf.dtype} {tuple(leaf.shape)}')
        errors[name] = rel_err(grad_k, grad_r, floor)
    stats = STATS_TOL * (conditioning(case, inputs) - 1.)
    return CaseResult(case, errors, {name: tolerance(case, name) + (stats if name in CONDITIONED else 0.)
                                     for name in errors})


def draw_cases(op: str, count: int, seed: int) -> List[Case]:
    """``count`` cases of ``op`` (a :data:`KERNEL_OPS` name); each op has its own stream of cases."""
    draw, bounds, _ = KERNEL_OPS[op]
    chooser = RandomChooser(f'{seed}-{op}')
    return [draw(chooser, bounds) for _ in range(count)]


def summarize(results: Sequence[CaseResult]) -> List[Dict]:
    """One row per op and dtype: cases, mismatches and the worst error (by error / tolerance)."""
    groups: Dict[Tuple[str, str], List[CaseResult]] = defaultdict(list)
    for result in results:
        groups[(result.op, result.case.dtype)].append(result)
    rows = []
    for (op, dtype), group in sorted(groups.items(), key=lambda item: (list(KERNEL_OPS).index(item[0][0]),
                                                                       list(DTYPES).index(item[0][1]))):
        worst = max(group, key=lambda r: r.worst()[2])
        tensor, err, _ = worst.worst()
        rows.append(dict(op=op, dtype=dtype, cases=len(group), mismatches=sum(not r.ok for r in group),
                         worst_error=err, worst_tensor=tensor, tolerance=worst.tolerances.get(tensor)))
    return rows


def format_summary(rows: Sequence[Dict]) -> str:
    """The rows of :func:`summarize` as a table."""
    lines = [f'{"op":<16}{"dtype":<10}{"cases":>7}{"mismatches":>12}{"worst rel. err":>16}  tensor (tolerance)']
    for row in rows:
        tol = '' if row['tolerance'] is None else f' ({row["tolerance"]:.1e})'
        lines.append(f'{row["op"]:<16}{row["dtype"]:<10}{row["cases"]:>7}{row["mismatches"]:>12}'
                     f'{row["worst_error"]:>16.2e}  {row["worst_tensor"]}{tol}')
    return '\n'.join(lines)


def describe_failure(index: int, result: CaseResult) -> str:
    """A failing case: its index in the op's stream, what failed, and the case itself (to rebuild it)."""
    if result.error is not None:
        why = result.error
    else:
        why = ', '.join(f'{name} {err:.2e} > {result.tolerances[name]:.1e}' for name, err in result.errors.items()
                        if err > result.tolerances[name])
    return f'{result.op} #{index} {result.case.dtype}: {why}\n    {result.case}'
