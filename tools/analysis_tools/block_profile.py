"""Kernels, time and minimal memory traffic of one block of each T model (VMamba-T's ``VSSBlock``,
Spatial-Mamba-T's ``SpatialMambaBlock``, Spectral VMamba-T's ``SpectralBlock``), and the DRAM bytes Nsight Compute
measures for it: how far each block's kernels are from one pass over memory.

    python tools/analysis_tools/block_profile.py [--models NAME ...] [--parts PART ...] [--stage 1] [--batch 128]
        [--size 224] [--warmup 10] [--iters 30] [--device cuda] [--backend auto] [--tf32 | --no-tf32] [--top N]
        [--json rows.json] [--markdown table.md]
    python tools/analysis_tools/block_profile.py --ncu-part MODEL:PART [--stage 1] [--batch 128] [--size 224]
        [--warmup 10]
    python tools/analysis_tools/block_profile.py --summarize MODEL:PART=CSV [MODEL:PART=CSV ...] [--markdown dram.md]

Protocol:

* The block: the first block of stage ``--stage`` (default 1: ``backbone.layers[0].blocks[0]``; stage 3 holds most
  of the blocks of the T models) of the backbone that the model's
  classification config builds (classification/configs/<family>/*-tiny_8xb128_in1k.py; random weights, nothing
  loaded: ``vssm.analysis.models``), with ``ops_backend=--backend``. Its input is recorded, not made up: a forward
  pre-hook on the block takes the arguments it receives in a forward of the whole backbone on ``--batch`` random
  images of ``--size`` x ``--size`` and stops that forward there. So shapes, dtypes and memory layouts are the
  real ones (VMamba's channels-first map in channels-last memory, Spatial-Mamba's channels-last (B, H, W, C) map,
  Spectral VMamba's (B, 256, H/16, W/16) RFN features), and for Spectral VMamba the scan index argument is the
  ``ScanIndex`` that the backbone's own spectral ordering computed for these images. The input is recorded again
  for each part, under that part's mode and autocast (under bf16 autocast the stem hands the block another dtype),
  and keeps ``requires_grad`` as in the real training forward (Spectral VMamba's frozen RFN: no input gradient).
* Parts: ``fwd-fp32``: ``eval()``, ``torch.no_grad()``, fp32 (TF32 on unless ``--no-tf32``, as in benchmark.py).
  ``fwd-bf16``: the same under bf16 autocast. ``train-bf16``: ``train()``, the forward under bf16 autocast, then the
  backward of ``sum(out * P)`` for a fixed random projection P of the output's shape and dtype, run as
  ``out.backward(P)`` (the same gradients without the product and sum kernels, so that only the block's kernels are
  counted); the gradients are set to ``None`` before each call, as ``zero_grad(set_to_none=True)`` does in training.
* Kernels per call: one call after the timed ones, under ``torch.profiler``. On a GPU, the CUDA kernels it
  launched (memcpy and memset events are not counted, nor does ncu profile them); on a CPU, where there are no
  kernels, the top-level CPU operator events (an aten op, a custom autograd function, an autograd node of the
  backward), reported as ``ops`` so that the plumbing runs anywhere.
* Time per call: ``--warmup`` untimed calls, then the median of ``--iters`` calls, each timed on its own with CUDA
  events (``time.perf_counter`` on a CPU).
* Top kernels (``--top N``): three more calls under ``torch.profiler`` (with Python stacks), the N kernels with the
  most device time (on a CPU: operators by self time), each with its time per call, share, launches per call and its
  call sites in the repository (the nearest ``vssm/`` or ``tools/`` function above the launching operator).
* Minimal bytes: what one pass over memory must move at least. Forward: every tensor the block receives read once
  (for Spectral VMamba the features and the ScanIndex's three int64 maps, listed apart as ``index``), its output
  written once, its parameters (and buffers, if any) read once. ``train-bf16`` adds the output gradient read, the
  gradient of each input that requires one written, and the parameter gradients written, to the forward's bytes.
  Element sizes are those of the actual tensors; parameters count at their storage dtype (fp32) also under
  autocast, which reads them as fp32 and casts them (the cast copies are not counted: they are not needed).
  MB = 10^6 bytes.
* DRAM bytes (GPU, Nsight Compute): ``--ncu-part MODEL:PART`` builds and records as above, runs ``--warmup``
  calls (at least one), then exactly one call between ``torch.cuda.profiler.start()`` and ``stop()``; with
  ``--profile-from-start off`` ncu profiles only that call's kernels. The tool's row goes to stderr; ncu's CSV
  comes on stdout after the program's output (mmengine's log lines, ncu's ``==PROF==`` lines), all of which
  ``--summarize`` skips: it starts at the CSV header. ``--summarize`` computes the minimal bytes of the block of
  its own ``--stage``: give it the one the ``--ncu-part`` runs had.
  ncu flushes the caches before each kernel by default (``--cache-control all``): each kernel's bytes are its
  cold-cache traffic, so data handed from kernel to kernel through the L2 cache counts twice; add
  ``--cache-control none`` to measure with the L2 kept. ``--print-units base`` keeps the values in bytes; without
  it ncu scales them (Kbyte, Mbyte, ...), which ``--summarize`` reads from the units row (powers of 1000):

    ncu --profile-from-start off --print-units base --metrics dram__bytes_read.sum,dram__bytes_write.sum \\
        --csv --page raw python tools/analysis_tools/block_profile.py --ncu-part vmamba-t:train-bf16 \\
        > vmamba-train.csv
    ncu --profile-from-start off --print-units base --metrics dram__bytes_read.sum,dram__bytes_write.sum \\
        --csv --page raw python tools/analysis_tools/block_profile.py --ncu-part vmamba-t:fwd-bf16 \\
        > vmamba-fwd.csv
    python tools/analysis_tools/block_profile.py --summarize vmamba-t:train-bf16=vmamba-train.csv \\
        vmamba-t:fwd-bf16=vmamba-fwd.csv --markdown dram.md

  ``--summarize`` reads each CSV (a header row with "Kernel Name", "dram__bytes_read.sum" and
  "dram__bytes_write.sum", an optional units row, one row per kernel; thousands separators allowed) and writes a
  table: kernels, DRAM bytes read + written, the minimal bytes of that part (recomputed here: run it with the
  ``--batch``, ``--size``, ``--backend`` and on the kind of device of the profiled run, since the dtypes under
  autocast differ between devices), DRAM / minimal, and the three kernels that moved the most.
* Robustness: a model that fails (out of memory, a build error) gets the error in its rows and the run goes on;
  ``--json`` and ``--markdown`` are rewritten after every model.

Output: a table on stdout; ``--json PATH``: the settings and every row (with the byte count of each term);
``--markdown PATH``: a table with the device, torch version, batch, size and iterations.
"""
import argparse
import contextlib
import csv
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

