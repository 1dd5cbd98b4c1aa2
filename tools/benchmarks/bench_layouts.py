"""Layout micro-benchmark: the memory-bound pieces of the Spatial-Mamba / VMamba blocks in the forms they can be
written in (which copy, which cuDNN / ATen / vssm kernel runs), at the T models' stage-1 shapes (batch 128, 56x56).

    python tools/benchmarks/bench_layouts.py [--batch 128] [--hw 56] [--iters 20] [--dtypes fp32 bf16]
        [--pieces cpe local ln2d linear2d x_proj dt_proj sm_x_proj cross_scan cross_merge copy stem] [--device cuda]

Each piece is a group of variants that compute the same function of the same inputs; the first is the form the
models used before the layout work of issue 5 ("was"), the one marked "now" is what they use. For every variant
and dtype (fp32 with TF32 on, or under bf16 autocast) it prints the forward time (no autograd) and the
forward+backward time, and checks that its output equals the first variant's (max relative difference). On a GPU the
times come from CUDA events; on a CPU (``--device cpu``, for a smoke test) from the wall clock and mean nothing.

Shapes: Spatial-Mamba-T stage 1 has C = 64 channels and D = 128 inner channels; VMamba-T C = 96, D = 192, K = 4
directions, dt rank R = 6; x_proj gets R + 32 output rows here (a state size of 16, wider than the models' 1).
"""
import argparse
import contextlib
import copy
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F

Variant = Tuple[str, Callable[..., torch.Tensor]]


def _timer(device: torch.device, fn: Callable[[], None], iters: int) -> float:
    """Milliseconds per call after 3 warm-up calls (benchmark.py's timed span: CUDA events on a GPU)."""
    from vssm.engine.launch import load_tool_module
    bench = load_tool_module(Path(__file__).resolve().parents[1] / 'analysis_tools' / 'benchmark.py',
                             'vssm_benchmark_tool')
    for _ in range(3):
        fn()
    return bench._timed_span(fn, iters, device) * 1e3 / iters


