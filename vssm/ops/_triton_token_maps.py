"""Triton kernels of :func:`vssm.ops.scatter_tokens` over permutations (the K sequences added back onto the tokens)
and of :func:`vssm.ops.gather_tokens` (the tokens read in K orders).

With the inverse permutations given, sequence k's output for token p sits at step ``inverse[b, k, p]``, so::

    out[b, d, p] = sum over k of y[b, k, d, inverse[b, k, p]]

The reference gathers the (B, K, D, L) map into raster order (a second (B, K, D, L) map) and sums it over K; here a
program reads, for a tile of channels and consecutive tokens of one image, the K sequences' values at their steps and
writes the sum: one read of y, one write of the (B, D, L) map. The sum runs in float32 in the order k = 0, 1, ... and
is rounded once to y's dtype (as the reference's sum over K does); no atomics, so the result does not vary from run
to run.

The gather, ``out[b, k, d, i] = x[b, d, index[b, k, i]]``, is the same walk without the sum: a program loads the
positions of a run of steps once for its tile of channels (ATen's gather reads an int64 index per element written)
and writes each sequence's tile as contiguous runs; the programs of one image run together, so its map is read from
the L2 cache K times and from memory once.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_BLOCK_L = 256  # consecutive tokens per program (the stores are contiguous runs of this length)
TILE_ELEMENTS = 1024  # at least this many (channels x tokens) per program: BLOCK_D = TILE_ELEMENTS / BLOCK_L, >= 8
NUM_WARPS = 4


def tiles(length: int):
    """(BLOCK_D, BLOCK_L): the tokens of a row up to 256 (padded to a power of two), the channels filling the tile.
    Measured on an H100 (VMamba-T's four sequences at batch 128, fp32 and bf16): 8 x 256 fastest for 3136, 784 and
    196 tokens (1.7-3.8x the gather and sum), 16 x 64 for 49 tokens; 16 x 128, 32 x 64 and 64 x 32 slower."""
    block_l = min(MAX_BLOCK_L, max(16, triton.next_power_of_2(length)))
    return max(8, TILE_ELEMENTS // block_l), block_l


@triton.jit
def _merge_kernel(y_ptr, inv_ptr, out_ptr, n_d, length, inv_batch_stride, K: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_L: tl.constexpr):
    pid_l, pid_d, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_l = offs_l < length
    mask = (offs_d < n_d)[:, None] & mask_l[None, :]
    rows = offs_d[:, None].to(tl.int64) * length  # offset of each channel's row within one sequence's map
    acc = tl.zeros([BLOCK_D, BLOCK_L], tl.float32)
    for k in tl.static_range(K):
        step = tl.load(inv_ptr + batch * inv_batch_stride + k * length + offs_l, mask=mask_l, other=0)
        seq = y_ptr + (batch * K + k) * n_d * length  # (D, L) map of sequence k
        acc += tl.load(seq + rows + step[None, :], mask=mask, other=0.).to(tl.float32)
    tl.store(out_ptr + batch * n_d * length + rows + offs_l[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, n_d, length, steps, idx_batch_stride, K: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_l, pid_d, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_i = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_i = offs_i < steps
    mask = (offs_d < n_d)[:, None] & mask_i[None, :]
    x_rows = x_ptr + batch * n_d * length + offs_d[:, None].to(tl.int64) * length  # (BLOCK_D, 1) channel rows of x
    out_rows = offs_d[:, None].to(tl.int64) * steps + offs_i[None, :]  # the tile within one sequence's (D, M) map
    for k in tl.static_range(K):
        pos = tl.load(idx_ptr + batch * idx_batch_stride + k * steps + offs_i, mask=mask_i, other=0)
        values = tl.load(x_rows + pos[None, :], mask=mask, other=0.)
        tl.store(out_ptr + (batch * K + k) * n_d * steps + out_rows, values, mask=mask)


def gather(x: Tensor, index: Tensor) -> Tensor:
    """x (B, D, L) contiguous, index (B or 1, K, M) int64 contiguous in [0, L) -> (B, K, D, M) in x's dtype."""
    b, d, length = x.shape
    k, steps = index.shape[1:]
    out = torch.empty(b, k, d, steps, dtype=x.dtype, device=x.device)
    idx_batch_stride = k * steps if index.shape[0] > 1 else 0
    block_d, block_l = tiles(steps)
    grid = (triton.cdiv(steps, block_l), triton.cdiv(d, block_d), b)
    _gather_kernel[grid](x, index, out, d, length, steps, idx_batch_stride, K=k, BLOCK_D=block_d, BLOCK_L=block_l,
                         num_warps=NUM_WARPS)
    return out


def merge(y: Tensor, inverse: Tensor) -> Tensor:
    """y (B, K, D, L) contiguous, inverse (B or 1, K, L) int64 contiguous -> (B, D, L) in y's dtype."""
    b, k, d, length = y.shape
    out = torch.empty(b, d, length, dtype=y.dtype, device=y.device)
    inv_batch_stride = k * length if inverse.shape[0] > 1 else 0
    block_d, block_l = tiles(length)
    grid = (triton.cdiv(length, block_l), triton.cdiv(d, block_d), b)
    _merge_kernel[grid](y, inverse, out, d, length, inv_batch_stride, K=k, BLOCK_D=block_d, BLOCK_L=block_l,
                        num_warps=NUM_WARPS)
    return out
