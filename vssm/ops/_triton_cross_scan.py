"""Triton kernels of :func:`vssm.ops.cross_selective_scan`: K sequences read from a map, scanned and added back.

For batch b, sequence k (K of them), channel d, step i (L steps) and raster token p = index[b, k, i]::

    u      = x[b, d, p]
    raw    = <dt_weight[k, d, :], dbl[b, k, :R, p]> + dt_bias[k, d]        (the dot rounded to x's dtype when 16-bit)
    delta  = softplus(raw)                                                 (threshold 20)
    h_i    = exp(delta * A[k, d, :]) * h_{i-1} + delta * u * dbl[b, k, R:R+N, p]
    out[b, d, p] += <h_i, dbl[b, k, R+N:R+2N, p]> + Ds[k, d] * u

``x`` (B, D, L) and ``out`` (B, D, L, float32) are raster maps, ``dbl`` (B, K, R + 2N, L) the per-token projections of
each sequence (x_proj, in raster order), ``index`` (B or 1, K, L) permutations. Nothing of (B, K, D, L) is written:
the gather is the kernel's loads and the merge its stores.

A program owns one batch element, ``BD`` channels and one sequence, whose shares it adds onto ``out`` with atomics; with
deterministic algorithms requested (``torch.use_deterministic_algorithms``) it runs the K sequences one after the other
instead, adding them in a fixed order by read-modify-write. The steps go in chunks of ``BL``: the
recurrence inside a chunk is an associative scan over affine maps, the state carried between chunks. The forward
writes the state entering every chunk (B, K, D, chunks, N); the backward walks the chunks from the last, recomputes
the chunk's states from it and runs the adjoint recurrence ``G_i = C_i * dy_i + a_{i+1} * G_{i+1}`` (a reverse scan;
a_{i+1} recomputed from the next step's inputs). The gradients of the per-token projections are sums over channels,
added across the programs of one batch element with atomics (as the CUDA scan does for dB and dC); those of the
per-channel parameters are per-batch partial sums reduced on the host.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import round_to

NUM_WARPS = 4
BLOCK_D = 16  # channels per program (tl.dot's smallest tile side)


@triton.jit
def _affine(a1, b1, a2, b2):
    """Composition of two steps h -> a*h + b, the first (a1, b1) then (a2, b2); for a reverse scan, the accumulated
    suffix first: G -> b2 + a2 * (b1 + a1 * G), the same formula."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(raw):
    """softplus with threshold 20; log1p(e) as log(u) * e / (u - 1), u = 1 + e (exact to rounding for small e)."""
    e = tl.exp(tl.minimum(raw, 20.))
    u = 1. + e
    log1p = tl.where(u == 1., e, tl.log(u) * e / (u - 1.))
    return tl.where(raw <= 20., log1p, raw)


@triton.jit
def _dot(a, b, LOW: tl.constexpr, dtype: tl.constexpr):
    """a @ b in float32: operands rounded to the 16-bit dtype (as the reference's GEMMs take them) or exact fp32."""
    if LOW:
        return tl.dot(a.to(dtype), b.to(dtype), out_dtype=tl.float32)
    return tl.dot(a, b, input_precision='ieee', out_dtype=tl.float32)


@triton.jit
def _step_sizes(dbl, w, bias, pos, mask_l, offs_r, n_rank, length, LOW: tl.constexpr, dtype: tl.constexpr):
    """(raw, delta, dts) of a chunk: dts (RP, BL) the low-rank step inputs at ``pos``, raw = w @ dts + bias."""
    dts = tl.load(dbl + offs_r[:, None] * length + pos[None, :], mask=(offs_r[:, None] < n_rank) & mask_l[None, :],
                  other=0.).to(tl.float32)
    raw = round_to(_dot(w, dts, LOW, dtype), LOW, dtype) + bias[:, None]
    return raw, _softplus(raw), dts


