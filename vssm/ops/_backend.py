"""The one place that decides which implementation an op runs on.

Every op in :mod:`vssm.ops` has a pure-PyTorch reference (CPU and GPU) and, once built from
``kernels/``, a CUDA extension. ``backend='auto'`` picks the extension when it is importable and the
input lives on a CUDA device, the reference otherwise; ``'torch'`` forces the reference and
``'cuda'`` demands the extension (and fails with the build command when it is missing).
"""
import importlib
import os
from contextlib import contextmanager
from types import ModuleType
from typing import ContextManager, Iterator, Optional, Tuple

import torch
from torch import Tensor

BACKENDS = ('auto', 'torch', 'cuda')

_BUILD_HINT = ('Build it with `TORCH_CUDA_ARCH_LIST="9.0" pip install --no-build-isolation -v kernels/{folder}` '
               '(nvcc must match torch.version.cuda; see kernels/README.md), or set ops_backend=\'torch\' in the '
               "model config to use the slow pure-PyTorch reference.")


def try_import_extension(module_name: str) -> Optional[ModuleType]:
    """Import a compiled extension if it is installed; ``None`` when it is not."""
    try:
        return importlib.import_module(module_name)
    except ImportError:
        return None


def check_backend_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f'Unknown ops backend {backend!r}: use one of {BACKENDS}.')
    return backend


def resolve_backend(backend: str, extension: Optional[ModuleType], module_name: str, folder: str,
                    x: Tensor) -> str:
    """Return ``'torch'`` or ``'cuda'`` for one call of an op.

    Args:
        backend: the requested backend, one of :data:`BACKENDS`.
        extension: the imported extension module, or ``None`` when it is not built.
        module_name: the extension's module name (for the error message).
        folder: its source folder under ``kernels/`` (for the build command).
        x: the op's main input; its device decides ``'auto'``.
    """
    check_backend_name(backend)
    if backend == 'torch':
        return 'torch'
    if backend == 'cuda':
        if extension is None:
            raise RuntimeError(f'ops backend \'cuda\' was requested but {module_name} is not built. '
                               + _BUILD_HINT.format(folder=folder))
        if not x.is_cuda:
            raise ValueError(f"ops backend 'cuda' needs CUDA tensors, got a tensor on {x.device}. "
                             "Move the model and data to the GPU or use backend='auto'/'torch'.")
        return 'cuda'
    return 'cuda' if (extension is not None and x.is_cuda) else 'torch'



def describe_backends(backend: str, x: Tensor) -> str:
    """Which implementation each op takes for inputs like ``x`` under ``backend`` (for the models' log line)."""
    parts = []
    for op, folder in (('selective_scan', 'selective_scan'), ('dwconv2d/state_fusion', 'dwconv2d')):
        module = importlib.import_module(f'.{folder}', __package__)  # the op module (the package exports functions)
        name = f'vssm_{folder}'
        chosen = resolve_backend(backend, module._EXT, name, folder, x)
        parts.append(f'{op} -> ' + ('CUDA kernel' if chosen == 'cuda' else
                                    'PyTorch reference' + ('' if module._EXT is not None else ' (kernel not built)')))
    return f"ops_backend='{backend}': " + ', '.join(parts)


_PLAIN_AUTOGRAD = False


@contextmanager
def plain_autograd(enabled: bool = True) -> Iterator[None]:
    """Inside this context every op with a hand-written backward runs on the reference path as plain PyTorch ops
    that autograd differentiates itself: the selective scan's reference, the token maps, ``grouped_matmul`` and the
    recomputed projections (no recomputation). Slower and memory-hungry; it exists to check the hand-written
    backwards (and to debug one) against autograd. Process-wide, not thread-local."""
    global _PLAIN_AUTOGRAD
    previous, _PLAIN_AUTOGRAD = _PLAIN_AUTOGRAD, bool(enabled)
    try:
        yield
    finally:
        _PLAIN_AUTOGRAD = previous


def plain_autograd_enabled() -> bool:
    """Whether :func:`plain_autograd` is on."""
    return _PLAIN_AUTOGRAD


_RECOMPUTE = os.environ.get('VSSM_RECOMPUTE', '1') != '0'


