"""Hardware counters of the vssm kernels at the shapes where the kernels issue's targets are missed (Nsight Compute).

    ncu --profile-from-start off --clock-control none \\
        --kernel-name 'regex:(dw_[a-z_]*kernel|scan_[a-z]*_kernel|spin_kernel)' \\
        --metrics $(python tools/benchmarks/ncu_kernels.py --metrics) -o kernels \\
        python tools/benchmarks/ncu_kernels.py --run [--cases fusion-s1-fp32 ...] > parts.log
    ncu --import kernels.ncu-rep --csv --page raw --print-units base --print-kernel-base function > kernels.csv
    python tools/benchmarks/ncu_kernels.py --summarize kernels.csv --parts parts.log [--markdown ncu.md]

(``bash tools/gpu/session.sh ncu`` does the three.) ``--run`` executes each case once (forward, then the backward of
that forward) between ``cudaProfilerStart``/``Stop``, with a ``torch.cuda._sleep`` kernel (``spin_kernel``) before
each part as a marker, so the summary can assign the profiled kernels to the parts in launch order without relying
on NVTX. ``--summarize`` prints, per part: each kernel's time, the DRAM bytes it moved against the minimal bytes of
the part (every input read once, every output written once, as bench_ops.py counts them), the DRAM throughput and
the SM throughput as a percentage of the GPU's peak, the achieved occupancy and the registers per thread. Together
they say why a kernel misses its bandwidth target: extra traffic (DRAM bytes above the minimum), too little memory
parallelism (low DRAM throughput at low occupancy), or instruction-bound (SM throughput above DRAM throughput).
"""
import argparse
import csv
import io
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

METRICS = (
    'gpu__time_duration.sum',
    'dram__bytes_read.sum',
    'dram__bytes_write.sum',
    'dram__throughput.avg.pct_of_peak_sustained_elapsed',
    'sm__throughput.avg.pct_of_peak_sustained_elapsed',
    'sm__warps_active.avg.pct_of_peak_sustained_active',
    'launch__registers_per_thread',
    'launch__grid_size',
    'launch__block_size',
)
MARKER = 'spin_kernel'  # torch.cuda._sleep's kernel: the boundary before each part

# name -> (op, B, C, H, W, dtype): the shapes of the missed targets (kernels/README.md), batch 128 unless detection.
CASES = {
    'fusion-s1-fp32': ('fusion', 128, 128, 56, 56, 'fp32'),
    'fusion-s1-bf16': ('fusion', 128, 128, 56, 56, 'bf16'),
    'fusion-s2-fp32': ('fusion', 128, 256, 28, 28, 'fp32'),
    'fusion-s2-bf16': ('fusion', 128, 256, 28, 28, 'bf16'),
    'fusion-det-fp32': ('fusion', 2, 128, 200, 336, 'fp32'),
    'scan-state-s2-fp32': ('scan-state', 128, 256, 28, 28, 'fp32'),
    'scan-state-s2-bf16': ('scan-state', 128, 256, 28, 28, 'bf16'),
    'scan-state-s1-bf16': ('scan-state', 128, 128, 56, 56, 'bf16'),
    'scan-output-s2-bf16': ('scan-output', 128, 4 * 192, 28, 28, 'bf16'),
}


def build_case(name: str, device: str = 'cuda', batch: Optional[int] = None):
    """bench_ops.py's case (inputs, ``run(backend)``, minimal bytes) for one of :data:`CASES`; ``batch`` overrides
    its batch and a CPU device takes the reference ops (for tests). Returns (function, leaves, minimal bytes)."""
    import torch
    from vssm.engine.launch import load_tool_module
    bench_ops = load_tool_module(Path(__file__).resolve().parent / 'bench_ops.py', 'vssm_bench_ops_tool')
    op, b, c, h, w, dname = CASES[name]
    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[dname]
    b = batch or b
    if op == 'fusion':
        case = bench_ops.fusion_case(b, c, h, w, dtype, device)
    else:
        form = op.split('-')[1]
        case = bench_ops.scan_case(form, b, c, 4 if form == 'output' else 1, h * w, dtype, device)
    backend = 'cuda' if device == 'cuda' else 'torch'
    return (lambda: case.run(backend)), case.leaves, dict(fwd=case.fwd_bytes, bwd=case.bwd_bytes)


def run(cases: Sequence[str], device: str = 'cuda', batch: Optional[int] = None) -> List[Tuple[str, float]]:
    """Each case's forward and backward once inside the profiler range, a marker kernel before each part; returns the
    parts in launch order with their minimal bytes (the summary reads them from the printed plan)."""
    import torch
    cuda = device == 'cuda'
    marker = torch.cuda._sleep if cuda else (lambda cycles: None)
    parts = []
    built = {name: build_case(name, device, batch) for name in cases}
    for fn, leaves, _ in built.values():  # warm-up outside the profiled range (allocations, function attributes)
        out = fn()
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for name, (fn, leaves, minimal) in built.items():
        marker(1)
        out = fn()
        grad = torch.ones_like(out)
        parts.append((f'{name} fwd', minimal['fwd']))
        marker(1)
        torch.autograd.grad(out, leaves, grad)
        parts.append((f'{name} bwd', minimal['bwd']))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    for part, nbytes in parts:
        print(f'PART {part} {nbytes:.0f}')
    return parts


