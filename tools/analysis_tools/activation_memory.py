"""Where the training memory of a classifier goes: every tensor autograd saves for backward, by module and by op.

    python tools/analysis_tools/activation_memory.py [--models NAME|CONFIG ...] [--batch 2] [--check-batch 4]
        [--size 224] [--autocast {bf16,none}] [--device {fake-cuda,cpu}] [--ops-path {kernel,reference}]
        [--scale-batch 128] [--top 20] [--json PATH]

Method:

* One training-mode forward of the classifier (``train()``, drop path on) on random images, the logits through
  cross-entropy in fp32 (as ``benchmark.py``'s ``train-bf16`` mode), optionally under bf16 autocast. Nothing runs
  backward. Models are named as in ``benchmark.py`` (spatial-mamba-t, vmamba-t, spectral-vmamba-t, swin-t, ...) or
  given as a classification config file.
* ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor saved for backward, those of custom autograd
  functions and ``torch.library`` operators included. Saved tensors are counted once per storage (keyed by the
  storage's ``data_ptr``; ``_cdata`` for fake tensors, which have none), so views of one storage count once, with the
  storage's full size (a view keeps all of it alive). Each storage is attributed to its first saver: the innermost
  ``nn.Module`` running (forward pre/post hooks keep a stack) and the op, the autograd node that saved it (the node
  with the latest sequence number at the save, named by walking the graph from the loss; nothing is unpacked).
  Storages of parameters and buffers are listed apart: they cost nothing extra. In the per-type table a custom
  autograd function's saves get their own row, ``'<module type> > <function>'`` (e.g. ``'SS2D > _SelectiveScanRef'``);
  the inputs ``torch.utils.checkpoint`` keeps get the op ``'checkpoint'`` (what a checkpointed region would save is
  not kept, so not counted).
* Scaling: the forward runs at ``--batch`` and at ``--check-batch``; storages are matched in the order they were
  first saved. Each is either batch-independent (same size in both runs: bf16 copies of weights, SSM parameters) or
  proportional to the batch, which is checked and reported (``linear``); the totals are then extrapolated to
  ``--scale-batch`` (128, the benchmark's batch). If the two runs saved different sequences, each (module, op, dtype)
  group is extrapolated instead. Without a check run, everything is scaled by
  scale-batch / batch. Batch 1 is special (some reshapes are views only there), hence the default 2 and 4.
* Devices. ``--device cpu`` computes for real on the CPU, with CPU autocast's op lists (layer_norm, for instance,
  stays in bf16 there) and the pure-PyTorch reference ops. ``--device fake-cuda`` (default) runs the same
  Python code on fake CUDA tensors (``FakeTensorMode``: shapes and dtypes only, no data, no GPU needed, any batch in
  seconds), so CUDA autocast's op lists apply, as on the GPU. With ``--ops-path kernel`` (default) our models then
  take the code path of the compiled kernels even where they are not built: the operators are declared with the
  schemas of ``kernels/*/csrc/*.cpp`` and use ``vssm.ops``' own fake implementations and autograd registrations
  (``setup_context`` decides what is saved), so the saves are those of the GPU run with kernels.
  ``--ops-path reference`` takes the reference ops (``ops_backend='torch'``).
* Not counted: memory that is not saved for backward (the forward's transient buffers, the backward's temporaries
  and gradients of activations), the CUDA caching allocator's rounding and fragmentation. Parameters, their
  gradients and the AdamW state (exp_avg, exp_avg_sq: 2x the trainable parameters in fp32) are reported apart; the
  benchmark frees gradients after each step (``zero_grad(set_to_none=True)``), so at the end of a forward the memory
  is about parameters + AdamW state + saved tensors, and the backward adds gradients and temporaries.

Output: per model, the total saved bytes at the run's batch and scaled, the totals per module type, per op, per
(module type, op), and the top ``--top`` module paths; ``--json PATH`` writes all of it, every storage included.
"""
import argparse
import contextlib
import importlib
import inspect
import json
import re
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[2]
DEVICES = ('fake-cuda', 'cpu')
OPS_PATHS = ('kernel', 'reference')
AUTOCAST = ('bf16', 'none')
DEFAULT_MODELS = ('spatial-mamba-t', 'vmamba-t', 'spectral-vmamba-t', 'swin-t')
GIB, MIB = float(1 << 30), float(1 << 20)
# The compiled extensions whose operators --ops-path kernel declares: (vssm.ops module, schema source).
KERNEL_OPS = (('vssm.ops.selective_scan', 'kernels/selective_scan/csrc/selective_scan.cpp'),
              ('vssm.ops.dwconv2d', 'kernels/dwconv2d/csrc/dwconv2d.cpp'))


