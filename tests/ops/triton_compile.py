"""Compile the Triton kernels for a GPU on a machine without one: the launches a wrapper makes (on CPU tensors) are
recorded instead of run, then each is compiled by Triton's real compiler (front end, TTGIR, LLVM, PTX, cubin) for
an sm_90 target. This catches what the interpreter cannot: Triton's type rules (e.g. a loop-carried variable that
changes type), constexpr branches, and ptxas errors."""
from contextlib import ExitStack
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TYPES = {torch.float32: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16', torch.int64: 'i64', torch.int32: 'i32',
         torch.bool: 'i1'}


class _Recorder:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record_launches(module, kernel_names, call):
    """Run ``call()`` with the kernels ``module.<name>`` replaced by recorders; returns [(kernel, args, kwargs)]."""
    launches = []
    with ExitStack() as stack:
        for name in kernel_names:
            stack.enter_context(mock.patch.object(module, name, _Recorder(getattr(module, name), launches)))
        call()
    return launches


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return '*' + TYPES[value.dtype]
    if isinstance(value, bool):
        return 'i1'
    if isinstance(value, int):
        return 'i32' if -2**31 <= value < 2**31 else 'i64'
    if isinstance(value, float):
        return 'fp32'
    raise TypeError(f'no Triton type for {type(value).__name__}')


def compile_launch(kernel, args, kwargs, arch: int = 90):
    """Compile one recorded launch for ``sm_<arch>``; returns the compiled kernel (its ``asm`` holds the stages)."""
    options = {k: kwargs[k] for k in ('num_warps', 'num_stages') if k in kwargs}
    constexprs = {k: v for k, v in kwargs.items() if k not in options}
    names = kernel.arg_names
    positional = dict(zip(names, args))
    signature, constants = {}, {}
    for index, name in enumerate(names):
        if name in constexprs:
            signature[name] = 'constexpr'
            constants[(index, )] = constexprs[name]
        else:
            signature[name] = _arg_type(positional[name])
    source = ASTSource(kernel, signature, constants)
    return triton.compile(source, target=GPUTarget('cuda', arch, 32), options=options)