import torch
from torch import Tensor, nn

from vssm.analysis.models import MODEL_SPECS, ModelSpec, build_backbone, model_name_type, prepare_config
from vssm.analysis.timing import (
    device_name,
    error_text,
    format_top_op,
    median_ms,
    prepare_device,
    profile_top_ops,
    release,
    synchronize,
    write_results,
)

PARTS = ('fwd-fp32', 'fwd-bf16', 'train-bf16')
OUR_MODELS = tuple(name for name, spec in MODEL_SPECS.items() if spec.ours)
DEFAULT_MODELS = ('vmamba-t', 'spatial-mamba-t', 'spectral-vmamba-t')
BACKENDS = ('auto', 'torch', 'cuda')
MB = 1e6
TOP_CALLS = 3  # calls profiled for --top
NCU_READ, NCU_WRITE = 'dram__bytes_read.sum', 'dram__bytes_write.sum'
NCU_NAME_COLUMNS = ('Kernel Name', 'Function Name')
# ncu's auto-scaled byte units (powers of 1000) and binary ones, should a version print them.
UNIT_SCALES = {'': 1, 'b': 1, 'byte': 1, 'bytes': 1, 'kb': 1e3, 'kbyte': 1e3, 'mb': 1e6, 'mbyte': 1e6, 'gb': 1e9,
               'gbyte': 1e9, 'tb': 1e12, 'tbyte': 1e12, 'kib': 2**10, 'mib': 2**20, 'gib': 2**30, 'tib': 2**40}


# --- the block and its recorded input ----------------------------------------------------------------------------
def build_trunk(spec: ModelSpec, backend: str) -> nn.Module:
    """The backbone of ``spec``'s classification config (random weights) with ``ops_backend=backend``."""
    return build_backbone(prepare_config(spec.config('cls')), ops_backend=backend)


def stage_block(backbone: nn.Module, stage: int = 1) -> nn.Module:
    """The first block of ``stage`` (1 = the first stage)."""
    stages = len(backbone.layers)
    if not 1 <= stage <= stages:
        raise ValueError(f'--stage {stage}: {type(backbone).__name__} has stages 1 to {stages}.')
    return backbone.layers[stage - 1].blocks[0]


