"""What a training forward keeps for the backward: every tensor autograd saves, by module.

``torch.autograd.graph.saved_tensors_hooks`` sees every tensor saved for backward, those of custom autograd
functions and ``torch.library`` operators included. Saved tensors are counted once per storage, with the storage's
full size (a view keeps all of it alive), and each storage is attributed to the innermost ``nn.Module`` running
at its first save (forward pre/post hooks keep a stack). Storages of parameters and buffers are not counted: they
exist anyway. Not counted either: the forward's transient buffers, the backward's temporaries and the gradients,
and the caching allocator's rounding; at the end of a forward, a training step holds about the parameters, the
optimizer state and the saved tensors.
"""
import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Sequence

import torch
from torch import Tensor, nn

__all__ = ['SavedStorage', 'SavedTensorRecorder', 'SavedMemory', 'record_saved_tensors', 'static_bytes']


@dataclass
class SavedStorage:
    """One storage saved for backward (counted once however many tensors saved it)."""
    nbytes: int  # the whole storage
    dtype: str
    shape: tuple  # of the first tensor saved from it
    module: str  # qualified name of the innermost module at the first save ('' = the model itself)
    module_type: str
    saves: int = 1  # tensors saved from this storage


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


class SavedTensorRecorder:
    """Record the storages saved for backward inside :meth:`record`.

    Args:
        model: the modules to attribute the saves to (hooks on all of its submodules while recording).
        exclude: tensors whose storages are not activations (parameters and buffers): never recorded.
    """

    def __init__(self, model: nn.Module, exclude: Sequence[Tensor] = ()) -> None:
        self.model = model
        self.names = {}
        for name, module in model.named_modules():
            self.names.setdefault(id(module), name)
        self.excluded = {_storage_key(t) for t in exclude if t.numel() > 0}
        self.storages: List[SavedStorage] = []
        self._index: Dict[int, int] = {}
        self._stack: List[nn.Module] = []
        self._keep: List[Tensor] = []  # alive while recording, so that no storage address is reused

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        self._stack.append(module)

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        while self._stack:
            if self._stack.pop() is module:
                break

    def _pack(self, t: Tensor) -> Tensor:
        nbytes = t.untyped_storage().nbytes()
        key = _storage_key(t)
        if nbytes == 0 or key in self.excluded:
            return t
        if key in self._index:
            self.storages[self._index[key]].saves += 1
            return t
        module = self._stack[-1] if self._stack else self.model
        self._index[key] = len(self.storages)
        self.storages.append(SavedStorage(nbytes=nbytes, dtype=str(t.dtype).replace('torch.', ''),
                                          shape=tuple(t.shape), module=self.names.get(id(module), '?'),
                                          module_type=type(module).__name__))
        self._keep.append(t)
        return t

    @contextlib.contextmanager
    def record(self) -> Iterator['SavedTensorRecorder']:
        handles = []
        for module in self.model.modules():
            handles.append(module.register_forward_pre_hook(self._pre_hook))
            handles.append(module.register_forward_hook(self._post_hook, always_call=True))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self._stack.clear()
            self._keep.clear()


@dataclass
class SavedMemory:
    """Totals of one recorded forward: bytes saved for backward, overall and per module type / module path (largest
    first)."""
    saved_bytes: int
    by_type: Dict[str, int] = field(default_factory=dict)
    by_module: Dict[str, int] = field(default_factory=dict)
    storages: List[SavedStorage] = field(default_factory=list)


def _ordered(table: Dict[str, int]) -> Dict[str, int]:
    return dict(sorted(table.items(), key=lambda kv: -kv[1]))


def record_saved_tensors(model: nn.Module, step: Callable[[], Tensor]) -> SavedMemory:
    """Run ``step`` (a forward returning a loss, e.g. under autocast) and total what it saves for backward.

    Nothing runs backward here; the graph is freed when the loss goes out of scope.
    """
    exclude = list(model.parameters()) + list(model.buffers())
    recorder = SavedTensorRecorder(model, exclude)
    with recorder.record():
        step()
    by_type, by_module = defaultdict(int), defaultdict(int)
    for s in recorder.storages:
        by_type[s.module_type] += s.nbytes
        by_module[s.module or '(model)'] += s.nbytes
    return SavedMemory(saved_bytes=sum(s.nbytes for s in recorder.storages), by_type=_ordered(by_type),
                       by_module=_ordered(by_module), storages=recorder.storages)


def static_bytes(model: nn.Module) -> Dict[str, int]:
    """What a training step holds besides activations: the parameters and buffers, the gradients of the trainable
    parameters, and AdamW's state (exp_avg and exp_avg_sq, each the size of the trainable parameters)."""
    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    trainable = [p for p in model.parameters() if p.requires_grad]
    return dict(parameters=size(model.parameters()), buffers=size(model.buffers()), gradients=size(trainable),
                adamw_state=2 * size(trainable))