def build_pieces(batch: int, hw: int, device: torch.device):
    """name -> (make inputs, [(variant name, body)]); every body returns the piece's output."""
    from vssm.models.layers import grouped_matmul
    from vssm.ops import dwconv2d
    b, h, w = batch, hw, hw
    length = h * w
    kernel = 'cuda' if device.type == 'cuda' else 'torch'

    def leaf(*shape):
        return lambda: torch.randn(*shape, device=device, requires_grad=True)

    def inputs(*makers):
        return lambda: [m() for m in makers]

    c, d = 64, 128  # Spatial-Mamba-T stage 1
    cl = torch.channels_last
    cpe = [
        ('was: NCHW-memory x + conv(x) (ATen depthwise)',
         lambda x, wt, bs: (lambda y: y + F.conv2d(y, wt, bs, padding=1, groups=c))(
             x.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)),
        ('now: NHWC x + conv(x.permute) (cuDNN NHWC)',
         lambda x, wt, bs: x + F.conv2d(x.permute(0, 3, 1, 2), wt, bs, padding=1, groups=c).permute(0, 2, 3, 1)),
        ('NHWC, weight channels_last too',
         lambda x, wt, bs: x + F.conv2d(x.permute(0, 3, 1, 2), wt.contiguous(memory_format=cl), bs, padding=1,
                                        groups=c).permute(0, 2, 3, 1)),
        ('NCHW copy + vssm dwconv2d',
         lambda x, wt, bs: (lambda y: y + dwconv2d(y, wt, bs, backend=kernel))(
             x.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)),
    ]
    local = [
        ('now: slice.permute -> conv -> SiLU -> u contiguous',
         lambda xz, wt, bs: F.silu(F.conv2d(xz[..., :d].permute(0, 3, 1, 2), wt, bs, padding=1,
                                            groups=d)).flatten(2).contiguous()),
        ('slice.permute.contiguous -> conv',
         lambda xz, wt, bs: F.silu(F.conv2d(xz[..., :d].permute(0, 3, 1, 2).contiguous(), wt, bs, padding=1,
                                            groups=d)).flatten(2)),
        ('slice.contiguous (NHWC) -> conv, weight channels_last',
         lambda xz, wt, bs: F.silu(F.conv2d(xz[..., :d].contiguous().permute(0, 3, 1, 2),
                                            wt.contiguous(memory_format=cl), bs, padding=1,
                                            groups=d)).flatten(2).contiguous()),
        ('permute.contiguous -> vssm dwconv2d',
         lambda xz, wt, bs: F.silu(dwconv2d(xz[..., :d].permute(0, 3, 1, 2).contiguous(), wt, bs,
                                            backend=kernel)).flatten(2)),
    ]
    cv, dv, k, r = 96, 192, 4, 6  # VMamba-T stage 1
    ln2d = [
        ('now: permute -> F.layer_norm -> permute',
         lambda x, wt, bs: F.layer_norm(x.permute(0, 2, 3, 1), (cv, ), wt, bs).permute(0, 3, 1, 2)),
        ('mean / var over channels',
         lambda x, wt, bs: ((x - x.mean(1, keepdim=True)) * torch.rsqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5)
                            * wt[:, None, None] + bs[:, None, None])),
    ]
    linear2d = [
        ('now: 1x1 conv2d on channels_last memory',
         lambda x, wt: F.conv2d(x.permute(0, 3, 1, 2), wt[:, :, None, None])),
        ('1x1 conv2d on NCHW memory', lambda x, wt: F.conv2d(x.permute(0, 3, 1, 2).contiguous(), wt[:, :, None, None])),
        ('matmul W @ x.view(B, C, L) (NCHW)',
         lambda x, wt: torch.matmul(wt, x.permute(0, 3, 1, 2).contiguous().flatten(2)).view(b, -1, h, w)),
        ('F.linear on NHWC (as Swin)', lambda x, wt: F.linear(x, wt).permute(0, 3, 1, 2)),
    ]
    x_proj = [
        ('was: grouped 1x1 conv1d',
         lambda xs, wt: F.conv1d(xs.reshape(b, k * dv, length), wt.reshape(-1, dv, 1),
                                 groups=k).view(b, k, -1, length)),
        ('now: grouped_matmul', lambda xs, wt: grouped_matmul(wt, xs)),
        ('torch.matmul (broadcast)', lambda xs, wt: torch.matmul(wt, xs)),
        ('einsum bkdl,kcd->bkcl', lambda xs, wt: torch.einsum('bkdl,kcd->bkcl', xs, wt)),
    ]
    dt_proj = [
        ('was: einsum bkrl,kdr->bkdl', lambda dts, wt: torch.einsum('bkrl,kdr->bkdl', dts, wt)),
        ('now: grouped_matmul', lambda dts, wt: grouped_matmul(wt, dts)),
        ('torch.matmul (broadcast)', lambda dts, wt: torch.matmul(wt, dts)),
    ]
    sm_x_proj = [
        ('now: 1x1 conv1d', lambda u, wt: F.conv1d(u, wt[:, :, None])),
        ('matmul', lambda u, wt: torch.matmul(wt, u)),
    ]
    # VMamba's cross-scan: a strided copy for the column-major sequence, two flips and a stack (14 passes over a
    # (B, D, L) map), against one gather writing the four directions (5 passes); the cross-merge keeps its flips and
    # adds, and each is now the other's backward.
    from vssm.models.vmamba import cross_merge, cross_scan

    def flips_scan(x):
        rows, cols = x.flatten(2), x.transpose(2, 3).flatten(2)
        return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)

    def flips_merge(y):
        rows, cols = y[:, 0] + y[:, 2].flip(-1), y[:, 1] + y[:, 3].flip(-1)
        return rows.view(b, dv, h, w) + cols.view(b, dv, w, h).transpose(2, 3)

    scan = [('was: transposed copy, two flips, stack', flips_scan),
            ('now: one gather (backward: the merge)', cross_scan)]
    merge = [('was: two flips, three adds (autograd backward)', flips_merge),
             ('now: the same (backward: one gather)', lambda y: cross_merge(y, h, w))]
    clone = [('one (B, L, 128) map read and written', lambda x: x.clone())]
    # Spatial-Mamba-T's stem (convs + BatchNorm at 112x112 and 56x56; its BatchNorm backward took 10 ms of a
    # 211 ms training step at batch 128) in NCHW and in channels-last memory.
    from vssm.models.spatial_mamba import StemLayer
    stem_nchw = StemLayer(3, c).to(device)
    stem_nhwc = copy.deepcopy(stem_nchw).to(memory_format=cl)
    stem = [
        ('now: NCHW stem, output made contiguous NHWC', lambda img: stem_nchw(img)),
        ('channels_last stem', lambda img: stem_nhwc(img.contiguous(memory_format=cl))),
    ]
    return {
        'cpe': (inputs(leaf(b, h, w, c), leaf(c, 1, 3, 3), leaf(c)), cpe),
        'local': (inputs(leaf(b, h, w, 2 * d), leaf(d, 1, 3, 3), leaf(d)), local),
        'ln2d': (inputs(leaf(b, cv, h, w), leaf(cv), leaf(cv)), ln2d),
        'linear2d': (inputs(leaf(b, h, w, cv), leaf(2 * cv, cv)), linear2d),
        'x_proj': (inputs(leaf(b, k, dv, length), leaf(k, r + 32, dv)), x_proj),
        'dt_proj': (inputs(leaf(b, k, r, length), leaf(k, dv, r)), dt_proj),
        'sm_x_proj': (inputs(leaf(b, d, length), leaf(r, d)), sm_x_proj),
        'cross_scan': (inputs(leaf(b, dv, h, w)), scan),
        'cross_merge': (inputs(leaf(b, k, dv, length)), merge),
        'copy': (inputs(leaf(b, h, w, d)), clone),
        'stem': (inputs(leaf(b, 3, 4 * h, 4 * w)), stem),
    }


