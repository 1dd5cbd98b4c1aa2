"""Autograd functions that save less for the backward than the plain composition (training memory).

``gelu_linear(h, fc)`` is ``fc(gelu(h))`` for the second half of an MLP: autograd would save both ``h`` (for GELU's
backward) and ``gelu(h)`` (for the weight gradient of ``fc``), two tensors of the hidden width (4C); this saves ``h``
only and recomputes ``gelu(h)`` in the backward (one elementwise pass). Outputs and gradients are those of the
plain composition, under autocast too (the matmul runs in the dtype autocast gave the forward's output).

``recomputed_linear(f, fc, *inputs)`` generalizes it: ``fc(f(*inputs))`` saving the inputs, ``f`` (a norm, a gate)
recomputed in the backward, e.g. Spatial-Mamba's ``out_proj(LN(y) * SiLU(z))``.

``grouped_matmul`` (:mod:`vssm.ops.grouped_matmul`, re-exported here) is the projections' batched GEMM.

``set_recompute(False)`` (:mod:`vssm.ops._backend`'s switch, re-exported here; or ``VSSM_RECOMPUTE=0`` in the
environment) makes the recomputed projections, Spatial-Mamba's checkpointed state fusion and the scans' recomputed
step sizes (:func:`vssm.ops.selective_scan_low_rank`) the plain compositions, to measure what the recomputation costs
in time and saves in memory (``tools/analysis_tools/benchmark.py --no-recompute``). :func:`vssm.ops.plain_autograd`
makes every function here the plain composition, differentiated by autograd (to check the hand-written backwards).
"""
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops._backend import autocast_dtype, plain_autograd_enabled, recompute_enabled, set_recompute
from ...ops.bias_gelu import bias_gelu
from ...ops.grouped_matmul import grouped_matmul

__all__ = ['recomputed_linear', 'gelu_linear', 'grouped_matmul', 'set_recompute', 'recompute_enabled']

# Linear2d's 1x1 convolutions as one batched GEMM per image where that is faster than cuDNN (one H100, batch 128,
# docs/benchmarks.md): on maps of at least 784 pixels (VMamba-T's stages 1 and 2 at 224x224: 1.12x-1.20x the whole
# model's bf16 inference, 1.10x-1.34x its training). On smaller maps with wide channels (VMamba's stages 3-4, Spectral
# VMamba's 14x14 patches) cuDNN's single GEMM over all the images' pixels is faster (Spectral VMamba-T 0.80x in fp32
# inference with the GEMM form there) and the batched form's backward peaks higher. Float32 takes it only with TF32
# matmuls allowed (as the benchmarks run; :func:`gemm_form`). False: cuDNN everywhere.
GEMM_1X1 = True
GEMM_MIN_PIXELS = 784


def gemm_form(x: Tensor) -> bool:
    """Whether :func:`linear_2d` runs ``x`` as a batched GEMM: an NCHW-contiguous CUDA map of at least
    ``GEMM_MIN_PIXELS`` pixels, computed in 16 bits, or in float32 where matmuls may use TF32
    (``torch.backends.cuda.matmul.allow_tf32``, off by default, where cuDNN's convolutions use TF32 by default: a
    full-float32 GEMM would be several times slower than cuDNN's TF32 one). Elsewhere ``F.conv2d``."""
    if not (GEMM_1X1 and x.is_cuda and x.dim() == 4 and x.is_contiguous()
            and x.shape[2] * x.shape[3] >= GEMM_MIN_PIXELS):
        return False
    dtype = autocast_dtype(x)
    return dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32
                                                        and torch.backends.cuda.matmul.allow_tf32)


def linear_2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The 1x1 convolution of a (B, C, H, W) map with an (out, in) weight. Where :func:`gemm_form` holds it is one
    batched GEMM, ``out[b] = weight @ x[b]`` on the (C, H*W) matrix of each image with the weight cast once and
    broadcast (stride 0): no layout transposes around it, as cuDNN's 1x1 convolution has for NCHW maps."""
    if not gemm_form(x):
        return F.conv2d(x, weight[:, :, None, None], bias)
    b, c, h, w = x.shape
    dtype = autocast_dtype(x)
    out = torch.bmm(weight.to(dtype).expand(b, -1, -1), x.to(dtype).view(b, c, h * w)).view(b, -1, h, w)
    return out if bias is None else out + bias.to(dtype)[:, None, None]