def part_settings(part: str) -> Tuple[bool, str]:
    """(training, dtype) of a part, e.g. ``(True, 'bf16')`` for ``'train-bf16'``."""
    return part.startswith('train'), part.rsplit('-', 1)[1]


def _autocast(device: torch.device, dtype: str):
    if dtype == 'bf16':
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside its tuples (named tuples too), lists and dicts."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, '_fields'):
        return type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _tensors(value: Any) -> List[Tensor]:
    found: List[Tensor] = []
    _map_tensors(value, lambda t: found.append(t) or t)
    return found


@dataclass
class BlockCall:
    """The arguments a block received in a backbone forward (detached leaves)."""
    args: tuple
    kwargs: dict

    def __call__(self, block: nn.Module) -> Tensor:
        return block(*self.args, **self.kwargs)

    def tensors(self) -> List[Tensor]:
        """Every tensor argument once (two arguments viewing the same elements count once)."""
        unique: Dict[Tuple[int, int, torch.dtype], Tensor] = {}
        for t in _tensors((self.args, self.kwargs)):
            unique.setdefault((t.data_ptr(), t.numel(), t.dtype), t)
        return list(unique.values())


class _Recorded(Exception):
    """Raised by the pre-hook to stop the backbone's forward once the block's input is recorded."""


def record_block_call(backbone: nn.Module, block: nn.Module, images: Tensor, part: str,
                      device: torch.device) -> BlockCall:
    """The arguments ``block`` receives when ``backbone`` runs on ``images`` in ``part``'s mode and autocast. The
    forward stops at the block (nothing after it runs). Tensors come back detached with their strides;
    floating-point ones require grad where the real forward's did (only in training parts)."""
    training, dtype = part_settings(part)
    recorded: Dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        def leaf(t: Tensor) -> Tensor:
            out = t.detach()
            return out.requires_grad_() if t.requires_grad and t.is_floating_point() else out

        recorded['call'] = BlockCall(_map_tensors(args, leaf), _map_tensors(kwargs, leaf))
        raise _Recorded

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    backbone.train(training)
    try:
        with torch.set_grad_enabled(training), _autocast(device, dtype):
            backbone(images)
    except _Recorded:
        pass
    finally:
        handle.remove()
        backbone.eval()
    if 'call' not in recorded:
        raise RuntimeError(f'the backbone forward never called its first block ({type(block).__name__})')
    return recorded['call']


# --- one part: its step, output and minimal bytes ----------------------------------------------------------------
@dataclass
class PreparedPart:
    """A part ready to run: ``step()`` is one call (forward, or forward + backward)."""
    call: BlockCall
    step: Callable[[], None]
    output_bytes: int
    output_dtype: torch.dtype
    bytes: Dict[str, int]

    @property
    def minimal_bytes(self) -> int:
        return sum(self.bytes.values())


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def minimal_bytes(block: nn.Module, call: BlockCall, output_bytes: int, training: bool) -> Dict[str, int]:
    """The terms of the minimal bytes (see the module docstring): ``input`` (floating-point arguments), ``index``
    (integer arguments), ``output``, ``parameters``; for training also ``grad_output``, ``grad_input``,
    ``grad_parameters``."""
    inputs = call.tensors()
    weights = list(block.parameters()) + list(block.buffers())
    terms = dict(input=sum(_nbytes(t) for t in inputs if t.is_floating_point()),
                 index=sum(_nbytes(t) for t in inputs if not t.is_floating_point()),
                 output=output_bytes, parameters=sum(_nbytes(p) for p in weights))
    if training:
        terms.update(grad_output=output_bytes, grad_input=sum(_nbytes(t) for t in inputs if t.requires_grad),
                     grad_parameters=sum(_nbytes(p) for p in block.parameters() if p.requires_grad))
    return terms