def set_recompute(enabled: bool) -> None:
    """Turn the memory-saving recomputations off or on for the whole process (the models' recomputed projections and
    checkpointed state fusion, the ops' recomputed step sizes); the results are the same either way.
    ``VSSM_RECOMPUTE=0`` in the environment starts with them off."""
    global _RECOMPUTE
    _RECOMPUTE = bool(enabled)


def recompute_enabled() -> bool:
    """Whether :func:`set_recompute` left the recomputations on (the default)."""
    return _RECOMPUTE


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype an op on ``x`` computes in: autocast's where it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def triton_fusions_enabled() -> bool:
    """Whether the Triton kernels (``layer_norm_2d`` / ``layer_norm_last``, ``bias_gelu``, ``add_residual``,
    ``observe_gate``, ``cross_selective_scan``, the token merge) may run, each where its dispatch finds it faster: on
    by default (the three T models' eager rows with and without them, docs/benchmarks.md); ``VSSM_TRITON_FUSIONS=0``
    in the environment (read per call) makes their ops take the reference under every backend."""
    return os.environ.get('VSSM_TRITON_FUSIONS', '1') != '0'


def triton_kernel_runs(op: str, kernel: Optional[ModuleType], x: Tensor, backend: str,
                       dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)) -> bool:
    """Whether the elementwise op ``op`` runs its Triton ``kernel`` (None: Triton is not importable) on ``x``: the
    backend allows it, :func:`triton_fusions_enabled`, not autograd's plain mode, compiling (inductor fuses the
    reference with its neighbours) or tracing, a CUDA tensor of one of ``dtypes``. ``backend='cuda'`` without Triton
    or with a CPU tensor raises, naming the way out."""
    check_backend_name(backend)
    if backend == 'torch' or plain_autograd_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if not triton_fusions_enabled():
        return False
    if backend == 'cuda':
        if kernel is None:
            raise RuntimeError(f"{op}: backend 'cuda' needs Triton (it ships with PyTorch's CUDA wheels); "
                               "use backend='auto' or 'torch'.")
        if not x.is_cuda:
            raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got {x.device}.")
    return kernel is not None and x.is_cuda and x.dtype in dtypes


def cross_form_enabled() -> bool:
    """Whether ``cross_selective_scan`` may take the CUDA selective scan's cross form
    (:func:`vssm.ops.cross_scan.cross_form`): ``VSSM_CROSS_FORM=1`` in the environment (read per call). Off by
    default: it saves memory (VMamba-T's training peak 0.73x on an H100) but is slower than the composition
    except at long sequences with a small rank (kernels/README.md); ``0`` keeps the composition."""
    return os.environ.get('VSSM_CROSS_FORM', '0') == '1'


@contextmanager
def _env_switch(name: str, enabled: bool) -> Iterator[None]:
    """The variable ``name`` set to 1 or 0 for the calls inside, restored after (process-wide)."""
    previous = os.environ.get(name)
    os.environ[name] = '1' if enabled else '0'
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def triton_fusions(enabled: bool = True) -> ContextManager[None]:
    """``VSSM_TRITON_FUSIONS`` set to ``enabled`` for the calls inside (the ops read it per call; benchmarks and tests
    run one op both ways). Process-wide, like the variable."""
    return _env_switch('VSSM_TRITON_FUSIONS', enabled)


def cross_form_switch(enabled: bool = True) -> ContextManager[None]:
    """``VSSM_CROSS_FORM`` set to ``enabled`` for the calls inside, as :func:`triton_fusions`."""
    return _env_switch('VSSM_CROSS_FORM', enabled)


def exporting() -> bool:
    """Traced for FLOP counting (``torch.jit.trace``) or exported (``torch.export``, the ONNX exporter): the ops run as
    plain PyTorch ops, which those tools know. Not under ``torch.compile``, where the custom ops are graph nodes:
    ``torch.compiler.is_exporting()`` alone also answers True while dynamo traces for ``torch.compile`` on some
    versions (torch 2.11), so a dynamo trace counts as compiling (``torch.export`` traces without dynamo by default)."""
    import torch
    return torch.jit.is_tracing() or (torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling())


def is_cacheable(t: Tensor) -> bool:
    """Whether a constant tensor built inside an op (an index, a map) may be kept in a module-level cache: not the
    fake tensors of tracers (FakeTensorMode, torch.compile) or tensors on the meta device, which would leak into later
    real calls."""
    return type(t) is Tensor and t.device.type != 'meta'