def measure(device: torch.device, make: Callable[[], List[torch.Tensor]], variants: Sequence[Variant], dtype: str,
            iters: int) -> List[dict]:
    """One row per variant: forward and forward+backward ms, max relative difference of the output to variant 0."""
    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == 'bf16' else contextlib.nullcontext()
    torch.manual_seed(0)
    args = make()
    rows, reference = [], None
    for name, body in variants:
        def forward():
            with torch.no_grad(), autocast():
                return body(*args)

        def forward_backward():
            with autocast():
                out = body(*args)
            out.float().sum().backward()
            for t in args:
                t.grad = None
        row = dict(name=name, dtype=dtype)
        try:
            out = forward().float()
            if reference is None:
                reference = out
            row['max_rel_diff'] = float((out - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
            row['fwd_ms'] = _timer(device, forward, iters)
            row['fwd_bwd_ms'] = _timer(device, forward_backward, iters)
        except Exception as error:  # noqa: BLE001  (a variant the device cannot run is reported, not fatal)
            row['error'] = f'{type(error).__name__}: {str(error).splitlines()[0][:120]}'
        rows.append(row)
    return rows


def format_row(piece: str, row: dict) -> str:
    head = f"{piece:9s} {row['dtype']:4s}  {row['name']:55s}"
    if 'error' in row:
        return f"{head} failed: {row['error']}"
    return (f"{head} fwd {row['fwd_ms']:8.3f} ms   fwd+bwd {row['fwd_bwd_ms']:8.3f} ms   "
            f"max rel. diff {row['max_rel_diff']:.1e}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--hw', type=int, default=56, help='feature map side (stage 1 of a 224x224 input: 56)')
    parser.add_argument('--iters', type=int, default=20, help='timed calls per variant (default: 20)')
    parser.add_argument('--dtypes', nargs='+', choices=['fp32', 'bf16'], default=['fp32', 'bf16'])
    parser.add_argument('--pieces', nargs='+', default=None, help='which pieces (default: all)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
    for name in ('batch', 'hw', 'iters'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1, got {getattr(args, name)}')
    return args


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    import vssm  # noqa: F401  (registers the backbones and ops)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    table = build_pieces(args.batch, args.hw, device)
    unknown = set(args.pieces or ()) - set(table)
    if unknown:
        raise SystemExit(f'--pieces: unknown {sorted(unknown)}; choose from {", ".join(table)}')
    print(f'device {device}, batch {args.batch}, {args.hw}x{args.hw}, TF32 on, {args.iters} timed calls', flush=True)
    results = []
    for dtype in args.dtypes:
        for piece in args.pieces or table:
            make, variants = table[piece]
            for row in measure(device, make, variants, dtype, args.iters):
                row['piece'] = piece
                results.append(row)
                print(format_row(piece, row), flush=True)
    return results


if __name__ == '__main__':
    main()