@triton.jit
def _chunk(x_row, dbl, idx_row, w, bias, A, offs_d, mask_d, offs_n, mask_n, offs_r, offs_i, n_rank, n_state, length,
           LOW: tl.constexpr, dtype: tl.constexpr):
    """One chunk's inputs and decays: positions, u, raw, delta, dts, B, C (NP, BL), a and delta * u * B (BD, NP, BL)
    (a = 1 and delta * u * B = 0 past the end, so the state stays put there)."""
    mask_l = offs_i < length
    pos = tl.load(idx_row + offs_i, mask=mask_l, other=0)
    mask = mask_d[:, None] & mask_l[None, :]
    u = tl.load(x_row + offs_d[:, None] * length + pos[None, :], mask=mask, other=0.).to(tl.float32)
    raw, delta, dts = _step_sizes(dbl, w, bias, pos, mask_l, offs_r, n_rank, length, LOW, dtype)
    mask_nl = mask_n[:, None] & mask_l[None, :]
    Bv = tl.load(dbl + (n_rank + offs_n[:, None]) * length + pos[None, :], mask=mask_nl, other=0.).to(tl.float32)
    Cv = tl.load(dbl + (n_rank + n_state + offs_n[:, None]) * length + pos[None, :], mask=mask_nl,
                 other=0.).to(tl.float32)
    live = mask_l[None, None, :]
    a = tl.where(live, tl.exp(delta[:, None, :] * A[:, :, None]), 1.)
    bx = tl.where(live, (delta * u)[:, None, :] * Bv[None, :, :], 0.)
    return mask_l, pos, mask, u, raw, delta, dts, Bv, Cv, a, bx


@triton.jit
def _sequence_params(w_ptr, bias_ptr, a_ptr, ds_ptr, k, offs_d, mask_d, offs_n, mask_n, offs_r, n_d, n_rank, n_state):
    """Sequence k's per-channel parameters: dt weight (BD, RP), bias, A (BD, NP), Ds (float32)."""
    kd = k * n_d + offs_d
    w = tl.load(w_ptr + kd[:, None] * n_rank + offs_r[None, :], mask=mask_d[:, None] & (offs_r[None, :] < n_rank),
                other=0.).to(tl.float32)
    bias = tl.load(bias_ptr + kd, mask=mask_d, other=0.).to(tl.float32)
    A = tl.load(a_ptr + kd[:, None] * n_state + offs_n[None, :], mask=mask_d[:, None] & mask_n[None, :],
                other=0.).to(tl.float32)
    ds = tl.load(ds_ptr + kd, mask=mask_d, other=0.).to(tl.float32)
    return kd, w, bias, A, ds


@triton.jit
def _program(n_k, n_d, n_state, SPLIT_K: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr):
    """The program's batch element (grid axis 2), its sequences (all K one after the other, or with SPLIT_K the one
    of grid axis 1), channels (axis 0) with their mask, state and rank offsets."""
    if SPLIT_K:
        k_first = tl.program_id(1)
        k_end = k_first + 1
    else:
        k_first = 0
        k_end = n_k
    offs_d = tl.program_id(0) * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, NP)
    return (tl.program_id(2).to(tl.int64), k_first, k_end, offs_d, offs_d < n_d, offs_n, offs_n < n_state,
            tl.arange(0, RP))


@triton.jit
def _accumulate(ptrs, value, mask, k, SPLIT_K: tl.constexpr):
    """Add sequence k's share to a raster map: atomics across the K programs (SPLIT_K, the map zeroed first), or the
    program's own read-modify-write, the first sequence storing (the K shares added in a fixed order)."""
    if SPLIT_K:
        tl.atomic_add(ptrs, value, mask=mask)
    else:
        previous = tl.load(ptrs, mask=mask & (k > 0), other=0.)
        tl.store(ptrs, previous + value, mask=mask)


@triton.jit
def _column(t, offs_l, j):
    """Column j of a (BD, NP, BL) tile."""
    return tl.sum(tl.where(offs_l[None, None, :] == j, t, 0.), 2)