def prepare_part(backbone: nn.Module, block: nn.Module, images: Tensor, part: str,
                 device: torch.device) -> PreparedPart:
    """Record the block's input for ``part``, run one probe forward (the output's size and dtype) and build the
    part's step. Leaves the block in the part's mode (``train()`` for training parts)."""
    training, dtype = part_settings(part)
    call = record_block_call(backbone, block, images, part, device)
    block.train(training)
    with torch.set_grad_enabled(training), _autocast(device, dtype):
        out = call(block)
    if not isinstance(out, Tensor):
        raise TypeError(f'{type(block).__name__} returned {type(out).__name__}; the tool measures blocks that '
                        'return one tensor')
    output_bytes, output_dtype = _nbytes(out), out.dtype
    if training:
        projection = torch.randn_like(out.detach())  # d sum(out * P) / d out = P
        leaves = [p for p in block.parameters() if p.requires_grad] + [t for t in call.tensors() if t.requires_grad]

        def step() -> None:
            for t in leaves:
                t.grad = None
            with _autocast(device, dtype):
                result = call(block)
            result.backward(projection)
    else:
        def step() -> None:
            with torch.no_grad(), _autocast(device, dtype):
                call(block)
    del out
    return PreparedPart(call, step, output_bytes, output_dtype,
                        minimal_bytes(block, call, output_bytes, training))


def count_launches(step: Callable[[], None], device: torch.device) -> int:
    """Kernels one call of ``step`` launches on a GPU; on a CPU its top-level operator events."""
    from torch.profiler import ProfilerActivity, profile
    gpu = device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    if gpu:
        return sum(e.count for e in prof.key_averages()
                   if e.device_type.name == 'CUDA' and not e.key.startswith(('Memcpy', 'Memset')))
    return sum(1 for e in prof.events() if e.device_type.name == 'CPU' and e.cpu_parent is None)


@contextlib.contextmanager
def cuda_profiler_range(device: torch.device) -> Iterator[None]:
    """``torch.cuda.profiler.start()`` ... ``stop()`` around the body on a GPU (ncu ``--profile-from-start off``
    profiles what runs inside); nothing on a CPU."""
    if device.type != 'cuda':
        yield
        return
    synchronize(device)
    torch.cuda.profiler.start()
    try:
        yield
        synchronize(device)
    finally:
        torch.cuda.profiler.stop()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace('torch.', '')


def _layout(t: Tensor) -> str:
    if t.is_contiguous():
        return 'contiguous'
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return 'channels_last'
    return f'strides {tuple(t.stride())}'


def describe_call(call: BlockCall) -> Dict[str, Any]:
    """The first tensor argument's shape, dtype and layout; the other arguments in a few words."""
    first = next(a for a in call.args if isinstance(a, Tensor))
    others = []
    for value in [a for a in call.args if a is not first] + list(call.kwargs.values()):
        tensors = _tensors(value)
        what = ', '.join(f'{_dtype_name(t.dtype)} {tuple(t.shape)}' for t in tensors) or repr(value)
        others.append(f'{type(value).__name__}({what})')
    return dict(input_shape=list(first.shape), input_dtype=_dtype_name(first.dtype), input_layout=_layout(first),
                other_inputs='; '.join(others))


# --- reading ncu's CSV -------------------------------------------------------------------------------------------
def _number(cell: str) -> Optional[float]:
    """A CSV cell as a number (thousands separators removed), or None when it is none."""
    text = re.sub(r'[,\s\u202f]', '', cell.strip().strip('"'))
    try:
        return float(text)
    except ValueError:
        return None


def read_ncu_csv(path: str) -> List[Dict[str, Any]]:
    """The kernels of an ``ncu --csv --page raw`` report: ``[{'name', 'read', 'write'}]`` in bytes.

    Lines before the header (the program's output, ncu's ``==PROF==`` lines) are skipped; a units row after the
    header (empty cells and units such as ``byte`` or ``Mbyte``) scales its columns."""
    lines = Path(path).read_text().splitlines()
    for start, line in enumerate(lines):  # found as text: a stray quote in the output before it must not matter
        header = next(csv.reader([line])) if NCU_READ in line and NCU_WRITE in line else []
        name_column = next((c for c in NCU_NAME_COLUMNS if c in header), None)
        if name_column and NCU_READ in header and NCU_WRITE in header:
            break
    else:
        raise ValueError(f'{path}: no ncu CSV header with "Kernel Name", "{NCU_READ}" and "{NCU_WRITE}"; profile '
                         f'with: ncu --metrics {NCU_READ},{NCU_WRITE} --csv --page raw ... > {path}')
    scales = {NCU_READ: 1.0, NCU_WRITE: 1.0}
    kernels = []
    for number, row in enumerate(csv.reader(lines[start + 1:]), start + 2):
        if len(row) < len(header):
            continue  # a blank or foreign line after the table
        cells = dict(zip(header, row))
        values = {column: _number(cells[column]) for column in scales}
        if not kernels and all(v is None for v in values.values()):  # the units row
            for column in scales:
                unit = cells[column].strip().lower()
                if unit not in UNIT_SCALES:
                    raise ValueError(f'{path}: unknown unit {cells[column]!r} of {column} (expected one of byte, '
                                     'Kbyte, Mbyte, Gbyte); profile with --print-units base')
                scales[column] = float(UNIT_SCALES[unit])
            continue
        missing = [column for column, v in values.items() if v is None]
        if missing:
            raise ValueError(f'{path}, row {number}: no number for {", ".join(missing)} of kernel '
                             f'{cells[name_column][:80]!r} (got {[cells[c] for c in missing]})')
        kernels.append(dict(name=cells[name_column], read=values[NCU_READ] * scales[NCU_READ],
                            write=values[NCU_WRITE] * scales[NCU_WRITE]))
    return kernels


