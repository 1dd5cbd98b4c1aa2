"""Benchmark the vssm CUDA ops against their PyTorch baselines at the models' stage shapes (GPU only).

    python tools/analysis_tools/bench_ops.py [--dtypes fp32 bf16] [--batch 128]
        [--ops scan cross fusion dwconv norm norm-last linear merge]
        [--quick]
        [--json out.json] [--markdown out.md]

For every case it prints the time per call of the forward pass and of forward + backward (calls back to back, as a
model makes them: the median over 7 spans of 3 calls, after 5 warm-up calls), the effective bandwidth (the minimal
bytes the op must move divided by the time) and that bandwidth as a fraction of a device-to-device copy measured in
the same run; at the end, the verdict on each performance target of the kernels (scan bandwidth, state-fusion
bandwidth and speed-up, dense 11x11 speed-up). Rows:

* selective scan (Spatial-Mamba's state form, VMamba's output form): the CUDA kernel, the PyTorch reference
  (log-depth scan) and the reference under ``torch.compile``;
* cross scan (the SSM core of VMamba, four directions, and of Spectral VMamba, eight per-image orders:
  :func:`vssm.ops.cross_selective_scan` with x_proj and the low-rank step sizes): the Triton kernel
  (``VSSM_TRITON_FUSIONS=1``; where it does not pay, the composition runs), the CUDA scan's cross form
  (``VSSM_CROSS_FORM=1``) and the composition they replace (gathers, GEMMs, the CUDA scan, the merge); the minimal
  bytes count x read and the float32 output written (forward), x and the output gradient read and dx written
  (backward);
* state fusion: the fused kernel, three cuDNN depthwise dilated 3x3 convs on replicate ``F.pad`` inputs (the
  upstream training path), and one dense 11x11 ``F.conv2d`` (the upstream eval path's cost);
* dense 11x11 depthwise conv: the kernel and ``F.conv2d(groups=C)``;
* LayerNorm2d at VMamba-T's stage maps under bf16 autocast, bf16 out (bf16 maps: the blocks' norms; float32: the
  out_norm on the scan's output): the reference (``F.layer_norm`` on the permuted map, float32 under autocast), the
  Triton kernel on every shape, ``F.layer_norm`` in the map's own dtype (no float32 copy) and the channel reduction
  (:func:`channel_reduction_norm`);
* channels-last LayerNorm at Spatial-Mamba-T's stage maps ((B, H, W, C), its ``ln_1`` / ``ln_2``) under bf16
  autocast, bf16 out: ``F.layer_norm`` as the model runs it and :func:`vssm.ops.layer_norm_last`'s kernel;
* 1x1 projections (``Linear2d``: VMamba-T's in_proj, fc1, and fc2 with the residual added) under bf16 autocast:
  ``F.conv2d`` as the models run them, a batched GEMM on the (B, C, L) map, and for fc2 the GEMM with the residual
  as its C operand (``torch.baddbmm``);
* token maps (VMamba-T's four directions per stage and Spectral VMamba-T's eight per-image orders at stage 1): the
  merge (:func:`vssm.ops.scatter_tokens` over permutations: the K scanned sequences added back onto the tokens), its
  Triton kernel against the gather into raster order plus the sum over K (``backend='torch'``), and the gather
  (:func:`vssm.ops.gather_tokens`: the tokens read in the K orders), its Triton kernel against ATen's gather; each
  one's backward is the other.
TF32 is enabled for the cuDNN baselines (as in training).
"""
import argparse
import json
import time
from functools import partial
from typing import Callable, Dict, List, NamedTuple, Optional, Set, Tuple

import torch
import torch.nn.functional as F