@triton.jit
def _cross_scan_fwd(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, out_ptr, state_ptr,
                    n_d, length, n_k, n_rank, n_state, index_batch, n_chunks,
                    LOW: tl.constexpr, SPLIT_K: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
                    BL: tl.constexpr):
    b, k_first, k_end, offs_d, mask_d, offs_n, mask_n, offs_r = _program(n_k, n_d, n_state, SPLIT_K, BD, NP, RP)
    offs_l = tl.arange(0, BL)
    dtype = x_ptr.dtype.element_ty
    x_row = x_ptr + b * n_d * length
    out_row = out_ptr + b * n_d * length
    n_dbl = n_rank + 2 * n_state
    for k in range(k_first, k_end):
        kd, w, bias, A, ds = _sequence_params(w_ptr, bias_ptr, a_ptr, ds_ptr, k, offs_d, mask_d, offs_n, mask_n,
                                              offs_r, n_d, n_rank, n_state)
        dbl = dbl_ptr + (b * n_k + k) * n_dbl * length
        idx_row = index_ptr + b * index_batch + k * length
        state_row = state_ptr + ((b * n_k * n_d + kd[:, None]) * n_chunks) * n_state + offs_n[None, :]
        h = tl.zeros([BD, NP], dtype=tl.float32)
        for c in range(0, n_chunks):
            offs_i = c * BL + offs_l
            mask_l, pos, mask, u, _raw, _delta, _dts, _Bv, Cv, a, bx = _chunk(
                x_row, dbl, idx_row, w, bias, A, offs_d, mask_d, offs_n, mask_n, offs_r, offs_i, n_rank, n_state,
                length, LOW, dtype)
            tl.store(state_row + c * n_state, h, mask=mask_d[:, None] & mask_n[None, :])
            pa, hs = tl.associative_scan((a, bx), 2, _affine)
            hs = hs + pa * h[:, :, None]
            h = _column(hs, offs_l, BL - 1)
            y = tl.sum(hs * Cv[None, :, :], 1) + ds[:, None] * u
            _accumulate(out_row + offs_d[:, None] * length + pos[None, :], y, mask, k, SPLIT_K)
        tl.debug_barrier()  # sequence k's stores are visible to the loads of sequence k + 1


