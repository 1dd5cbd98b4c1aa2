"""Fuzz the CUDA kernels against the PyTorch references over random cases (GPU only).

    python tools/fuzz_kernels.py [--cases 1000] [--seed 0] [--ops scan-state scan-output dwconv2d state-fusion]
                                 [--json out.json] [--dry-run]

For each op, ``--cases`` random cases are drawn from :mod:`vssm.ops.fuzz` (its GPU bounds: L up to 6000 with the
models' and the 256-step chunk boundaries' lengths such as 1, 49, 129, 255-257, 3136; N up to 16; K = 1, 2, 4 or 8
groups of B/C; depthwise kernels 1..31 with dilations, zero and replicate padding, planes from 1x1 across the 32x32
tiles; every flag combination; fp32, fp16 and bf16; contiguous, transposed, sliced, stride-0 and channels-last
inputs). Each case runs forward and backward on the kernel (``backend='cuda'``) and on the reference
(``backend='torch'``) as ``tests/ops/test_*_cuda.py`` do: the scan's reference takes the same inputs (it computes in
float32 itself), the conv references run on the inputs cast to float32, with TF32 off. The output and the gradient
of every input are compared by ``max|kernel - reference| / max|reference|`` against the tolerances of those tests.

Prints per op and dtype the number of cases, the mismatches and the worst relative error (the tensor closest to,
or furthest past, its tolerance), then every failing case's parameters (``--seed`` and ``--cases`` reproduce
them; ``vssm.ops.fuzz.make_inputs(case, 'cuda')`` rebuilds one). ``--json`` also writes the table and the failures.
Exit code 0 when every case matched, 1 when any did not, 2 without a CUDA device or the built kernels.
``--dry-run`` only draws the cases and lists them (any machine).
"""
import argparse
import dataclasses
import json
import math
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from vssm.ops import fuzz
from vssm.ops.dwconv2d import kernel_available as dwconv_kernel_available
from vssm.ops.fuzz import call_op
from vssm.ops.selective_scan import kernel_available as scan_kernel_available