def _number(text: str) -> Optional[float]:
    try:
        return float(text.replace(',', ''))
    except ValueError:
        return None


def read_raw_csv(text: str) -> List[Dict[str, str]]:
    """The kernel rows of ``ncu --import R --csv --page raw``, in launch order (a units row, if any, dropped)."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows = list(csv.DictReader(io.StringIO('\n'.join(lines))))
    return [r for r in rows if (r.get('ID') or '').strip().isdigit()]


def split_parts(rows: List[Dict[str, str]], parts: Sequence[Tuple[str, float]]) -> List[Tuple[str, float, List]]:
    """Assign the kernels after each marker to the next part (markers and parts in the same order)."""
    groups: List[List[Dict[str, str]]] = []
    for r in rows:
        if MARKER in r.get('Kernel Name', ''):
            groups.append([])
        elif groups:
            groups[-1].append(r)
    if len(groups) != len(parts):
        raise ValueError(f'{len(groups)} marker kernels in the report but {len(parts)} parts in the plan: profile '
                         'with --kernel-name regex matching spin_kernel, and pass the PART lines of the same run.')
    return [(name, nbytes, kernels) for (name, nbytes), kernels in zip(parts, groups)]


def summarize(rows: List[Dict[str, str]], parts: Sequence[Tuple[str, float]]) -> List[Dict]:
    """One entry per kernel: part, kernel, time, DRAM bytes against the part's minimum, throughputs, occupancy."""
    out = []
    for part, minimal, kernels in split_parts(rows, parts):
        total_ns = sum(_number(k.get('gpu__time_duration.sum', '')) or 0.0 for k in kernels)
        for k in kernels:
            dram = sum(_number(k.get(m, '')) or 0.0 for m in ('dram__bytes_read.sum', 'dram__bytes_write.sum'))
            ns = _number(k.get('gpu__time_duration.sum', '')) or 0.0
            out.append(dict(part=part, kernel=k.get('Kernel Name', '?'), us=ns / 1e3,
                            share=ns / total_ns if total_ns else None, dram_mb=dram / 1e6,
                            dram_over_minimal=dram / minimal if minimal else None,
                            dram_pct=_number(k.get('dram__throughput.avg.pct_of_peak_sustained_elapsed', '')),
                            sm_pct=_number(k.get('sm__throughput.avg.pct_of_peak_sustained_elapsed', '')),
                            occupancy_pct=_number(k.get('sm__warps_active.avg.pct_of_peak_sustained_active', '')),
                            registers=_number(k.get('launch__registers_per_thread', '')),
                            grid=_number(k.get('launch__grid_size', '')),
                            block=_number(k.get('launch__block_size', ''))))
    return out


def markdown(entries: List[Dict]) -> str:
    def f(v, fmt):
        return '-' if v is None else fmt.format(v)

    lines = ['| part | kernel | time us | DRAM MB | DRAM / minimal | DRAM % peak | SM % peak | occupancy % | regs | '
             'grid x block |', '|---|---|---|---|---|---|---|---|---|---|']
    for e in entries:
        grid = '-' if e['grid'] is None else f"{e['grid']:.0f} x {f(e['block'], '{:.0f}')}"
        lines.append(f"| {e['part']} | {e['kernel']} | {e['us']:.1f} | {e['dram_mb']:.1f} | "
                     f"{f(e['dram_over_minimal'], '{:.2f}')} | {f(e['dram_pct'], '{:.0f}')} | "
                     f"{f(e['sm_pct'], '{:.0f}')} | {f(e['occupancy_pct'], '{:.0f}')} | "
                     f"{f(e['registers'], '{:.0f}')} | {grid} |")
    return '\n'.join(lines)


def read_parts(text: str) -> List[Tuple[str, float]]:
    """The ``PART name bytes`` lines that ``--run`` printed."""
    parts = []
    for line in text.splitlines():
        if line.startswith('PART '):
            name, nbytes = line[5:].rsplit(' ', 1)
            parts.append((name, float(nbytes)))
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument('--metrics', action='store_true', help='print the comma-separated metric list for ncu')
    mode.add_argument('--run', action='store_true', help='run the cases (under ncu; GPU and kernels needed)')
    mode.add_argument('--summarize', metavar='CSV', help='summarize `ncu --import R --csv --page raw` output')
    parser.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES))
    parser.add_argument('--parts', help="the --run output with its PART lines (for --summarize)")
    parser.add_argument('--markdown', help='also write the summary table here')
    args = parser.parse_args()
    if args.metrics:
        print(','.join(METRICS))
        return
    if args.run:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit('ncu_kernels.py --run needs a CUDA device and the built kernels.')
        run(args.cases)
        return
    if not args.parts:
        raise SystemExit('--summarize needs --parts FILE: the output of the --run that ncu profiled.')
    with open(args.summarize) as f:
        rows = read_raw_csv(f.read())
    with open(args.parts) as f:
        parts = read_parts(f.read())
    table = markdown(summarize(rows, parts))
    print(table)
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(table + '\n')


if __name__ == '__main__':
    main()