def _benchmark_module() -> ModuleType:
    """tools/analysis_tools/benchmark.py (model names, config loading), imported by path."""
    from vssm.engine.launch import load_tool_module
    return load_tool_module(Path(__file__).with_name('benchmark.py'), 'vssm_benchmark_tool')


# --- recording ---------------------------------------------------------------------------------------------------
@dataclass
class SavedStorage:
    """One storage saved for backward (counted once however many tensors or ops saved it)."""
    index: int  # order of first save
    nbytes: int  # the whole storage
    dtype: str
    shape: Tuple[int, ...]  # of the first tensor saved from it
    module: str  # qualified name of the innermost module running at the first save ('' = the model)
    module_type: str
    op: str = '?'  # autograd node of the first save, without 'Backward0' ('?': not reached from the loss)
    custom_function: bool = False  # saved by a custom autograd function or torch.library operator
    saves: int = 1  # tensors saved from this storage, all ops together
    parameter: bool = False  # a parameter's or buffer's storage (no extra memory)

    @property
    def category(self) -> str:
        """The row of the per-type table: the module type, or '<module type> > <function>' for custom functions."""
        return f'{self.module_type} > {self.op}' if self.custom_function else self.module_type


def storage_key(t: Tensor) -> int:
    """Identity of ``t``'s storage: its data pointer, or the storage object's address for tensors without data."""
    storage = t.untyped_storage()
    if _is_fake(t) or t.device.type == 'meta':
        return storage._cdata
    return storage.data_ptr()


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


def _saved_by_checkpoint() -> bool:
    """Whether the save being packed comes from ``torch.utils.checkpoint``'s ``save_inputs`` (two frames up at most:
    the pack hook is called from C++ inside a list comprehension there)."""
    frame = sys._getframe(2)
    for _ in range(2):
        if frame is None:
            return False
        if frame.f_code.co_name == 'save_inputs' and frame.f_code.co_filename.endswith(
                ('torch/utils/checkpoint.py', 'torch\\utils\\checkpoint.py')):
            return True
        frame = frame.f_back
    return False


def _op_name(name: str) -> str:
    """'ConvolutionBackward0' -> 'Convolution'; a torch.library operator's autograd function -> the operator, e.g.
    'vssm_selective_scan_fwd'."""
    name = re.sub(r'Backward\d*$', '', name)
    if name.startswith('GeneratedBackwardFor_'):
        return re.sub(r'_default$', '', name[len('GeneratedBackwardFor_'):])
    return name