from vssm.analysis.timing import median_ms
from vssm.models.vmamba import cross_scan_index
from vssm.ops import (
    cross_selective_scan,
    dwconv2d,
    gather_tokens,
    inverse_permutation,
    scatter_tokens,
    selective_scan,
    state_fusion,
)
from vssm.ops._backend import cross_form_switch, triton_fusions
from vssm.ops.dwconv2d import kernel_available as dw_kernel_available
from vssm.ops.selective_scan import kernel_available as scan_kernel_available

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def time_ms(fn: Callable[[], object], warmup: int = 5, rounds: int = 7, calls: int = 3) -> float:
    """Milliseconds per call of ``fn`` on the GPU: the median over ``rounds`` spans of ``calls`` back-to-back calls
    (CUDA events around each span), after ``warmup`` calls.

    Back to back, as a model calls the op: the host prepares the next call while the GPU runs this one, so host
    overhead shows only where it exceeds the GPU time. (Timing single calls between synchronizations adds the host
    time before the first kernel's launch to every call: ~0.15 ms for the state fusion, more than half of its kernel
    time at stage 1.)
    """
    return median_ms(fn, torch.device('cuda', torch.cuda.current_device()), warmup, rounds, calls)


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (bytes read + written)."""
    src = torch.empty(256 * 2**20, device='cuda', dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def host_ms(fn: Callable[[], object], calls: int = 10) -> float:
    """Milliseconds of host time per call: ``calls`` calls issued without waiting for the GPU. Where it is close to
    :func:`time_ms`, the GPU waits for the host (the op's launches and Python, not its kernels, set its time)."""
    fn()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - begin
    torch.cuda.synchronize()
    return host * 1e3 / calls


def fwd_bwd(fn: Callable[[], torch.Tensor], leaves: List[torch.Tensor]) -> Callable[[], None]:
    grad = None

    def run():
        nonlocal grad
        out = fn()
        if grad is None:
            grad = torch.randn_like(out)
        torch.autograd.grad(out, leaves, grad)

    return run


class Table:

    def __init__(self, copy_bw: float):
        self.copy_bw = copy_bw
        self.rows: List[Dict] = []

    def add(self, op: str, shape: str, dtype: str, impl: str, fwd_ms: float, fwdbwd_ms: Optional[float],
            fwd_bytes: float, bwd_bytes: float, host_fwd_bwd_ms: Optional[float] = None) -> None:
        row = dict(op=op, shape=shape, dtype=dtype, impl=impl, fwd_ms=fwd_ms, fwd_bwd_ms=fwdbwd_ms,
                   host_fwd_bwd_ms=host_fwd_bwd_ms,
                   fwd_gbps=fwd_bytes / (fwd_ms * 1e-3) / 1e9,
                   fwd_bwd_gbps=None if fwdbwd_ms is None else (fwd_bytes + bwd_bytes) / (fwdbwd_ms * 1e-3) / 1e9)
        row['fwd_frac'] = row['fwd_gbps'] * 1e9 / self.copy_bw
        row['fwd_bwd_frac'] = None if fwdbwd_ms is None else row['fwd_bwd_gbps'] * 1e9 / self.copy_bw
        # The backward alone: the forward+backward span minus the forward (the backward's bytes over the difference).
        bwd_ms = None if fwdbwd_ms is None else fwdbwd_ms - fwd_ms
        row['bwd_frac'] = None if not bwd_ms or bwd_ms <= 0 else bwd_bytes / (bwd_ms * 1e-3) / self.copy_bw
        self.rows.append(row)
        fb = '      -' if fwdbwd_ms is None else f'{fwdbwd_ms:7.3f}'
        fbf = '    -' if fwdbwd_ms is None else f'{row["fwd_bwd_frac"]:5.0%}'
        print(f'{op:14s} {shape:28s} {dtype:5s} {impl:22s} fwd {fwd_ms:7.3f} ms ({row["fwd_frac"]:5.0%} of copy)  '
              f'fwd+bwd {fb} ms ({fbf})' + ('' if host_fwd_bwd_ms is None else f'  host {host_fwd_bwd_ms:.3f} ms'),
              flush=True)


class Case(NamedTuple):
    """One op case: ``run(backend)`` computes it on its inputs, ``leaves`` get gradients, and the minimal bytes its
    forward and its backward must move (every input read once, every output written once)."""
    run: Callable[[str], torch.Tensor]
    leaves: List[torch.Tensor]
    fwd_bytes: float
    bwd_bytes: float


def scan_case(form: str, bt: int, d: int, groups: int, length: int, dtype: torch.dtype,
              device: str = 'cuda') -> Case:
    """A selective scan: the state form (Spatial-Mamba) or the output form with C and D (VMamba)."""
    kw = dict(device=device)
    u = torch.randn(bt, d, length, **kw).to(dtype).requires_grad_()
    delta = (torch.randn(bt, d, length, **kw) * 0.5 - 1).to(dtype).requires_grad_()
    A = (-torch.rand(d, 1, **kw) - 0.1).requires_grad_()
    B = torch.randn(bt, groups, 1, length, **kw).to(dtype).requires_grad_()
    bias = (torch.rand(d, **kw) - 2).requires_grad_()
    leaves = [u, delta, A, B, bias]
    extra = {}
    if form == 'output':
        extra = dict(C=torch.randn(bt, groups, 1, length, **kw).to(dtype).requires_grad_(),
                     D=torch.ones(d, **kw).requires_grad_())
        leaves += list(extra.values())
    s, el, bc = u.element_size(), bt * d * length, bt * groups * length
    n_bc = 2 if form == 'output' else 1
    fwd_bytes = 2 * el * s + n_bc * bc * s + el * 4
    bwd_bytes = 2 * el * s + n_bc * bc * s + el * 4 + 2 * el * s + n_bc * bc * 4
    return Case(lambda backend: selective_scan(u, delta, A, B, delta_bias=bias, backend=backend, **extra), leaves,
                fwd_bytes, bwd_bytes)


def cross_case(bt: int, d: int, h: int, w: int, rank: int, dtype: torch.dtype, device: str = 'cuda',
               spectral: bool = False) -> Case:
    """The SSM core of VMamba (four directions over a (B, D, H, W) map) or, with ``spectral``, of Spectral VMamba
    (K = 8 orders per image, here random permutations): x_proj to rank + 2 step inputs, N = 1."""
    kw = dict(device=device)
    length = h * w
    if spectral:
        k = 8
        index = torch.stack([torch.randperm(length, **kw) for _ in range(bt * k)]).view(bt, k, length)
        inverse = inverse_permutation(index)
    else:
        k = 4
        index, inverse = cross_scan_index(h, w, torch.device(device))
    x = torch.randn(bt, d, length, **kw).to(dtype).requires_grad_()
    params = [torch.randn(k, rank + 2, d, **kw) / d**0.5, torch.randn(k, d, rank, **kw) / rank**0.5,
              torch.rand(k, d, **kw) * 4 - 6, -torch.rand(k * d, 1, **kw) - 0.2, torch.randn(k * d, **kw)]
    params = [p.requires_grad_() for p in params]
    el, s = x.numel(), x.element_size()
    return Case(lambda backend: cross_selective_scan(x, index, *params, inverse=inverse, backend=backend),
                [x, *params], el * (s + 4), el * (2 * s + 4))


def fusion_case(bt: int, d: int, h: int, w: int, dtype: torch.dtype, device: str = 'cuda') -> Case:
    """Spatial-Mamba's state fusion of a (B, D, H, W) map; leaves: the map, the three kernels, alpha."""
    x = torch.randn(bt, d, h, w, device=device).to(dtype).requires_grad_()
    ks = [(torch.randn(d, 1, 3, 3, device=device) * 0.3).requires_grad_() for _ in range(3)]
    alpha = torch.ones(3, device=device, requires_grad=True)
    el, s = x.numel(), x.element_size()
    return Case(lambda backend: state_fusion(x, *ks, alpha, backend=backend), [x, *ks, alpha], 2 * el * s,
                3 * el * s)


def bench_scan(table: Table, form: str, bt: int, d: int, groups: int, length: int, dtype: torch.dtype,
               name: str, with_compile: bool) -> None:
    case = scan_case(form, bt, d, groups, length, dtype)
    impls = [('cuda kernel', 'cuda'), ('torch reference', 'torch')]
    for impl, backend in impls:
        def fn(backend=backend):
            return case.run(backend)
        with torch.no_grad():
            fwd = time_ms(fn)
        table.add(f'scan-{form}', name, DTYPE_NAME[dtype], impl, fwd, time_ms(fwd_bwd(fn, case.leaves)),
                  case.fwd_bytes, case.bwd_bytes)
    if with_compile:
        compiled = torch.compile(lambda: case.run('torch'))
        with torch.no_grad():
            fwd = time_ms(compiled)
        table.add(f'scan-{form}', name, DTYPE_NAME[dtype], 'torch ref (compiled)', fwd,
                  time_ms(fwd_bwd(compiled, case.leaves)), case.fwd_bytes, case.bwd_bytes)


# The cross scan's implementations on CUDA tensors: (name, VSSM_TRITON_FUSIONS, VSSM_CROSS_FORM)
CROSS_IMPLS = (('triton kernel', True, False), ('cuda cross form', False, True), ('composition (cuda scan)', False,
                                                                                     False))


def bench_cross(table: Table, bt: int, d: int, h: int, w: int, rank: int, dtype: torch.dtype, name: str,
                spectral: bool = False) -> None:
    case = cross_case(bt, d, h, w, rank, dtype, spectral=spectral)
    for impl, triton, form in CROSS_IMPLS:
        with triton_fusions(triton), cross_form_switch(form):
            def fn():
                return case.run('auto')
            with torch.no_grad():
                fwd = time_ms(fn)
            step = fwd_bwd(fn, case.leaves)
            table.add('cross-scan', name, DTYPE_NAME[dtype], impl, fwd, time_ms(step), case.fwd_bytes,
                      case.bwd_bytes, host_ms(step))


def bench_fusion(table: Table, bt: int, d: int, h: int, w: int, dtype: torch.dtype, name: str) -> None:
    case = fusion_case(bt, d, h, w, dtype)
    x, *ks, alpha = case.leaves

    def three_convs():
        xp = F.pad(x, (5, 5, 5, 5), mode='replicate')
        out = 0
        for i, dil in enumerate((1, 3, 5)):
            win = xp[..., 5 - dil:5 - dil + h + 2 * dil, 5 - dil:5 - dil + w + 2 * dil]
            out = out + alpha[i].to(dtype) * F.conv2d(win, ks[i].to(dtype), dilation=dil, groups=d)
        return out

    merged = torch.randn(d, 1, 11, 11, device='cuda').to(dtype).requires_grad_()

    def dense11():
        return F.conv2d(x, merged, padding=5, groups=d)

    for impl, fn, leaves in (('fused kernel', lambda: case.run('cuda'), case.leaves),
                             ('3x cuDNN dilated+pad', three_convs, case.leaves),
                             ('cuDNN dense 11x11', dense11, [x, merged])):
        with torch.no_grad():
            fwd = time_ms(fn)
        step = fwd_bwd(fn, leaves)
        table.add('state-fusion', name, DTYPE_NAME[dtype], impl, fwd, time_ms(step), case.fwd_bytes, case.bwd_bytes,
                  host_ms(step))


def bench_dense(table: Table, bt: int, d: int, h: int, w: int, k: int, dtype: torch.dtype, name: str) -> None:
    s = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(bt, d, h, w, device='cuda').to(dtype).requires_grad_()
    weight = (torch.randn(d, 1, k, k, device='cuda') / k).requires_grad_()
    el = x.numel()
    weight_lp = weight.detach().to(dtype).requires_grad_()
    for impl, fn, leaves in (('cuda kernel', lambda: dwconv2d(x, weight, backend='cuda'), [x, weight]),
                             ('cuDNN F.conv2d', lambda: F.conv2d(x, weight_lp, padding=k // 2, groups=d),
                              [x, weight_lp])):
        with torch.no_grad():
            fwd = time_ms(fn)
        table.add(f'dwconv{k}x{k}', name, DTYPE_NAME[dtype], impl, fwd, time_ms(fwd_bwd(fn, leaves)), 2 * el * s,
                  3 * el * s)


def channel_reduction_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                           out_dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm over dim 1 of a (B, C, H, W) map written as a reduction over the channels (float32 statistics, no
    permuted copy), then one scale-and-shift: a candidate for the reference of ``layer_norm_2d``."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    var, mean = torch.var_mean(xf, dim=1, keepdim=True, correction=0)
    return torch.addcmul(bias.to(acc)[:, None, None], (xf - mean) * torch.rsqrt(var + eps),
                         weight.to(acc)[:, None, None]).to(out_dtype)


def _time_norms(table: Table, op: str, name: str, dtype: torch.dtype, impls: Dict[str, Callable[[], torch.Tensor]],
                x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Time each LayerNorm implementation under bf16 autocast (bf16 out), forward and forward+backward; the minimal
    bytes: x read and the bf16 output written, then x and the output gradient read and dx written. The Triton kernel
    is skipped without Triton; an implementation this torch build lacks (e.g. mixed dtypes) is reported and skipped."""
    from vssm.ops import layer_norm as ln
    el, s = x.numel(), x.element_size()
    for impl, run in impls.items():
        if impl == 'triton kernel' and ln._KERNEL is None:
            continue

        def fn(run=run):
            with torch.autocast('cuda', torch.bfloat16):
                return run()
        try:
            with torch.no_grad():
                fwd = time_ms(fn)
            table.add(op, name, DTYPE_NAME[dtype], impl, fwd, time_ms(fwd_bwd(fn, [x, weight, bias])), el * (s + 2),
                      el * (2 + 2 * s))
        except RuntimeError as e:
            print(f'{op:15s} {name:28s} {DTYPE_NAME[dtype]:5s} {impl:22s} failed: {str(e).splitlines()[0]}')


def bench_norm(table: Table, bt: int, c: int, h: int, w: int, dtype: torch.dtype, name: str) -> None:
    """A LayerNorm2d as the models run it under bf16 autocast, output bf16 (the projection's input): bf16 maps are
    the blocks' norms, float32 ones VMamba's out_norm on the scan's output."""
    from vssm.ops import layer_norm as ln
    x = torch.randn(bt, c, h, w, device='cuda').to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(c, device='cuda')).requires_grad_()
    bias = (0.1 * torch.randn(c, device='cuda')).requires_grad_()
    bf16 = torch.bfloat16

    def native_dtype():  # F.layer_norm on x's own dtype (autocast would first cast a bf16 map to float32)
        with torch.autocast('cuda', enabled=False):
            y = F.layer_norm(x.permute(0, 2, 3, 1), (c, ), weight.to(x.dtype), bias.to(x.dtype),
                             1e-5).permute(0, 3, 1, 2)
        return y.to(bf16)

    impls = {'reference': lambda: ln.layer_norm_2d(x, weight, bias, 1e-5, bf16, backend='torch'),
             'triton kernel': lambda: ln._LayerNorm2d.apply(x.contiguous(), weight, bias, 1e-5, bf16),
             'native dtype': native_dtype,
             'channel reduction': lambda: channel_reduction_norm(x, weight, bias, 1e-5, bf16)}
    _time_norms(table, 'layer-norm-2d', name, dtype, impls, x, weight, bias)


def bench_norm_last(table: Table, bt: int, c: int, h: int, w: int, dtype: torch.dtype, name: str) -> None:
    """Spatial-Mamba's ``ln_1`` / ``ln_2`` on its (B, H, W, C) channels-last maps under bf16 autocast, output bf16 (the
    projection's input): ``F.layer_norm`` as the model runs it (float32 under autocast, then cast) against
    :func:`vssm.ops.layer_norm_last`'s kernel writing bf16 directly."""
    from vssm.ops import layer_norm as ln
    x = torch.randn(bt, h, w, c, device='cuda').to(dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(c, device='cuda')).requires_grad_()
    bias = (0.1 * torch.randn(c, device='cuda')).requires_grad_()
    bf16 = torch.bfloat16
    impls = {'F.layer_norm': lambda: F.layer_norm(x, (c, ), weight, bias, 1e-5).to(bf16),
             'triton kernel': lambda: ln.layer_norm_last(x, weight, bias, 1e-5, bf16, backend='cuda')}
    _time_norms(table, 'layer-norm-last', name, dtype, impls, x, weight, bias)


def bench_linear2d(table: Table, bt: int, c_in: int, c_out: int, h: int, w: int, dtype: torch.dtype, name: str,
                   residual: bool = False) -> None:
    """A ``Linear2d`` (1x1 conv of a (B, C, H, W) map, weight (out, in)) as the models run it under bf16 autocast,
    float32 weight: ``F.conv2d`` (cuDNN, NHWC kernels with transposes around them for NCHW maps), the same product as
    a batched GEMM on the (B, C, L) map (``torch.matmul`` on the float32 weight, and ``torch.bmm`` on the weight cast
    once and expanded), and with ``residual`` (fc2, out_proj: the block's residual added) the GEMM with the residual as
    its C operand (``torch.baddbmm``, beta = 1)."""
    x = torch.randn(bt, c_in, h, w, device='cuda').to(dtype).requires_grad_()
    weight = (torch.randn(c_out, c_in, device='cuda') / c_in**0.5).requires_grad_()
    res = torch.randn(bt, c_out, h, w, device='cuda').to(dtype) if residual else None
    bf16 = torch.bfloat16

    def conv():
        out = F.conv2d(x, weight[:, :, None, None])
        return out if res is None else res + out

    def matmul():
        out = torch.matmul(weight, x.flatten(2)).view(bt, c_out, h, w)
        return out if res is None else res + out

    def bmm():  # the weight cast once, then expanded (stride 0: no copy per image)
        out = torch.bmm(weight.to(bf16).expand(bt, -1, -1), x.flatten(2).to(bf16)).view(bt, c_out, h, w)
        return out if res is None else res + out

    impls = {'F.conv2d': conv, 'matmul': matmul, 'bmm': bmm}
    if residual:
        # the weight cast before the expand (a cast of the expanded view would copy it B times)
        impls['baddbmm'] = lambda: torch.baddbmm(res.flatten(2), weight.to(bf16).expand(bt, -1, -1),
                                                 x.flatten(2)).view(bt, c_out, h, w)
    s = 2  # bf16 activations under autocast
    fwd_bytes = bt * h * w * (c_in + c_out * (2 if residual else 1)) * s + weight.numel() * 4
    bwd_bytes = bt * h * w * (2 * c_in + c_out) * s + 2 * weight.numel() * 4  # dy, x read; dx written
    for impl, run in impls.items():
        def fn(run=run):
            with torch.autocast('cuda', bf16):
                return run()
        with torch.no_grad():
            fwd = time_ms(fn)
        table.add('linear2d', name, DTYPE_NAME[dtype], impl, fwd, time_ms(fwd_bwd(fn, [x, weight])), fwd_bytes,
                  bwd_bytes)


def _scan_orders(bt: int, h: int, w: int, device: str, spectral: bool):
    """(K, index, inverse): VMamba's four directions (one map for the batch) or Spectral VMamba's eight per-image
    orders (random permutations)."""
    length = h * w
    if spectral:
        index = torch.stack([torch.randperm(length, device=device) for _ in range(bt * 8)]).view(bt, 8, length)
        return 8, index, inverse_permutation(index)
    return (4, *cross_scan_index(h, w, torch.device(device)))


def merge_case(bt: int, d: int, h: int, w: int, dtype: torch.dtype, device: str = 'cuda',
               spectral: bool = False) -> Case:
    """The K scanned sequences (B, K, D, L) added back onto the raster tokens (:func:`_scan_orders`)."""
    length = h * w
    k, index, inverse = _scan_orders(bt, h, w, device, spectral)
    y = torch.randn(bt, k, d, length, device=device).to(dtype).requires_grad_()
    el, s = y.numel(), y.element_size()
    return Case(lambda backend: scatter_tokens(y, index, length, inverse, backend=backend), [y],
                el * s * (1 + 1 / k), el * s * (1 + 1 / k))


def gather_case(bt: int, d: int, h: int, w: int, dtype: torch.dtype, device: str = 'cuda',
                spectral: bool = False) -> Case:
    """The raster tokens (B, D, L) read in the K orders (:func:`_scan_orders`): the cross-scan's gather."""
    k, index, inverse = _scan_orders(bt, h, w, device, spectral)
    x = torch.randn(bt, d, h * w, device=device).to(dtype).requires_grad_()
    el, s = x.numel(), x.element_size()
    return Case(lambda backend: gather_tokens(x, index, inverse, backend=backend), [x],
                el * s * (1 + k), el * s * (1 + k))


def bench_merge(table: Table, bt: int, d: int, h: int, w: int, dtype: torch.dtype, name: str,
                spectral: bool = False) -> None:
    """The token maps: the merge (Triton kernel against the gather and sum) and the gather (Triton kernel against
    ATen's gather); each one's backward is the other."""
    for op, make in (('token-merge', merge_case), ('token-gather', gather_case)):
        case = make(bt, d, h, w, dtype, spectral=spectral)
        baseline = 'gather + sum' if op == 'token-merge' else 'ATen gather'
        for impl, backend in ((baseline, 'torch'), ('triton kernel', 'auto')):
            fn = partial(case.run, backend)
            with torch.no_grad():
                fwd = time_ms(fn)
            table.add(op, name, DTYPE_NAME[dtype], impl, fwd, time_ms(fwd_bwd(fn, case.leaves)), case.fwd_bytes,
                      case.bwd_bytes)


DTYPE_NAME = {v: k for k, v in DTYPES.items()}
# --ops: selective scans, cross scan, state fusion, dense 11x11 dwconv, LayerNorm2d, channels-last LayerNorm,
# 1x1 projections, token maps
OPS = ('scan', 'cross', 'fusion', 'dwconv', 'norm', 'norm-last', 'linear', 'merge')


def _pct(v: Optional[float]) -> str:
    return '-' if v is None else f'{v:.0%}'


def markdown_table(rows: List[Dict]) -> str:
    """The rows as the Markdown table of kernels/README.md."""
    lines = ['| op | shape | dtype | implementation | fwd ms | fwd % copy | fwd+bwd ms | fwd+bwd % copy | '
             'host ms per fwd+bwd |', '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        fb = '-' if r['fwd_bwd_ms'] is None else f"{r['fwd_bwd_ms']:.3f}"
        host = '-' if r.get('host_fwd_bwd_ms') is None else f"{r['host_fwd_bwd_ms']:.3f}"
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['impl']} | {r['fwd_ms']:.3f} | "
                     f"{_pct(r['fwd_frac'])} | {fb} | {_pct(r['fwd_bwd_frac'])} | {host} |")
    return '\n'.join(lines)


def _find(rows: List[Dict], op: str, shape: str, dtype: str, impl: str) -> Optional[Dict]:
    return next((r for r in rows if (r['op'], r['shape'], r['dtype'], r['impl']) == (op, shape, dtype, impl)), None)


def _case(r: Dict) -> str:
    """'SM-T s1 fp32' from a row (the stage or 'det s1' part of its shape, and its dtype)."""
    words = r['shape'].split()
    return ' '.join(words[1:-1] if len(words) > 2 else words[:1]) + ' ' + r['dtype']


def target_rows(rows: List[Dict]) -> List[Tuple[str, str, str]]:
    """(target, measured, status) for each performance target of the kernels (kernels/README.md) that these rows
    measure.

    Scan bandwidth at stages 1/2 (batch 128): forward >= 70% and backward >= 50% of the copy; state fusion forward >=
    50% of the copy and forward+backward >= 5x the three cuDNN convs (every shape measured, detection included);
    dense 11x11 forward+backward >= 3x ``F.conv2d(groups=C)``.
    """
    out = []

    def verdict(name: str, values: List[Tuple[str, float]], threshold: float, fmt: str) -> None:
        if not values:
            return
        met = [v >= threshold for _, v in values]
        status = 'met' if all(met) else 'not met' if not any(met) else (
            'not met at ' + ', '.join(c for (c, _), ok in zip(values, met) if not ok))
        out.append((name, ', '.join(f'{c}: {fmt.format(v)}' for c, v in values), status))

    scans = [r for r in rows if r['op'].startswith('scan-') and r['impl'] == 'cuda kernel'
             and any(f' s{i} ' in r['shape'] for i in (1, 2)) and ' det ' not in r['shape']]
    scans = [dict(r, case=f"{r['op'][5:]} {_case(r)}") for r in scans]
    verdict('scan fwd >= 70% of copy, stages 1/2', [(r['case'], r['fwd_frac']) for r in scans], 0.70, '{:.0%}')
    verdict('scan bwd >= 50% of copy, stages 1/2',
            [(r['case'], r['bwd_frac']) for r in scans if r['bwd_frac'] is not None], 0.50, '{:.0%}')
    fused = [r for r in rows if r['op'] == 'state-fusion' and r['impl'] == 'fused kernel']
    verdict('state fusion fwd >= 50% of copy', [(_case(r), r['fwd_frac']) for r in fused], 0.50, '{:.0%}')
    speedups = []
    for r in fused:
        base = _find(rows, 'state-fusion', r['shape'], r['dtype'], '3x cuDNN dilated+pad')
        if base and r['fwd_bwd_ms'] and base['fwd_bwd_ms']:
            host_bound = (r.get('host_fwd_bwd_ms') or 0) >= 0.9 * r['fwd_bwd_ms']
            speedups.append((_case(r) + (' (host-bound)' if host_bound else ''), base['fwd_bwd_ms'] / r['fwd_bwd_ms']))
    verdict('state fusion fwd+bwd >= 5x three cuDNN convs', speedups, 5.0, '{:.1f}x')
    speedups = []
    for r in rows:
        if r['op'] == 'dwconv11x11' and r['impl'] == 'cuda kernel':
            base = _find(rows, r['op'], r['shape'], r['dtype'], 'cuDNN F.conv2d')
            if base and r['fwd_bwd_ms'] and base['fwd_bwd_ms']:
                speedups.append((r['dtype'], base['fwd_bwd_ms'] / r['fwd_bwd_ms']))
    verdict('dense 11x11 fwd+bwd >= 3x F.conv2d', speedups, 3.0, '{:.1f}x')
    return out


def targets_markdown(rows: List[Dict]) -> str:
    lines = ['| target | measured | status |', '|---|---|---|']
    lines += [f'| {t} | {m} | {s} |' for t, m, s in target_rows(rows)]
    return '\n'.join(lines)


def plan(ops: Set[str], dtypes: List[torch.dtype], bt: int, quick: bool = False,
         no_compile: bool = False) -> List[Tuple[Callable, tuple]]:
    """The cases to run, in order, as (bench function, its arguments after the table): per dtype, the stage shapes
    of Spatial-Mamba-T and VMamba-T (stages 1-4, 1-2 with ``quick``), Spectral VMamba-T's, then the detection shapes."""
    stages = [(56, 56), (28, 28)] if quick else [(56, 56), (28, 28), (14, 14), (7, 7)]
    cases = []
    for dtype in dtypes:
        for i, (h, w) in enumerate(stages):
            d_sm, d_vm = 128 * 2**i, 96 * 2**i  # Spatial-Mamba-T and VMamba-T inner widths
            vm = f'VM-T s{i + 1} {bt}x{d_vm}x{h}x{w}'
            if 'scan' in ops:
                cases.append((bench_scan, ('state', bt, d_sm, 1, h * w, dtype, f'SM-T s{i + 1} {bt}x{d_sm}x{h * w}',
                                           not no_compile and i == 0)))
                cases.append((bench_scan, ('output', bt, 4 * d_vm, 4, h * w, dtype,
                                           f'VM-T s{i + 1} {bt}x4x{d_vm}x{h * w}', False)))
            if 'cross' in ops:  # VMamba-T: dt rank = ceil(C / 16) of the block width C = D (ssm_ratio 1)
                cases.append((bench_cross, (bt, d_vm, h, w, -(-d_vm // 16), dtype, vm)))
            if 'fusion' in ops:
                cases.append((bench_fusion, (bt, d_sm, h, w, dtype, f'SM-T s{i + 1} {bt}x{d_sm}x{h}x{w}')))
            if 'norm' in ops:
                cases.append((bench_norm, (bt, d_vm, h, w, dtype, vm)))
            if 'norm-last' in ops:  # Spatial-Mamba-T's block width: 64 channels at stage 1
                c_sm = 64 * 2**i
                cases.append((bench_norm_last, (bt, c_sm, h, w, dtype, f'SM-T s{i + 1} {bt}x{h}x{w}x{c_sm}')))
            if 'linear' in ops:  # VMamba-T's in_proj (C -> C), fc1 (C -> 4C), fc2 (4C -> C, plus the residual)
                cases.append((bench_linear2d, (bt, d_vm, d_vm, h, w, dtype, f'{vm} in_proj')))
                cases.append((bench_linear2d, (bt, d_vm, 4 * d_vm, h, w, dtype, f'{vm} fc1')))
                cases.append((bench_linear2d, (bt, 4 * d_vm, d_vm, h, w, dtype, f'{vm} fc2+res', True)))
            if 'merge' in ops:
                cases.append((bench_merge, (bt, d_vm, h, w, dtype, f'VM-T s{i + 1} {bt}x4x{d_vm}x{h}x{w}')))
        if 'cross' in ops:  # Spectral VMamba-T: 14x14 tokens at stage 1, C = 256 * 2^i, D = 2C, rank C / 16
            for i, side in enumerate((14, 7, 4)[:2 if quick else 3]):
                c = 256 * 2**i
                cases.append((bench_cross, (bt, 2 * c, side, side, c // 16, dtype,
                                            f'SV-T s{i + 1} {bt}x8x{2 * c}x{side * side}', True)))
        if 'merge' in ops:  # Spectral VMamba-T stage 1: D = 512 over 14x14 tokens
            cases.append((bench_merge, (bt, 512, 14, 14, dtype, f'SV-T s1 {bt}x8x512x14x14', True)))
        if 'fusion' in ops:
            cases.append((bench_fusion, (2, 128, 200, 336, dtype, 'SM-T det s1 2x128x200x336')))
        if 'scan' in ops:
            cases.append((bench_scan, ('state', 2, 128, 1, 200 * 336, dtype, 'SM-T det s1 2x128x67200', False)))
        if 'cross' in ops:
            cases.append((bench_cross, (2, 96, 200, 336, 6, dtype, 'VM-T det s1 2x96x200x336')))
        if 'dwconv' in ops:
            cases.append((bench_dense, (bt, 128, 56, 56, 11, dtype, f'{bt}x128x56x56')))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--dtypes', nargs='+', default=['fp32', 'bf16'], choices=list(DTYPES))
    parser.add_argument('--batch', type=int, default=128, help='batch of the classification shapes')
    parser.add_argument('--no-compile', action='store_true', help='skip the torch.compile baseline')
    parser.add_argument('--quick', action='store_true', help='stage 1 and 2 of Spatial-Mamba-T and VMamba-T only')
    parser.add_argument('--ops', nargs='+', default=list(OPS), choices=list(OPS),
                        help='which rows: selective scans, cross scan, state fusion, dense 11x11 depthwise conv, '
                        'LayerNorm2d, channels-last LayerNorm (layer_norm_last), 1x1 projections (Linear2d), token '
                        'maps (scatter_tokens, gather_tokens)')
    parser.add_argument('--json', help='also write the rows here')
    parser.add_argument('--markdown', help="also write the rows and the targets' verdicts here as Markdown tables "
                        '(those of kernels/README.md)')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit('bench_ops.py needs a CUDA device.')
    ops = set(args.ops)
    if ((ops & {'scan', 'cross'} and not scan_kernel_available())
            or (ops & {'fusion', 'dwconv'} and not dw_kernel_available())):
        raise SystemExit('build the kernels first: see kernels/README.md')
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    copy_bw = copy_bandwidth()
    print(f'device: {torch.cuda.get_device_name()}, torch {torch.__version__}, '
          f'device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + write)\n')
    table = Table(copy_bw)
    for bench, bench_args in plan(ops, [DTYPES[d] for d in args.dtypes], args.batch, args.quick, args.no_compile):
        bench(table, *bench_args)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bw=copy_bw, rows=table.rows), f, indent=1)
    print('\n' + targets_markdown(table.rows))
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, device-to-device copy '
                    f'{copy_bw / 1e12:.2f} TB/s\n\n{markdown_table(table.rows)}\n\n{targets_markdown(table.rows)}\n')


if __name__ == '__main__':
    main()
