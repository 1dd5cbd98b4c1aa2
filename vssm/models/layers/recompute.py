"""Autograd functions that save less for the backward than the plain composition (training memory).

``gelu_linear(h, fc)`` is ``fc(gelu(h))`` for the second half of an MLP: autograd would save both ``h`` (for GELU's
backward) and ``gelu(h)`` (for the weight gradient of ``fc``), two tensors of the hidden width (4C); this saves ``h``
only and recomputes ``gelu(h)`` in the backward (one elementwise pass). Outputs and gradients are those of the
plain composition, under autocast too (the matmul runs in the dtype autocast gave the forward's output).

``recomputed_linear(f, fc, *inputs)`` generalizes it: ``fc(f(*inputs))`` saving the inputs, ``f`` (a norm, a gate)
recomputed in the backward, e.g. Spatial-Mamba's ``out_proj(LN(y) * SiLU(z))``.

``grouped_matmul(weight, x)`` is ``torch.matmul(weight, x)`` for per-group weights (K, O, I) and inputs (B, K, I, L)
(the x_proj / dt_proj projections of the K scan sequences): one batched GEMM per group with the weight broadcast over
the batch as a stride-0 view. ``torch.matmul``'s broadcasting materializes a (B*K, O, I) copy of the weight and saves it
for the backward (6.8 GiB for Spectral VMamba-T at batch 128, whose weights are large next to its L = 49 tokens);
an einsum saves a permuted copy of x instead, and a grouped ``conv1d`` (the same saves) runs 60x slower in fp32 on
cuDNN. Not a recomputation: it is used with the switch below off too.

``set_recompute(False)`` (or ``VSSM_RECOMPUTE=0`` in the environment) makes the recomputed projections the plain
compositions, to measure what the recomputation costs in time and saves in memory (``tools/analysis_tools/benchmark.py
--no-recompute``). :func:`vssm.ops.plain_autograd` makes every function here the plain composition, differentiated by
autograd (to check the hand-written backwards).
"""
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops._backend import plain_autograd_enabled

__all__ = ['recomputed_linear', 'gelu_linear', 'grouped_matmul', 'set_recompute', 'recompute_enabled']

_ENABLED = os.environ.get('VSSM_RECOMPUTE', '1') != '0'


def set_recompute(enabled: bool) -> None:
    """Turn the memory-saving recomputations of this module (and Spatial-Mamba's checkpointed state fusion) on or
    off for the whole process; the results are the same either way."""
    global _ENABLED
    _ENABLED = bool(enabled)


def recompute_enabled() -> bool:
    return _ENABLED


class _RecomputedLinear(torch.autograd.Function):
    """out = linear(f(*inputs)) (channels last) or a 1x1 conv of it (channels first, weight (out, in)), saving
    ``inputs``; ``f`` (elementwise or a norm: cheap) runs again in the backward, under the forward's autocast."""

    @staticmethod
    def forward(ctx, f: Callable, channels_first: bool, weight: Tensor, bias: Optional[Tensor], *inputs: Tensor):
        a = f(*inputs)
        if channels_first:
            out = F.conv2d(a, weight[:, :, None, None], bias)
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
        if ctx.channels_first:
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


def recomputed_linear(f: Callable[..., Tensor], fc: nn.Linear, *inputs: Tensor, channels_first: bool = False) -> Tensor:
    """``fc(f(*inputs))`` saving only ``inputs`` for the backward, where ``f`` runs again (it must be cheap and
    deterministic: elementwise ops, norms; its parameters are passed in ``inputs`` to get gradients).

    Args:
        f: the function of ``inputs`` that gives ``fc``'s input: (..., in), or (B, in, H, W) with ``channels_first``.
        fc: the output projection (``nn.Linear`` or ``Linear2d``: weight (out, in)).
        channels_first: ``f``'s output is an NCHW map and ``fc`` a 1x1 convolution over its channels.
    """
    # The plain ops: without autograd nothing is saved; under torch.compile the partitioner of AOTAutograd chooses
    # what to save and what to recompute for the whole graph (and cannot trace the recomputing backward).
    if not _ENABLED or not torch.is_grad_enabled() or plain_autograd_enabled() or torch.compiler.is_compiling():
        return fc(f(*inputs))
    return _RecomputedLinear.apply(f, channels_first, fc.weight, fc.bias, *inputs)


def gelu_linear(h: Tensor, fc: nn.Linear, channels_first: bool = False) -> Tensor:
    """``fc(gelu(h))`` saving only ``h`` for the backward (the second half of an MLP)."""
    return recomputed_linear(F.gelu, fc, h, channels_first=channels_first)


class _GroupedMatmul(torch.autograd.Function):
    """out[:, k] = weight[k] @ x[:, k], each group's GEMM writing into its slice of one output (no stacking copy)."""

    @staticmethod
    def forward(ctx, weight: Tensor, x: Tensor) -> Tensor:
        batch, (groups, rows, cols) = x.shape[0], weight.shape
        out = x.new_empty(batch, groups, rows, x.shape[3])
        for k in range(groups):
            torch.bmm(weight[k].expand(batch, rows, cols), x[:, k], out=out[:, k])
        ctx.save_for_backward(weight, x)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, x = ctx.saved_tensors
        batch, (groups, rows, cols) = x.shape[0], weight.shape
        grad_weight = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = x.new_empty(x.shape)
            for k in range(groups):
                torch.bmm(weight[k].t().expand(batch, cols, rows), grad[:, k], out=grad_x[:, k])
        if ctx.needs_input_grad[0]:
            grad_weight = torch.stack([torch.bmm(grad[:, k], x[:, k].transpose(1, 2)).sum(0) for k in range(groups)])
        return grad_weight, grad_x


def grouped_matmul(weight: Tensor, x: Tensor) -> Tensor:
    """(K, O, I) weights, (B, K, I, L) inputs -> (B, K, O, L) with ``out[:, k] = weight[k] @ x[:, k]``.

    Under autocast both run in its dtype (as ``torch.matmul`` would); outside it the weight takes x's dtype. The
    backward keeps x and the (cast) weight, nothing of the batch's size beyond x itself.
    """
    if weight.dim() != 3 or x.dim() != 4 or x.shape[1] != weight.shape[0] or x.shape[2] != weight.shape[2]:
        raise ValueError(f'grouped_matmul: expected weight (K, O, I) and x (B, K, I, L), got {tuple(weight.shape)} '
                         f'and {tuple(x.shape)}.')
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    weight, x = weight.to(dtype), x.to(dtype)
    # The same GEMMs as plain ops for FLOP counters, exporters and torch.compile (whose partitioner decides the saves).
    if torch.jit.is_tracing() or plain_autograd_enabled() or torch.compiler.is_compiling():
        shape = (x.shape[0], ) + tuple(weight.shape[1:])
        return torch.stack([torch.bmm(weight[k].expand(shape), x[:, k]) for k in range(weight.shape[0])], dim=1)
    return _GroupedMatmul.apply(weight, x)
