"""Batched GEMMs of the K scan sequences' projections with per-sequence weights.

``grouped_matmul(weight, x)`` is ``torch.matmul(weight, x)`` for per-group weights (K, O, I) and inputs (B, K, I, L)
(the x_proj / dt_proj projections of the K scan sequences): one batched GEMM per group with the weight broadcast over
the batch as a stride-0 view. ``torch.matmul``'s broadcasting materializes a (B*K, O, I) copy of the weight and saves it
for the backward (6.8 GiB for Spectral VMamba-T at batch 128, whose weights are large next to its L = 49 tokens);
an einsum saves a permuted copy of x instead, and a grouped ``conv1d`` (the same saves) runs 60x slower in fp32 on
cuDNN. Its backward keeps x and the (cast) weight only.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._backend import autocast_dtype, plain_autograd_enabled

__all__ = ['grouped_matmul', 'grouped_gemm', 'grouped_gemm_backward']


def grouped_gemm(weight: Tensor, x: Tensor) -> Tensor:
    """The GEMMs without autograd: weight (K, O, I) and x (B, K, I, L) of one dtype -> (B, K, O, L), each group's GEMM
    writing into its slice of one output (no stacking copy)."""
    batch, (groups, rows, cols) = x.shape[0], weight.shape
    out = x.new_empty(batch, groups, rows, x.shape[3])
    for k in range(groups):
        torch.bmm(weight[k].expand(batch, rows, cols), x[:, k], out=out[:, k])
    return out


def grouped_gemm_backward(weight: Tensor, x: Tensor, grad: Tensor, need_weight: bool = True,
                          need_x: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The gradients of :func:`grouped_gemm`'s weight (summed over the batch) and x, in x's dtype."""
    batch, (groups, rows, cols) = x.shape[0], weight.shape
    grad_weight = grad_x = None
    if need_x:
        grad_x = x.new_empty(x.shape)
        for k in range(groups):
            torch.bmm(weight[k].t().expand(batch, cols, rows), grad[:, k], out=grad_x[:, k])
    if need_weight:
        grad_weight = torch.stack([torch.bmm(grad[:, k], x[:, k].transpose(1, 2)).sum(0) for k in range(groups)])
    return grad_weight, grad_x


class _GroupedMatmul(torch.autograd.Function):
    """out[:, k] = weight[k] @ x[:, k] (:func:`grouped_gemm`), saving weight and x."""

    @staticmethod
    def forward(ctx, weight: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(weight, x)
        return grouped_gemm(weight, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, x = ctx.saved_tensors
        return grouped_gemm_backward(weight, x, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[1])


def grouped_matmul(weight: Tensor, x: Tensor) -> Tensor:
    """(K, O, I) weights, (B, K, I, L) inputs -> (B, K, O, L) with ``out[:, k] = weight[k] @ x[:, k]``.

    Under autocast both run in its dtype (as ``torch.matmul`` would); outside it the weight takes x's dtype. The
    backward keeps x and the (cast) weight, nothing of the batch's size beyond x itself.
    """
    if weight.dim() != 3 or x.dim() != 4 or x.shape[1] != weight.shape[0] or x.shape[2] != weight.shape[2]:
        raise ValueError(f'grouped_matmul: expected weight (K, O, I) and x (B, K, I, L), got {tuple(weight.shape)} '
                         f'and {tuple(x.shape)}.')
    dtype = autocast_dtype(x)
    weight, x = weight.to(dtype), x.to(dtype)
    # The same GEMMs as plain ops for FLOP counters, exporters and torch.compile (whose partitioner decides the saves).
    if torch.jit.is_tracing() or plain_autograd_enabled() or torch.compiler.is_compiling():
        shape = (x.shape[0], ) + tuple(weight.shape[1:])
        return torch.stack([torch.bmm(weight[k].expand(shape), x[:, k]) for k in range(weight.shape[0])], dim=1)
    return _GroupedMatmul.apply(weight, x)