def short_kernel_name(name: str, width: int = 60) -> str:
    """``void at::native::(anonymous namespace)::foo<float, 4>(...)`` -> ``at::native::foo``."""
    name = name.replace('(anonymous namespace)::', '').strip()
    name = re.sub(r'^void\s+', '', name)
    name = re.split(r'[<(]', name, maxsplit=1)[0].strip() or name
    return name[:width]


# --- the run -----------------------------------------------------------------------------------------------------
def _part_name(value: str) -> Tuple[str, str]:
    model, sep, part = value.partition(':')
    if not sep or model not in OUR_MODELS or part not in PARTS:
        raise argparse.ArgumentTypeError(f'expected MODEL:PART with MODEL in {", ".join(OUR_MODELS)} and PART in '
                                         f'{", ".join(PARTS)}, got {value!r}')
    return model, part


def _summary_item(value: str) -> Tuple[str, str, str]:
    name, sep, path = value.partition('=')
    if not sep or not path:
        raise argparse.ArgumentTypeError(f'expected MODEL:PART=CSV (e.g. vmamba-t:train-bf16=vmamba-train.csv), '
                                         f'got {value!r}')
    return _part_name(name) + (path, )


class BlockProfiler:
    """Builds each model's backbone once, prepares its block for each part and keeps the rows."""

    def __init__(self, args: argparse.Namespace, device: torch.device, stream: TextIO) -> None:
        self.args = args
        self.device = device
        self.stream = stream
        self.count_column = 'kernels' if device.type == 'cuda' else 'ops'
        self.rows: List[Dict[str, Any]] = []
        self.meta = self._meta()

    def _meta(self) -> Dict[str, Any]:
        from vssm.models.layers.recompute import recompute_enabled
        args = self.args
        return dict(device=device_name(self.device), torch=torch.__version__, cuda=torch.version.cuda,
                    tf32=args.tf32, recompute=recompute_enabled(), stage=args.stage, batch=args.batch, size=args.size,
                    warmup=args.warmup, iters=args.iters, backend=args.backend, count=self.count_column,
                    command=' '.join(['python tools/analysis_tools/block_profile.py'] + list(args.argv)),
                    date=time.strftime('%Y-%m-%d %H:%M'))

    def _row(self, name: str, part: str) -> Dict[str, Any]:
        spec = MODEL_SPECS[name]
        return dict(model=name, title=spec.title, block=None, stage=self.args.stage, part=part,
                    backend=self.args.backend, ops_backend=None, batch=self.args.batch, size=self.args.size,
                    input_shape=None, input_dtype=None, input_layout=None, other_inputs='', output_dtype=None,
                    kernels=None, ops=None, ms=None, minimal_bytes=None, minimal_mb=None, bytes=None, gb_per_s=None,
                    status='ok', note='', seconds=None, top=[])

    def _add(self, row: Dict[str, Any]) -> None:
        self.rows.append(row)
        print(format_row(row, self.count_column), file=self.stream, flush=True)
        for op in row['top']:
            print(f'    {format_top_op(op, short_kernel_name(op["name"]))}', file=self.stream, flush=True)

    def run(self, items: Sequence[Tuple[str, str]], what: str,
            on_model_done: Callable[[], None] = lambda: None) -> List[Dict[str, Any]]:
        """Rows for ``items`` ((model, part) pairs, in order; each model built once). ``what``: ``'measure'``
        (kernels, time, minimal bytes), ``'minimal'`` (minimal bytes only) or ``'ncu'`` (one profiled call)."""
        models = list(dict.fromkeys(name for name, _ in items))
        for name in models:
            rows = [self._row(name, part) for model, part in items if model == name]
            self._model(name, rows, what)
            on_model_done()
        return self.rows

    def _build(self, spec: ModelSpec) -> Tuple[nn.Module, nn.Module, str, Tensor]:
        """The backbone on the device, its first block, the ops description and the recording images."""
        from vssm.ops._backend import describe_backends
        backbone = build_trunk(spec, self.args.backend).to(self.device)
        ops_backend = describe_backends(self.args.backend, torch.empty(1, device=self.device))
        images = torch.randn(self.args.batch, 3, self.args.size, self.args.size, device=self.device)
        return backbone, stage_block(backbone, self.args.stage), ops_backend, images

    def _model(self, name: str, rows: List[Dict[str, Any]], what: str) -> None:
        built, error = None, None
        try:
            built = self._build(MODEL_SPECS[name])
        except Exception as exc:  # noqa: BLE001  (a broken model must not stop the others)
            error = self._failure('build', name, exc)
        for row in rows:
            if built is None:
                row.update(status='error', note=error)
                self._add(row)
                continue
            backbone, block, ops_backend, images = built
            row.update(block=type(block).__name__, ops_backend=ops_backend)
            begin = time.perf_counter()
            try:
                row.update(self._part(backbone, block, images, row['part'], what))
            except Exception as exc:  # noqa: BLE001
                row.update(status='error', note=self._failure(row['part'], name, exc))
            finally:
                block.zero_grad(set_to_none=True)
                block.eval()
            row['seconds'] = round(time.perf_counter() - begin, 1)
            del backbone, block, images
            release(self.device)
            self._add(row)
        del built
        release(self.device)

    def _part(self, backbone: nn.Module, block: nn.Module, images: Tensor, part: str, what: str) -> Dict[str, Any]:
        prepared = prepare_part(backbone, block, images, part, self.device)
        result = dict(describe_call(prepared.call), output_dtype=_dtype_name(prepared.output_dtype),
                      minimal_bytes=prepared.minimal_bytes, minimal_mb=prepared.minimal_bytes / MB,
                      bytes=prepared.bytes)
        if what == 'measure':
            ms = median_ms(prepared.step, self.device, self.args.warmup, self.args.iters)
            result.update({'ms': ms, 'gb_per_s': prepared.minimal_bytes / ms / 1e6,
                           self.count_column: count_launches(prepared.step, self.device)})
            if self.args.top:
                result['top'] = profile_top_ops(prepared.step, TOP_CALLS, self.device, self.args.top)
        elif what == 'ncu':
            for _ in range(max(1, self.args.warmup)):
                prepared.step()
            with cuda_profiler_range(self.device):
                prepared.step()
            result['note'] = 'one call between torch.cuda.profiler.start() and stop()' + \
                ('' if self.device.type == 'cuda' else ' (no GPU: nothing to profile)')
        return result

    def _failure(self, what: str, name: str, exc: BaseException) -> str:
        text = error_text(exc)
        if not isinstance(exc, torch.OutOfMemoryError):
            print(f'--- {name} {what} failed:', file=sys.stderr)
            traceback.print_exc()
        return text