class SavedTensorRecorder:
    """Record every tensor saved for backward inside :meth:`record`, attributed to module and op.

    The op of a save: a built-in op or a custom autograd function saves right after its autograd node is created,
    so the save belongs to the node with the latest sequence number; :meth:`name_ops` names it from the graph.
    Nothing is unpacked (reading saved tensors would re-run checkpointed regions). ``torch.utils.checkpoint`` (non-
    reentrant) saves the inputs of a checkpointed region without a node, from ``_CheckpointFrame.save_inputs``: those
    saves get the op ``'checkpoint'``; what the region saves inside goes to checkpoint's own hooks, not counted.

    Args:
        model: the modules to attribute to (hooks on all its submodules while recording).
        exclude: tensors whose storages are not activations (parameters and buffers); flagged ``parameter``.
    """

    def __init__(self, model: nn.Module, exclude: Sequence[Tensor] = ()) -> None:
        self.model = model
        self.names = {}
        for name, module in model.named_modules():
            self.names.setdefault(id(module), name)
        self.excluded = {storage_key(t) for t in exclude if t.numel() > 0}
        self.storages: List[SavedStorage] = []
        self._by_key: Dict[int, int] = {}
        self._first_save: List[Tuple[int, Optional[str]]] = []  # per storage: (node sequence number, 'checkpoint')
        self._stack: List[nn.Module] = []
        self._keep: List[Tensor] = []  # the saved tensors stay alive (so storages are not reused) while recording

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        self._stack.append(module)

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        while self._stack:
            if self._stack.pop() is module:
                break

    def _pack(self, t: Tensor) -> Tensor:
        nbytes = t.untyped_storage().nbytes()
        if nbytes == 0:
            return t
        key = storage_key(t)
        index = self._by_key.get(key)
        if index is not None:
            self.storages[index].saves += 1
            return t
        module = self._stack[-1] if self._stack else self.model
        self._by_key[key] = len(self.storages)
        self._first_save.append((torch._C._autograd._get_sequence_nr() - 1,
                                 'checkpoint' if _saved_by_checkpoint() else None))
        self.storages.append(
            SavedStorage(index=len(self.storages), nbytes=nbytes, dtype=str(t.dtype).replace('torch.', ''),
                         shape=tuple(t.shape), module=self.names.get(id(module), '?'),
                         module_type=type(module).__name__, parameter=key in self.excluded))
        self._keep.append(t)
        return t

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    @contextlib.contextmanager
    def record(self) -> Iterator['SavedTensorRecorder']:
        handles = []
        for module in self.model.modules():
            handles.append(module.register_forward_pre_hook(self._pre_hook))
            handles.append(module.register_forward_hook(self._post_hook, always_call=True))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self._stack.clear()
            self._keep.clear()

    def name_ops(self, root: Tensor) -> None:
        """Name the op of every storage's first save: the autograd node with its sequence number, found by walking the
        graph from ``root`` ('?' if not reached)."""
        from torch.autograd.function import BackwardCFunction
        nodes: Dict[int, Tuple[str, bool]] = {}
        seen, todo = set(), [root.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            nodes[node._sequence_nr()] = (_op_name(node.name()), isinstance(node, BackwardCFunction))
            todo.extend(fn for fn, _ in node.next_functions)
        for storage, (sequence_nr, special) in zip(self.storages, self._first_save):
            storage.op, storage.custom_function = (special, True) if special else nodes.get(sequence_nr, ('?', False))


# --- running a model ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _cuda_autocast_without_cuda(dtype: torch.dtype) -> Iterator[None]:
    """CUDA autocast for fake CUDA tensors: ``torch.autocast('cuda')`` turns itself off without a GPU, the switches
    underneath it do not."""
    enabled, previous = torch.is_autocast_enabled('cuda'), torch.get_autocast_dtype('cuda')
    torch.set_autocast_enabled('cuda', True)
    torch.set_autocast_dtype('cuda', dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled('cuda', enabled)
        torch.set_autocast_dtype('cuda', previous)


def _autocast(device: str, autocast: str):
    if autocast == 'none':
        return contextlib.nullcontext()
    if device == 'fake-cuda':
        return _cuda_autocast_without_cuda(torch.bfloat16)
    return torch.autocast('cpu', dtype=torch.bfloat16)


_DECLARED: Dict[str, Any] = {}  # extension name -> its torch.library.Library (alive: destroying it drops the ops)


def _kernel_schemas(source: Path) -> List[str]:
    """The operator schemas declared by ``m.def("...")`` (C++ string literals joined) in a TORCH_LIBRARY block."""
    text = source.read_text()
    definitions = re.findall(r'm\.def\(((?:\s*"[^"]*")+)\s*\)', text)  # m.def("..." "...")
    schemas = [''.join(re.findall(r'"([^"]*)"', literals)) for literals in definitions]
    if not schemas:
        raise RuntimeError(f'no m.def("...") operator schema found in {source}; --ops-path kernel reads them there.')
    return schemas


@contextlib.contextmanager
def kernel_path_on_fake_cuda() -> Iterator[None]:
    """Let ``vssm.ops`` take its compiled-kernel path on fake CUDA tensors when the extensions are not built.

    The operators are declared (once per process) with the schemas of ``kernels/*/csrc/*.cpp``; the fake
    implementations and the autograd (``setup_context``: what is saved) are ``vssm.ops``' own, registered by its
    ``_register_kernel_ops``. Inside the block the op modules see an extension, so ``'auto'``/``'cuda'`` dispatch
    to the operators; only fake tensors can run them (they have no CPU or CUDA implementation here).
    """
    patched = []
    for module_name, source in KERNEL_OPS:
        module = importlib.import_module(module_name)
        if module._EXT is not None:  # built: the real operators, fakes and autograd are registered already
            continue
        if module._EXT_NAME not in _DECLARED:
            lib = torch.library.Library(module._EXT_NAME, 'DEF')  # declarations only; the fakes run them
            for schema in _kernel_schemas(REPO_ROOT / source):
                lib.define(schema)
            module._register_kernel_ops()
            _DECLARED[module._EXT_NAME] = lib
        module._EXT = SimpleNamespace(__name__=f'{module._EXT_NAME} (declared for fake tensors)')
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            module._EXT = None


def default_step(model: nn.Module, images: Tensor) -> Tensor:
    """The benchmark's training loss: the logits in fp32 through cross-entropy on random labels."""
    logits = model(images, mode='tensor')
    labels = torch.randint(0, logits.shape[-1], (images.shape[0], ), device=images.device)
    return F.cross_entropy(logits.float(), labels)


def record_forward(model: nn.Module, batch: int, size: int, autocast: str = 'bf16', device: str = 'cpu',
                   step: Callable[[nn.Module, Tensor], Tensor] = default_step) -> List[SavedStorage]:
    """The storages saved for backward by one training-mode forward (and loss) of ``model``, in order of first save.

    Args:
        model: a real model on the CPU (``device='fake-cuda'`` runs it with fake CUDA copies of its tensors).
        batch, size: images (batch, 3, size, size).
        autocast: ``'bf16'`` or ``'none'``.
        device: ``'cpu'`` or ``'fake-cuda'`` (see the module docstring).
        step: (model, images) -> scalar loss.
    """
    if device not in DEVICES:
        raise ValueError(f'record_forward: device must be one of {DEVICES}, got {device!r}.')
    if autocast not in AUTOCAST:
        raise ValueError(f'record_forward: autocast must be one of {AUTOCAST}, got {autocast!r}.')
    model.train()
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    if device == 'cpu':
        return _record(model, step, list(named.values()), lambda: torch.randn(batch, 3, size, size), 'cpu', autocast)

    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()
    with mode, warnings.catch_warnings():
        # Code inside the models may open torch.autocast('cuda', enabled=False), which warns without a GPU.
        warnings.filterwarnings('ignore', message='User provided device_type of .cuda., but CUDA is not available')
        fake = {name: mode.from_tensor(t).to('cuda').detach().requires_grad_(t.requires_grad)
                for name, t in named.items()}

        def fake_step(module: nn.Module, images: Tensor) -> Tensor:
            return step(_FunctionalModel(module, fake), images)

        return _record(model, fake_step, list(fake.values()),
                       lambda: torch.randn(batch, 3, size, size, device='cuda'), 'fake-cuda', autocast)


class _FunctionalModel:
    """Calls ``model`` with other tensors in place of its parameters and buffers (``torch.func.functional_call``)."""

    def __init__(self, model: nn.Module, tensors: Dict[str, Tensor]) -> None:
        self.model, self.tensors = model, tensors

    def __call__(self, *args, **kwargs):
        from torch.func import functional_call
        return functional_call(self.model, self.tensors, args, kwargs, tie_weights=False, strict=True)


def _record(model: nn.Module, step: Callable, exclude: Sequence[Tensor], images: Callable[[], Tensor], device: str,
            autocast: str) -> List[SavedStorage]:
    recorder = SavedTensorRecorder(model, exclude)
    inputs = images()
    with recorder.record():
        with _autocast(device, autocast):
            loss = step(model, inputs)
    recorder.name_ops(loss)
    return recorder.storages


# --- the report --------------------------------------------------------------------------------------------------
@dataclass
class Report:
    """Saved-tensor totals of one model; ``*_scaled`` values are extrapolated to ``scale_batch``."""
    model: str
    title: str
    settings: Dict[str, Any]
    saved_bytes: int  # activations at `batch` (parameter storages excluded)
    saved_bytes_check: Optional[int]  # at `check_batch`
    parameter_storage_bytes: int  # parameter/buffer storages that were saved (no extra memory)
    saved_bytes_scaled: float
    constant_bytes: int  # batch-independent part (at any batch)
    linearity: Dict[str, Any]
    parameters: Dict[str, int]
    by_type: Dict[str, float]  # scaled bytes per module type (custom functions apart)
    by_op: Dict[str, float]
    by_type_op: Dict[str, float]
    top_modules: List[Dict[str, Any]]
    storages: List[Dict[str, Any]] = field(default_factory=list)


def parameter_bytes(model: nn.Module) -> Dict[str, int]:
    """Parameters, their gradients and the AdamW state (exp_avg and exp_avg_sq in the parameters' dtype)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    return dict(parameters=sum(p.numel() for p in params), parameter_bytes=size(params),
                trainable_bytes=size(trainable), gradient_bytes=size(trainable), adamw_state_bytes=2 * size(trainable),
                buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()))


def _group(s: SavedStorage) -> Tuple[str, str, str]:
    return s.module, s.op, s.dtype


def scale_storages(storages: Sequence[SavedStorage], check: Optional[Sequence[SavedStorage]], batch: int,
                   check_batch: Optional[int], scale_batch: int) -> Tuple[List[float], Dict[str, Any]]:
    """Bytes of every storage at ``scale_batch``, and the linearity check.

    When the check run saved the same sequence of (module, op, dtype) storages (``matching='storage'``), a storage
    of the same size in both runs is batch-independent and every other one is extrapolated along the line through
    its two sizes; ``linear`` says whether those all are exactly proportional to the batch (``affine`` lists the
    others). Otherwise (``matching='group'``) the same is done per (module, op, dtype) group, whose storages share
    the group's extrapolation in proportion. Without a check run every storage scales by scale / batch.
    """
    if check is None or check_batch is None:
        return [s.nbytes * scale_batch / batch for s in storages], dict(checked=False)

    def line(size: float, size_check: float) -> float:
        return size + (size_check - size) / (check_batch - batch) * (scale_batch - batch)

    if len(storages) == len(check) and all(_group(s) == _group(c) for s, c in zip(storages, check)):
        matching, pairs = 'storage', [(s.nbytes, c.nbytes, _group(s)) for s, c in zip(storages, check)]
        scaled = [line(s.nbytes, c.nbytes) for s, c in zip(storages, check)]
        unmatched = 0
    else:
        sums, sums_check = defaultdict(int), defaultdict(int)
        for s in storages:
            sums[_group(s)] += s.nbytes
        for c in check:
            sums_check[_group(c)] += c.nbytes
        matching, pairs = 'group', [(size, sums_check.get(key, 0), key) for key, size in sums.items()]
        scaled = [s.nbytes * line(sums[_group(s)], sums_check.get(_group(s), 0)) / sums[_group(s)] for s in storages]
        unmatched = sum(size for key, size in sums_check.items() if key not in sums)  # only in the check run
    constant, proportional, other, affine = 0, 0, 0, []
    for size, size_check, key in pairs:
        if size == size_check:
            constant += size
        elif size * check_batch == size_check * batch:
            proportional += size
        else:
            other += size
            affine.append(dict(module=key[0], op=key[1], dtype=key[2], bytes=size, bytes_check=size_check))
    total = sum(p[0] for p in pairs)
    check_total = sum(p[1] for p in pairs)
    return scaled, dict(checked=True, matching=matching, constant_bytes=constant, proportional_bytes=proportional,
                        affine_bytes=other, affine=sorted(affine, key=lambda a: -a['bytes'])[:10],
                        unmatched_check_bytes=unmatched, linear=matching == 'storage' and other == 0,
                        ratio=(check_total - constant) / max(total - constant, 1), expected_ratio=check_batch / batch)


def build_report(name: str, title: str, model: nn.Module, storages: Sequence[SavedStorage],
                 check: Optional[Sequence[SavedStorage]], settings: Dict[str, Any], top: int = 20,
                 keep_storages: bool = True) -> Report:
    """Totals per type, op, (type, op) and module path, scaled to ``settings['scale_batch']``."""
    batch, check_batch, scale_batch = settings['batch'], settings.get('check_batch'), settings['scale_batch']
    activations = [s for s in storages if not s.parameter]
    check_act = None if check is None else [s for s in check if not s.parameter]
    scaled, linearity = scale_storages(activations, check_act, batch, check_batch, scale_batch)
    by_type, by_op, by_type_op, by_module = (defaultdict(float) for _ in range(4))
    module_info: Dict[str, Dict[str, Any]] = {}
    for s, bytes_scaled in zip(activations, scaled):
        by_type[s.category] += bytes_scaled
        by_op[s.op] += bytes_scaled
        by_type_op[f'{s.module_type} / {s.op}'] += bytes_scaled
        by_module[s.module] += bytes_scaled
        info = module_info.setdefault(s.module, dict(type=s.module_type, ops=defaultdict(float)))
        info['ops'][s.op] += bytes_scaled

    def ordered(table: Dict[str, float]) -> Dict[str, float]:
        return dict(sorted(table.items(), key=lambda kv: -kv[1]))

    top_modules = []
    for path, value in sorted(by_module.items(), key=lambda kv: -kv[1])[:top]:
        ops = sorted(module_info[path]['ops'].items(), key=lambda kv: -kv[1])
        top_modules.append(dict(module=path or '(model)', type=module_info[path]['type'], bytes_scaled=value,
                                ops={op: b for op, b in ops}))
    rows = []
    if keep_storages:
        by_index = {s.index: b for s, b in zip(activations, scaled)}
        rows = [dict(asdict(s), category=s.category, bytes_scaled=by_index.get(s.index)) for s in storages]
    constant = linearity.get('constant_bytes', 0)
    return Report(model=name, title=title, settings=settings, saved_bytes=sum(s.nbytes for s in activations),
                  saved_bytes_check=None if check_act is None else sum(s.nbytes for s in check_act),
                  parameter_storage_bytes=sum(s.nbytes for s in storages if s.parameter),
                  saved_bytes_scaled=sum(scaled), constant_bytes=constant, linearity=linearity,
                  parameters=parameter_bytes(model), by_type=ordered(by_type), by_op=ordered(by_op),
                  by_type_op=ordered(by_type_op), top_modules=top_modules, storages=rows)


# --- building the models -----------------------------------------------------------------------------------------
def _backbone_class(type_name: str):
    from mmpretrain.registry import MODELS
    return MODELS.get(type_name)


def build_model(name: str, size: int, device: str, ops_path: str) -> Tuple[nn.Module, str, str]:
    """(classifier on the CPU, title, ops backend) for a benchmark.py model name or a classification config file.

    Our backbones get ``ops_backend='cuda'`` on the kernel path of fake CUDA, ``'torch'`` otherwise; Spectral
    VMamba's CUDA graphs are turned off on fake CUDA (nothing can be captured there; they run under no_grad anyway).
    """
    from mmengine.config import ConfigDict
    bench = _benchmark_module()
    if name in bench.SPECS:
        spec = bench.SPECS[name]
        title = spec.title
        if spec.ours:
            model_cfg, scope = bench._load_model_config(spec.classifier)
        else:
            model_cfg, scope = spec.classifier(size), 'mmpretrain'
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f'{name!r} is neither a model of benchmark.py ({", ".join(bench.SPECS)}) nor a config '
                             'file.')
        model_cfg, scope = bench._load_model_config(str(path.resolve()))
        title = path.stem
    model_cfg = ConfigDict(model_cfg)
    backend = 'cuda' if (device == 'fake-cuda' and ops_path == 'kernel') else 'torch'
    accepted = inspect.signature(_backbone_class(model_cfg.backbone.type)).parameters
    if 'ops_backend' in accepted:
        model_cfg.backbone.ops_backend = backend
    else:
        backend = '-'
    if 'cuda_graphs' in accepted and device == 'fake-cuda':
        model_cfg.backbone.cuda_graphs = False
    return bench._build(model_cfg, scope), title, backend


def profile_model(name: str, args: argparse.Namespace) -> Report:
    model, title, backend = build_model(name, args.size, args.device, args.ops_path)
    kernel = args.device == 'fake-cuda' and args.ops_path == 'kernel' and backend != '-'
    with kernel_path_on_fake_cuda() if kernel else contextlib.nullcontext():
        storages = record_forward(model, args.batch, args.size, args.autocast, args.device)
        check = (record_forward(model, args.check_batch, args.size, args.autocast, args.device)
                 if args.check_batch else None)
    settings = dict(batch=args.batch, check_batch=args.check_batch or None, scale_batch=args.scale_batch,
                    size=args.size, autocast=args.autocast, device=args.device,
                    ops_path=('kernel' if kernel else 'reference') if backend != '-' else '-', ops_backend=backend)
    return build_report(name, title, model, storages, check, settings, top=args.top)


# --- printing ----------------------------------------------------------------------------------------------------
def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append('  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append('  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def format_report(report: Report, top: int = 20) -> str:
    s = report.settings
    scale = s['scale_batch']
    total = report.saved_bytes_scaled or 1.0
    p = report.parameters
    lin = report.linearity
    out = [f"== {report.title} ({report.model}): {s['device']}, ops {s['ops_path']}, autocast {s['autocast']}, "
           f"{s['size']}x{s['size']}"]
    out.append(f"saved for backward at batch {s['batch']}: {report.saved_bytes / MIB:,.1f} MiB"
               + (f"; at batch {s['check_batch']}: {report.saved_bytes_check / MIB:,.1f} MiB"
                  if report.saved_bytes_check is not None else '')
               + f"; parameter storages also saved (no extra memory): {report.parameter_storage_bytes / MIB:,.1f} MiB")
    if lin.get('checked'):
        if lin['matching'] == 'storage':
            what = (f"{lin['constant_bytes'] / MIB:,.1f} MiB batch-independent, the rest "
                    f"{'exactly proportional to the batch' if lin['linear'] else 'NOT all proportional'}")
        else:
            what = ('the two runs saved different sequences of storages: extrapolated per (module, op, dtype) group '
                    f"({lin['constant_bytes'] / MIB:,.1f} MiB in batch-independent groups)")
        out.append(f"scaling: {what} (batch-dependent part x{lin['ratio']:.3f} from batch {s['batch']} to "
                   f"{s['check_batch']}, expected x{lin['expected_ratio']:.3f})")
        for a in lin['affine'] if lin['matching'] == 'storage' else ():
            out.append(f"  not proportional: {a['module']} {a['op']} {a['dtype']}: {a['bytes']:,} B at batch "
                       f"{s['batch']}, {a['bytes_check']:,} B at batch {s['check_batch']}")
        if lin['unmatched_check_bytes']:
            out.append(f"  {lin['unmatched_check_bytes']:,} B saved at batch {s['check_batch']} by (module, op, dtype) "
                       f"groups absent at batch {s['batch']}: not in the tables")
    else:
        out.append(f"scaling: x{scale / s['batch']:g} (no check run)")
    static = p['parameter_bytes'] + p['adamw_state_bytes'] + p['buffer_bytes']
    out.append(f"=> saved activations at batch {scale}: {report.saved_bytes_scaled / GIB:.2f} GiB; parameters "
               f"{p['parameters'] / 1e6:.1f} M = {p['parameter_bytes'] / GIB:.3f} GiB, gradients "
               f"{p['gradient_bytes'] / GIB:.3f} GiB, AdamW state {p['adamw_state_bytes'] / GIB:.3f} GiB; "
               f"end of forward ~ weights + AdamW + saved = {(static + report.saved_bytes_scaled) / GIB:.2f} GiB")
    for title, table in (('module type', report.by_type), ('op (autograd node)', report.by_op),
                         ('module type / op', report.by_type_op)):
        rows = [(k, f'{v / GIB:.3f}', f'{100 * v / total:.1f}%') for k, v in list(table.items())[:top]]
        rest = sum(list(table.values())[top:])
        if rest:
            rows.append((f'({len(table) - top} more)', f'{rest / GIB:.3f}', f'{100 * rest / total:.1f}%'))
        out.append(f'\nby {title}, GiB at batch {scale}:\n' + _table((title, 'GiB', 'share'), rows))
    rows = [(m['module'], m['type'], f"{m['bytes_scaled'] / GIB:.3f}",
             ', '.join(f'{op} {b / GIB:.3f}' for op, b in list(m['ops'].items())[:4])) for m in report.top_modules]
    out.append(f'\ntop {len(rows)} module paths, GiB at batch {scale}:\n'
               + _table(('module', 'type', 'GiB', 'ops (GiB)'), rows))
    return '\n'.join(out)


def format_summary(reports: Sequence[Report]) -> str:
    rows = []
    for r in reports:
        p = r.parameters
        static = p['parameter_bytes'] + p['adamw_state_bytes'] + p['buffer_bytes']
        rows.append((r.title, r.settings['ops_path'], f'{r.saved_bytes / MIB:,.1f}',
                     f'{r.saved_bytes_scaled / GIB:.2f}', f"{p['parameter_bytes'] / GIB:.3f}",
                     f"{p['adamw_state_bytes'] / GIB:.3f}", f'{(static + r.saved_bytes_scaled) / GIB:.2f}'))
    s = reports[0].settings
    return (f"\nsummary ({s['device']}, autocast {s['autocast']}, {s['size']}x{s['size']}; batch {s['batch']} "
            f"scaled to {s['scale_batch']}):\n"
            + _table(('model', 'ops', f"saved MiB @{s['batch']}", f"saved GiB @{s['scale_batch']}", 'weights GiB',
                      'AdamW GiB', 'weights+AdamW+saved GiB'), rows))


# --- command line ------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS), metavar='NAME|CONFIG',
                        help=f'benchmark.py model names or classification config files (default: '
                        f'{" ".join(DEFAULT_MODELS)})')
    parser.add_argument('--batch', type=int, default=2, help='batch of the recorded forward (default: %(default)s)')
    parser.add_argument('--check-batch', type=int, default=None,
                        help='batch of the second forward that checks the linear scaling (default: 2 x --batch; '
                        '0 skips it)')
    parser.add_argument('--scale-batch', type=int, default=128, help='batch the totals are scaled to (default: 128)')
    parser.add_argument('--size', type=int, default=224, help='image side (default: %(default)s)')
    parser.add_argument('--autocast', choices=AUTOCAST, default='bf16', help='bf16 autocast or none (default: bf16)')
    parser.add_argument('--device', choices=DEVICES, default='fake-cuda',
                        help='fake-cuda: CUDA autocast rules and (with --ops-path kernel) the kernels\' saves, no data '
                        'computed; cpu: real computation, CPU autocast rules, reference ops (default: fake-cuda)')
    parser.add_argument('--ops-path', choices=OPS_PATHS, default='kernel',
                        help='on fake-cuda, which implementation of our ops runs (default: kernel); cpu: reference')
    parser.add_argument('--top', type=int, default=20, help='rows per table (default: %(default)s)')
    parser.add_argument('--json', metavar='PATH', help='write the reports (every saved storage included) as JSON')
    args = parser.parse_args(argv)
    if args.check_batch is None:
        args.check_batch = 2 * args.batch
    if args.device == 'cpu':
        args.ops_path = 'reference'
    for name in ('batch', 'scale_batch', 'size', 'top'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    specs = _benchmark_module().SPECS
    for name in args.models:
        if name not in specs and not Path(name).is_file():
            parser.error(f'--models: {name!r} is neither a model of benchmark.py ({", ".join(specs)}) nor a config '
                         'file.')
    if args.check_batch < 0 or args.check_batch == args.batch:
        parser.error(f'--check-batch must be 0 (no check) or differ from --batch {args.batch}, got {args.check_batch}')
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Report]:
    args = parse_args(argv)
    import vssm  # noqa: F401  (registers the backbones; before mmpretrain, see README "transformers >= 5")
    torch.manual_seed(0)
    reports = []
    for name in args.models:
        started = time.perf_counter()
        report = profile_model(name, args)
        reports.append(report)
        print(format_report(report, args.top), flush=True)
        print(f'({time.perf_counter() - started:.1f} s)\n', flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in reports], indent=1))
    print(format_summary(reports))
    return reports


if __name__ == '__main__':
    main()