class _RecomputedLinear(torch.autograd.Function):
    """out = linear(f(*inputs)) (channels last) or a 1x1 conv of it (channels first, weight (out, in)), saving
    ``inputs``; ``f`` (elementwise or a norm: cheap) runs again in the backward, under the forward's autocast."""

    @staticmethod
    def forward(ctx, f: Callable, channels_first: bool, weight: Tensor, bias: Optional[Tensor], *inputs: Tensor):
        a = f(*inputs)
        if channels_first:
            out = linear_2d(a, weight, bias)
        else:
            out = F.linear(a, weight, bias)
        device = inputs[0].device.type
        ctx.f, ctx.channels_first = f, channels_first
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.compute_dtype = out.dtype  # autocast's choice for the matmul
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(weight, *inputs)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, *inputs = ctx.saved_tensors
        need_w, need_b = ctx.needs_input_grad[2:4]
        need_inputs = ctx.needs_input_grad[4:]
        leaves = [x.detach().requires_grad_(need) for x, need in zip(inputs, need_inputs)]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            a = ctx.f(*leaves)
        dt = ctx.compute_dtype
        a_c, g, w = a.detach().to(dt), grad_out.to(dt), weight.to(dt)
        need_a = any(need_inputs)
        grad_w = grad_b = grad_a = None
        if ctx.channels_first and gemm_form(a_c):
            b, o = g.shape[:2]
            g3, a3 = g.reshape(b, o, -1), a_c.view(b, a_c.shape[1], -1)
            grad_a = torch.bmm(w.t().expand(b, -1, -1), g3).view(a_c.shape) if need_a else None
            grad_w = torch.bmm(g3, a3.transpose(1, 2)).sum(0) if need_w else None
            grad_b = g3.sum((0, 2)) if need_b and ctx.bias_dtype is not None else None
        elif ctx.channels_first:
            grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
                g, a_c, w[:, :, None, None], [w.shape[0]] if ctx.bias_dtype is not None else None, [1, 1], [0, 0],
                [1, 1], False, [0, 0], 1, [need_a, need_w, need_b and ctx.bias_dtype is not None])
            grad_w = grad_w.flatten(1) if grad_w is not None else None
        else:
            g2 = g.reshape(-1, g.shape[-1])
            grad_a = g @ w if need_a else None
            grad_w = g2.t() @ a_c.reshape(-1, a_c.shape[-1]) if need_w else None
            grad_b = g2.sum(0) if need_b and ctx.bias_dtype is not None else None
        grads = [None] * len(inputs)
        wanted = [i for i, need in enumerate(need_inputs) if need]
        if wanted:
            found = torch.autograd.grad(a, [leaves[i] for i in wanted], grad_a.to(a.dtype), allow_unused=True)
            for i, grad in zip(wanted, found):
                grads[i] = grad
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(ctx.bias_dtype) if grad_b is not None else None
        return (None, None, grad_w, grad_b, *grads)


def linear(x: Tensor, fc: nn.Linear, channels_first: bool = False, with_bias: bool = True) -> Tensor:
    """``fc(x)``, or without its bias (``with_bias=False``): ``F.linear`` on (..., in), :func:`linear_2d` on
    (B, in, H, W) maps with ``channels_first``."""
    b = fc.bias if with_bias else None
    return linear_2d(x, fc.weight, b) if channels_first else F.linear(x, fc.weight, b)


def recomputed_linear(f: Callable[..., Tensor], fc: nn.Linear, *inputs: Tensor, channels_first: bool = False,
                      with_bias: bool = True) -> Tensor:
    """``fc(f(*inputs))`` saving only ``inputs`` for the backward, where ``f`` runs again (it must be cheap and
    deterministic: elementwise ops, norms; its parameters are passed in ``inputs`` to get gradients).

    Args:
        f: the function of ``inputs`` that gives ``fc``'s input: (..., in), or (B, in, H, W) with ``channels_first``.
        fc: the output projection (``nn.Linear`` or ``Linear2d``: weight (out, in)).
        channels_first: ``f``'s output is an NCHW map and ``fc`` a 1x1 convolution over its channels.
        with_bias: False leaves out ``fc``'s bias (for a caller that adds it in its next pass: an activation's,
            :func:`gelu_linear`, or the residual's, :func:`vssm.ops.add_residual`).
    """
    # The plain ops: without autograd nothing is saved; under torch.compile the partitioner of AOTAutograd chooses
    # what to save and what to recompute for the whole graph (and cannot trace the recomputing backward).
    if (not recompute_enabled() or not torch.is_grad_enabled() or plain_autograd_enabled()
            or torch.compiler.is_compiling()):
        return linear(f(*inputs), fc, channels_first, with_bias)
    return _RecomputedLinear.apply(f, channels_first, fc.weight, fc.bias if with_bias else None, *inputs)


def gelu_linear(h: Tensor, fc: nn.Linear, channels_first: bool = False, in_bias: Optional[Tensor] = None,
                with_bias: bool = True, backend: str = 'auto') -> Tensor:
    """``fc(gelu(h))`` saving only ``h`` for the backward (the second half of an MLP). ``in_bias`` (channels-first
    maps): ``fc(gelu(h + in_bias))``, the first projection's bias added in GELU's pass (:func:`vssm.ops.bias_gelu`
    with ``backend``) where that projection left it out. ``with_bias``: as in :func:`recomputed_linear`."""
    if in_bias is None:
        return recomputed_linear(F.gelu, fc, h, channels_first=channels_first, with_bias=with_bias)
    if not channels_first:
        raise ValueError('gelu_linear: a bias before the GELU is taken on channels-first maps only.')
    return recomputed_linear(partial(bias_gelu, backend=backend), fc, h, in_bias, channels_first=True,
                             with_bias=with_bias)