@triton.jit
def _cross_scan_bwd(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, state_ptr, gout_ptr,
                    dx_ptr, ddbl_ptr, dw_ptr, dbias_ptr, da_ptr, dds_ptr,
                    n_d, length, n_k, n_rank, n_state, index_batch, n_chunks,
                    LOW: tl.constexpr, SPLIT_K: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
                    BL: tl.constexpr):
    b, k_first, k_end, offs_d, mask_d, offs_n, mask_n, offs_r = _program(n_k, n_d, n_state, SPLIT_K, BD, NP, RP)
    mask_r = offs_r < n_rank
    offs_l = tl.arange(0, BL)
    dtype = x_ptr.dtype.element_ty
    x_row = x_ptr + b * n_d * length
    g_row = gout_ptr + b * n_d * length
    dx_row = dx_ptr + b * n_d * length
    n_dbl = n_rank + 2 * n_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    for k in range(k_first, k_end):
        kd, w, bias, A, ds = _sequence_params(w_ptr, bias_ptr, a_ptr, ds_ptr, k, offs_d, mask_d, offs_n, mask_n,
                                              offs_r, n_d, n_rank, n_state)
        dbl = dbl_ptr + (b * n_k + k) * n_dbl * length
        ddbl = ddbl_ptr + (b * n_k + k) * n_dbl * length
        idx_row = index_ptr + b * index_batch + k * length
        state_row = state_ptr + ((b * n_k * n_d + kd[:, None]) * n_chunks) * n_state + offs_n[None, :]
        g_next = tl.zeros([BD, NP], dtype=tl.float32)  # G at the first step of the chunk after this one
        dw = tl.zeros([BD, RP], dtype=tl.float32)
        da = tl.zeros([BD, NP], dtype=tl.float32)
        dbias = tl.zeros([BD], dtype=tl.float32)
        dds = tl.zeros([BD], dtype=tl.float32)
        for cc in range(0, n_chunks):
            c = n_chunks - 1 - cc
            offs_i = c * BL + offs_l
            mask_l, pos, mask, u, raw, delta, dts, Bv, Cv, a, bx = _chunk(
                x_row, dbl, idx_row, w, bias, A, offs_d, mask_d, offs_n, mask_n, offs_r, offs_i, n_rank, n_state,
                length, LOW, dtype)
            h0 = tl.load(state_row + c * n_state, mask=mask_dn, other=0.)
            pa, hs = tl.associative_scan((a, bx), 2, _affine)
            hs = hs + pa * h0[:, :, None]
            # the decay of the next step, a_{i+1} (0 after the last step)
            mask_next = offs_i + 1 < length
            pos_next = tl.load(idx_row + offs_i + 1, mask=mask_next, other=0)
            _raw_n, delta_next, _dts_n = _step_sizes(dbl, w, bias, pos_next, mask_next, offs_r, n_rank, length, LOW,
                                                     dtype)
            a_next = tl.where(mask_next[None, None, :], tl.exp(delta_next[:, None, :] * A[:, :, None]), 0.)
            ptrs = offs_d[:, None] * length + pos[None, :]
            gy = tl.load(g_row + ptrs, mask=mask, other=0.)
            gh = gy[:, None, :] * Cv[None, :, :]
            pc, G = tl.associative_scan((a_next, gh), 2, _affine, reverse=True)
            G = G + pc * g_next[:, :, None]
            g_next = _column(G, offs_l, 0)
            glog = G * (hs - bx)  # d/d(delta * A): G_i * a_i * h_{i-1}
            gb = tl.sum(G * Bv[None, :, :], 1)
            ddelta = tl.sum(glog * A[:, :, None], 1) + gb * u
            du = gb * delta + gy * ds[:, None]
            _accumulate(dx_row + ptrs, du, mask, k, SPLIT_K)
            da += tl.sum(glog * delta[:, None, :], 2)
            dds += tl.sum(gy * u, 1)
            draw = tl.where(mask, ddelta * tl.where(raw <= 20., tl.sigmoid(raw), 1.), 0.)
            draw = round_to(draw, LOW, dtype)
            dbias += tl.sum(draw, 1)
            dw += _dot(draw, tl.trans(dts), LOW, dtype)
            # sums over channels: this program's share, added to the other channel blocks' shares
            mask_nl = mask_n[:, None] & mask_l[None, :]
            tl.atomic_add(ddbl + (n_rank + offs_n[:, None]) * length + pos[None, :],
                          tl.sum(G * (delta * u)[:, None, :], 0), mask=mask_nl)
            tl.atomic_add(ddbl + (n_rank + n_state + offs_n[:, None]) * length + pos[None, :],
                          tl.sum(hs * gy[:, None, :], 0), mask=mask_nl)
            tl.atomic_add(ddbl + offs_r[:, None] * length + pos[None, :], _dot(tl.trans(w), draw, LOW, dtype),
                          mask=mask_r[:, None] & mask_l[None, :])
        part = b * n_k * n_d + kd
        tl.store(dw_ptr + part[:, None] * n_rank + offs_r[None, :], dw, mask=mask_d[:, None] & mask_r[None, :])
        tl.store(da_ptr + part[:, None] * n_state + offs_n[None, :], da, mask=mask_dn)
        tl.store(dbias_ptr + part, dbias, mask=mask_d)
        tl.store(dds_ptr + part, dds, mask=mask_d)
        tl.debug_barrier()  # sequence k's dx stores are visible to the loads of sequence k + 1