# --- output ------------------------------------------------------------------------------------------------------
def _num(value: Optional[float], fmt: str) -> str:
    return '-' if value is None else format(value, fmt)


def _input_text(row: Dict[str, Any]) -> str:
    if row['input_shape'] is None:
        return '-'
    text = f"{tuple(row['input_shape'])} {row['input_dtype']} {row['input_layout']}"
    return text + (f" + {row['other_inputs']}" if row['other_inputs'] else '')


def format_row(row: Dict[str, Any], count_column: str) -> str:
    status = row['status'] + (f": {row['note']}" if row['note'] else '')
    return (f"{row['model']:<18} {row['part']:<10} {_num(row[count_column], 'd'):>6} {count_column:<7} "
            f"{_num(row['ms'], '.3f'):>9} ms  minimal {_num(row['minimal_mb'], '.2f'):>9} MB  "
            f"{_num(row['gb_per_s'], '.1f'):>7} GB/s  {_input_text(row)}  {status}")


def top_markdown(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The ``--top`` kernels of each part as one Markdown table (nothing without them)."""
    if not any(row['top'] for row in rows):
        return []
    lines = ['', f'Top kernels per call (torch.profiler over {TOP_CALLS} calls; time per call, share of the part\'s '
             'kernel time, launches per call, call sites in the repository):', '',
             '| model | part | kernel | ms | share | launches | called from |', '|---|---|---|---:|---:|---:|---|']
    for row in rows:
        for op in row['top']:
            lines.append(f"| {row['title']} | {row['part']} | `{short_kernel_name(op['name'])}` | {op['ms']:.3f} | "
                         f"{op['share']:.1%} | {op['calls']:g} | {op['where'] or '-'} |")
    return lines


def _note(row: Dict[str, Any]) -> str:
    return ('' if row['status'] == 'ok' else f"{row['status']}: {row['note']}").replace('|', '/')


def markdown(meta: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> str:
    """The rows as one Markdown table, after a line with the device and the settings."""
    count = meta['count']
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']} (CUDA {meta['cuda']}); TF32 "
        f"{'on' if meta['tf32'] else 'off'}; memory-saving recomputation {'on' if meta['recompute'] else 'off'}; "
        f"{meta['date']}.",
        '',
        f"One stage-{meta['stage']} block per model (the stage's first), its input recorded in a backbone "
        f"forward on batch {meta['batch']} at {meta['size']}x{meta['size']}; ops_backend='{meta['backend']}'; "
        f"{meta['warmup']} warm-up calls, median of {meta['iters']} timed calls; {count} per call "
        + ('(CUDA kernels, torch.profiler)' if count == 'kernels' else '(top-level CPU operators: no GPU)')
        + '; minimal bytes: inputs + output + parameters (+ their gradients in training). Protocol in '
        '`tools/analysis_tools/block_profile.py --help`.',
        '',
        f"`{meta['command']}`",
        '',
        f'| model | block | part | block input | {count} | ms | minimal (MB) | minimal / time (GB/s) | note |',
        '|---|---|---|---|---:|---:|---:|---:|---|',
    ]
    for row in rows:
        lines.append(f"| {row['title']} | {row['block'] or '-'} | {row['part']} | {_input_text(row)} | "
                     f"{_num(row[count], 'd')} | {_num(row['ms'], '.3f')} | {_num(row['minimal_mb'], '.2f')} | "
                     f"{_num(row['gb_per_s'], '.1f')} | {_note(row)} |")
    return '\n'.join(lines + top_markdown(rows)) + '\n'


def summary_markdown(meta: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> str:
    """The ``--summarize`` rows as a Markdown table."""
    lines = [
        f"DRAM bytes measured by ncu (dram__bytes_read.sum + dram__bytes_write.sum over the kernels of one call) "
        f"against the minimal bytes of the part (batch {meta['batch']} at {meta['size']}x{meta['size']}, "
        f"ops_backend='{meta['backend']}', recomputed on {meta['device']}); MB = 10^6 bytes.",
        '',
        '| part | kernels | DRAM bytes (MB) | minimal bytes (MB) | DRAM / minimal | largest kernels (DRAM MB) | note |',
        '|---|---:|---:|---:|---:|---|---|',
    ]
    for row in rows:
        top = ', '.join(f"{short_kernel_name(k['name'])} {k['bytes'] / MB:.1f}" for k in row['top_kernels'])
        ratio = '-' if row['ratio'] is None else f"{row['ratio']:.2f}x"
        minimal = None if row['minimal_bytes'] is None else row['minimal_bytes'] / MB
        lines.append(f"| {row['part']} | {row['kernels']} | {row['dram_bytes'] / MB:.2f} | {_num(minimal, '.2f')} | "
                     f"{ratio} | {top.replace('|', '/')} | {_note(row)} |")
    return '\n'.join(lines) + '\n'


def write_outputs(args: argparse.Namespace, meta: Dict[str, Any], rows: Sequence[Dict[str, Any]],
                  to_markdown: Callable[[Dict[str, Any], Sequence[Dict[str, Any]]], str] = markdown) -> None:
    write_results(args.json, args.markdown, meta, rows, to_markdown)


def summarize(args: argparse.Namespace, device: torch.device) -> List[Dict[str, Any]]:
    """``--summarize``: each CSV's kernels and DRAM bytes against its part's minimal bytes."""
    profiler = BlockProfiler(args, device, sys.stderr)
    minimal = {(r['model'], r['part']): r for r in profiler.run([(m, p) for m, p, _ in args.summarize], 'minimal')}
    rows = []
    for model, part, path in args.summarize:
        kernels = read_ncu_csv(path)
        read, write = sum(k['read'] for k in kernels), sum(k['write'] for k in kernels)
        largest = sorted(kernels, key=lambda k: k['read'] + k['write'], reverse=True)[:3]
        reference = minimal[model, part]
        minimal_bytes = reference['minimal_bytes']
        rows.append(dict(part=f'{model}:{part}', model=model, csv=path, kernels=len(kernels), dram_read_bytes=read,
                         dram_write_bytes=write, dram_bytes=read + write, minimal_bytes=minimal_bytes,
                         ratio=(read + write) / minimal_bytes if minimal_bytes else None,
                         top_kernels=[dict(name=k['name'], bytes=k['read'] + k['write']) for k in largest],
                         status=reference['status'], note=reference['note']))
    text = summary_markdown(profiler.meta, rows)
    print(text, end='')
    write_outputs(args, profiler.meta, rows, summary_markdown)
    return rows


# --- command line ------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', type=model_name_type(OUR_MODELS), default=list(DEFAULT_MODELS),
                        metavar='NAME',
                        help=f'models whose first block to profile (default: {" ".join(DEFAULT_MODELS)}; any of '
                        f'{", ".join(OUR_MODELS)})')
    parser.add_argument('--parts', nargs='+', choices=PARTS, default=list(PARTS), metavar='PART',
                        help=f'what to run, from {", ".join(PARTS)} (default: all)')
    parser.add_argument('--stage', type=int, default=1, help='profile the first block of this stage (1 to 4; '
                        'default: %(default)s)')
    parser.add_argument('--batch', type=int, default=128, help='images of the recording forward (default: %(default)s)')
    parser.add_argument('--size', type=int, default=224, help='image side (default: %(default)s; a multiple of 16 '
                        'for Spectral VMamba)')
    parser.add_argument('--warmup', type=int, default=10, help='untimed calls (default: %(default)s)')
    parser.add_argument('--iters', type=int, default=30, help='timed calls (default: %(default)s)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='torch device (default: cuda when there is one, else cpu)')
    parser.add_argument('--backend', choices=BACKENDS, default='auto',
                        help="ops_backend of the blocks' ops (default: %(default)s)")
    parser.add_argument('--tf32', action=argparse.BooleanOptionalAction, default=True,
                        help='TF32 for fp32 matmuls and cuDNN convolutions (default: on, as in benchmark.py)')
    parser.add_argument('--top', type=int, default=0, metavar='N',
                        help=f'also profile {TOP_CALLS} more calls of each part with torch.profiler and list its N '
                        'kernels (on a CPU: operators) by time, with their call sites in the repository (default: '
                        'none)')
    parser.add_argument('--json', metavar='PATH', help='write the settings and all rows as JSON')
    parser.add_argument('--markdown', metavar='PATH', help='write the Markdown table')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--ncu-part', type=_part_name, metavar='MODEL:PART',
                      help='run one call of this part between torch.cuda.profiler.start() and stop(), for ncu '
                      '--profile-from-start off (commands above)')
    mode.add_argument('--summarize', nargs='+', type=_summary_item, metavar='MODEL:PART=CSV',
                      help="tabulate ncu CSV reports of --ncu-part runs against each part's minimal bytes")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    for name in ('batch', 'size', 'iters'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be at least 1, got {getattr(args, name)}')
    if args.warmup < 0:
        parser.error(f'--warmup must be at least 0, got {args.warmup}')
    if args.top < 0:
        parser.error(f'--top must be at least 0, got {args.top}')
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    device = prepare_device(args.device, args.tf32)

    if args.summarize:
        return summarize(args, device)
    if args.ncu_part:  # stdout is ncu's: the tool's lines go to stderr
        profiler = BlockProfiler(args, device, sys.stderr)
        return profiler.run([args.ncu_part], 'ncu')

    profiler = BlockProfiler(args, device, sys.stdout)
    meta = profiler.meta
    print(f"device {meta['device']}, torch {meta['torch']} (CUDA {meta['cuda']}), TF32 "
          f"{'on' if args.tf32 else 'off'}; batch {args.batch} at {args.size}x{args.size}, "
          f"{args.warmup}+{args.iters} calls, ops_backend='{args.backend}'", flush=True)
    started = time.perf_counter()
    items = [(name, part) for name in args.models for part in args.parts]
    rows = profiler.run(items, 'measure', lambda: write_outputs(args, meta, profiler.rows))
    meta['total_seconds'] = round(time.perf_counter() - started, 1)
    write_outputs(args, meta, rows)
    print(f"\n{len(rows)} rows in {meta['total_seconds']} s")
    return rows


if __name__ == '__main__':
    main()