# op name -> (draw function, bounds, whether its kernel is built)
OPS = {
    'scan-state': (fuzz.draw_scan_case, dataclasses.replace(fuzz.GPU_SCAN, forms=('state', )), scan_kernel_available),
    'scan-output': (fuzz.draw_scan_case, dataclasses.replace(fuzz.GPU_SCAN, forms=('output', )),
                    scan_kernel_available),
    'dwconv2d': (fuzz.draw_dwconv_case, fuzz.GPU_DWCONV, dwconv_kernel_available),
    'state-fusion': (fuzz.draw_fusion_case, fuzz.GPU_FUSION, dwconv_kernel_available),
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
ACTIVATIONS = ('u', 'delta', 'B', 'C', 'x', 'h')


@dataclasses.dataclass
class CaseResult:
    """One case's comparison.

    Args:
        case: the case.
        errors: relative error per compared tensor: ``'out'`` and the input names (their gradients).
        tolerances: the tolerance per compared tensor.
        error: why the case could not be compared (an exception or a shape/dtype difference), else ``None``.
    """

    case: fuzz.Case
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
        name = max(self.errors, key=lambda k: self.errors[k] / self.tolerances[k])
        return name, self.errors[name], self.errors[name] / self.tolerances[name]


def op_name(case: fuzz.Case) -> str:
    if isinstance(case, fuzz.ScanCase):
        return f'scan-{case.form}'
    return 'dwconv2d' if isinstance(case, fuzz.DWConvCase) else 'state-fusion'


def tolerance(case: fuzz.Case, name: str) -> float:
    """The tolerance of the output (``name='out'``) or of the gradient of input ``name``."""
    if isinstance(case, fuzz.ScanCase):
        if name == 'out':
            return SCAN_OUT_TOL
        return SCAN_GRAD_TOL[case.dtype] if name in ACTIVATIONS else SCAN_PARAM_GRAD_TOL
    return CONV_TOL[case.dtype] if name in ('out', *ACTIVATIONS) else CONV_PARAM_GRAD_TOL


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max|expected - got| / max|expected|; ``inf`` where either holds NaN or inf."""
    got, expected = got.detach().double(), expected.detach().double()
    err = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else math.inf


def compare_case(case: fuzz.Case, device: str = 'cuda') -> CaseResult:
    """Run ``case`` forward and backward on the kernel and on the reference and compare every result."""
    inputs = fuzz.make_inputs(case, device)
    scan = isinstance(case, fuzz.ScanCase)
    leaves_k = {k: v.detach().requires_grad_() for k, v in inputs.items()}  # each input keeps its layout
    leaves_r = {k: (v.detach() if scan else v.detach().float()).requires_grad_() for k, v in inputs.items()}
    out_dtype = torch.float32 if scan else case.torch_dtype
    try:
        out_k = call_op(case, leaves_k, backend='cuda')
        out_r = call_op(case, leaves_r, backend='torch')
        if out_k.dtype != out_dtype or out_k.shape != out_r.shape:
            return CaseResult(case, {}, {}, f'output {out_k.dtype} {tuple(out_k.shape)}, expected {out_dtype} '
                              f'{tuple(out_r.shape)}')
        # Rounded to the kernel's output dtype, so that both receive the same incoming gradient.
        dout = fuzz.grad_output(case, out_k.dtype, device)
        grads_k = torch.autograd.grad(out_k, list(leaves_k.values()), dout.to(out_k.dtype))
        grads_r = torch.autograd.grad(out_r, list(leaves_r.values()), dout.to(out_r.dtype))
    except (RuntimeError, ValueError) as exc:  # reported as a failing case, the run goes on
        return CaseResult(case, {}, {}, f'{type(exc).__name__}: {exc}')
    errors = {'out': rel_err(out_k, out_r)}
    for (name, leaf), grad_k, grad_r in zip(leaves_k.items(), grads_k, grads_r):
        if grad_k.dtype != leaf.dtype or grad_k.shape != leaf.shape:
            return CaseResult(case, {}, {}, f'gradient of {name}: {grad_k.dtype} {tuple(grad_k.shape)}, expected '
                              f'{leaf.dtype} {tuple(leaf.shape)}')
        errors[name] = rel_err(grad_k, grad_r)
    return CaseResult(case, errors, {name: tolerance(case, name) for name in errors})


def draw_cases(op: str, count: int, seed: int) -> List[fuzz.Case]:
    """``count`` cases of ``op``; each op has its own stream, so ``--ops`` does not change the others' cases."""
    draw, bounds, _ = OPS[op]
    chooser = fuzz.RandomChooser(f'{seed}-{op}')
    return [draw(chooser, bounds) for _ in range(count)]


def summarize(results: Sequence[CaseResult]) -> List[Dict]:
    """One row per op and dtype: cases, mismatches and the worst error (by error / tolerance)."""
    groups: Dict[Tuple[str, str], List[CaseResult]] = defaultdict(list)
    for result in results:
        groups[(result.op, result.case.dtype)].append(result)
    rows = []
    for (op, dtype), group in sorted(groups.items(), key=lambda item: (list(OPS).index(item[0][0]),
                                                                       list(fuzz.DTYPES).index(item[0][1]))):
        worst = max(group, key=lambda r: r.worst()[2])
        tensor, err, _ = worst.worst()
        rows.append(dict(op=op, dtype=dtype, cases=len(group), mismatches=sum(not r.ok for r in group),
                         worst_error=err, worst_tensor=tensor, tolerance=worst.tolerances.get(tensor)))
    return rows


def print_table(rows: Sequence[Dict]) -> None:
    print(f'{"op":<14}{"dtype":<10}{"cases":>7}{"mismatches":>12}{"worst rel. err":>16}  tensor (tolerance)')
    for row in rows:
        tol = '' if row['tolerance'] is None else f' ({row["tolerance"]:.0e})'
        print(f'{row["op"]:<14}{row["dtype"]:<10}{row["cases"]:>7}{row["mismatches"]:>12}'
              f'{row["worst_error"]:>16.2e}  {row["worst_tensor"]}{tol}')


def describe_failure(index: int, result: CaseResult) -> str:
    if result.error is not None:
        why = result.error
    else:
        why = ', '.join(f'{name} {err:.2e} > {result.tolerances[name]:.0e}' for name, err in result.errors.items()
                        if err > result.tolerances[name])
    return f'{result.op} #{index} {result.case.dtype}: {why}\n    {result.case}'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--cases', type=int, default=1000, help='random cases per op')
    parser.add_argument('--seed', type=int, default=0, help='seed of the cases')
    parser.add_argument('--ops', nargs='+', choices=list(OPS), default=list(OPS), help='ops to fuzz')
    parser.add_argument('--json', help='also write the results (or, with --dry-run, the cases) to this file')
    parser.add_argument('--dry-run', action='store_true', help='only draw and list the cases (no GPU needed)')
    return parser


def dry_run(cases: Dict[str, List[fuzz.Case]], json_path: Optional[str]) -> int:
    for op, op_cases in cases.items():
        for index, case in enumerate(op_cases):
            print(f'{op} #{index}: {case}')
    for op, op_cases in cases.items():
        counts = defaultdict(int)
        for case in op_cases:
            counts[case.dtype] += 1
        print(f'{op}: ' + ', '.join(f'{n} {dtype}' for dtype, n in sorted(counts.items())))
    if json_path:
        listed = [dict(op=op, index=i, case=dataclasses.asdict(case)) for op, op_cases in cases.items()
                  for i, case in enumerate(op_cases)]
        with open(json_path, 'w') as f:
            json.dump(dict(cases=listed), f, indent=1)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cases = {op: draw_cases(op, args.cases, args.seed) for op in args.ops}
    if args.dry_run:
        return dry_run(cases, args.json)
    if not torch.cuda.is_available():
        parser.exit(2, 'fuzz_kernels.py needs a CUDA device (use --dry-run to only draw the cases).\n')
    missing = [op for op in args.ops if not OPS[op][2]()]
    if missing:
        parser.exit(2, f'fuzz_kernels.py: the kernels of {", ".join(missing)} are not built: see kernels/README.md '
                    '(TORCH_CUDA_ARCH_LIST="9.0" pip install --no-build-isolation -v kernels/selective_scan '
                    'kernels/dwconv2d).\n')
    torch.backends.cudnn.allow_tf32 = False  # the float32 references must be float32
    torch.backends.cuda.matmul.allow_tf32 = False
    results: Dict[str, List[CaseResult]] = {}
    for op, op_cases in cases.items():
        start = time.perf_counter()
        results[op] = [compare_case(case) for case in op_cases]
        print(f'{op}: {len(op_cases)} cases in {time.perf_counter() - start:.1f} s', flush=True)
    rows = summarize([r for op_results in results.values() for r in op_results])
    print(f'\n{torch.cuda.get_device_name()}, torch {torch.__version__}, seed {args.seed}')
    print_table(rows)
    failures = [(op, i, r) for op, op_results in results.items() for i, r in enumerate(op_results) if not r.ok]
    if failures:
        print(f'\n{len(failures)} failing cases:')
        for _, index, result in failures:
            print(describe_failure(index, result))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, seed=args.seed,
                           cases=args.cases, summary=rows,
                           failures=[dict(op=op, index=i, case=dataclasses.asdict(r.case), errors=r.errors,
                                          tolerances=r.tolerances, error=r.error) for op, i, r in failures]),
                      f, indent=1)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