def _tiles(n_d: int, n_rank: int, n_state: int, length: int):
    """(grid over channels, NP, RP, BL): tl.dot needs 16+ per side; about 1024 elements per (BD, NP, BL) tile."""
    n_p = triton.next_power_of_2(n_state)
    r_p = max(16, triton.next_power_of_2(n_rank))
    block_l = max(16, min(triton.next_power_of_2(length), max(16, 1024 // (BLOCK_D * n_p)), 64))
    return triton.cdiv(n_d, BLOCK_D), n_p, r_p, block_l


def _launch(n_dblk: int, n_k: int, b: int):
    """(grid, SPLIT_K): one program per sequence, merged with atomics, unless deterministic algorithms are requested
    (``torch.use_deterministic_algorithms``), when each program runs the K sequences and adds them in order."""
    split = not torch.are_deterministic_algorithms_enabled()
    return (n_dblk, n_k if split else 1, b), split


def _check(x: Tensor, dbl: Tensor, index: Tensor):
    if not (x.is_contiguous() and dbl.is_contiguous() and index.is_contiguous()):
        raise ValueError('cross_selective_scan kernel: x, the projections and the index must be contiguous.')


def forward(x: Tensor, dbl: Tensor, index: Tensor, dt_weight: Tensor, dt_bias: Tensor, A: Tensor, Ds: Tensor):
    """x (B, D, L); dbl (B, K, R + 2N, L) of x's dtype; index (B or 1, K, L) int64 permutations; dt_weight (K, D, R)
    of x's dtype; dt_bias, Ds (K * D,) and A (K * D, N) float32 -> out (B, D, L) float32 and the chunk states."""
    _check(x, dbl, index)
    b, n_d, length = x.shape
    n_k, n_state = index.shape[1], A.shape[1]
    n_rank = dbl.shape[2] - 2 * n_state
    n_dblk, n_p, r_p, block_l = _tiles(n_d, n_rank, n_state, length)
    n_chunks = triton.cdiv(length, block_l)
    grid, split = _launch(n_dblk, n_k, b)
    out = (torch.zeros if split else torch.empty)(b, n_d, length, dtype=torch.float32, device=x.device)
    states = torch.empty(b, n_k, n_d, n_chunks, n_state, dtype=torch.float32, device=x.device)
    index_batch = 0 if index.shape[0] == 1 else n_k * length
    _cross_scan_fwd[grid](x, dbl, index, dt_weight, dt_bias, A, Ds, out, states, n_d, length, n_k, n_rank, n_state,
                          index_batch, n_chunks, LOW=x.dtype in (torch.float16, torch.bfloat16), SPLIT_K=split,
                          BD=BLOCK_D, NP=n_p, RP=r_p, BL=block_l, num_warps=NUM_WARPS)
    return out, states


def backward(gout: Tensor, x: Tensor, dbl: Tensor, index: Tensor, dt_weight: Tensor, dt_bias: Tensor, A: Tensor,
             Ds: Tensor, states: Tensor):
    """Gradients of :func:`forward`'s output ``gout`` (B, D, L): dx (B, D, L), d dbl (B, K, R + 2N, L) (float32),
    d dt_weight (K, D, R), d dt_bias (K * D,), dA (K * D, N), dDs (K * D,) (float32)."""
    _check(x, dbl, index)
    b, n_d, length = x.shape
    n_k, n_state = index.shape[1], A.shape[1]
    n_rank = dbl.shape[2] - 2 * n_state
    n_dblk, n_p, r_p, block_l = _tiles(n_d, n_rank, n_state, length)
    n_chunks = states.shape[3]
    grid, split = _launch(n_dblk, n_k, b)
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = (torch.zeros if split else torch.empty)(b, n_d, length, **f32)
    ddbl = torch.zeros(dbl.shape, **f32)
    dw = torch.empty(b, n_k, n_d, n_rank, **f32)
    dbias = torch.empty(b, n_k * n_d, **f32)
    da = torch.empty(b, n_k * n_d, n_state, **f32)
    dds = torch.empty(b, n_k * n_d, **f32)
    index_batch = 0 if index.shape[0] == 1 else n_k * length
    _cross_scan_bwd[grid](x, dbl, index, dt_weight, dt_bias, A, Ds, states, gout.float().contiguous(), dx, ddbl, dw,
                          dbias, da, dds, n_d, length, n_k, n_rank, n_state, index_batch, n_chunks,
                          LOW=x.dtype in (torch.float16, torch.bfloat16), SPLIT_K=split, BD=BLOCK_D, NP=n_p, RP=r_p,
                          BL=block_l, num_warps=NUM_WARPS)
    return dx, ddbl, dw.sum(0), dbias.sum(0), da.sum(0), dds.sum(0)
