"""Triton kernels of :func:`vssm.ops.cross_selective_scan`: K sequences read from a map, scanned and added back.

For batch b, sequence k (K of them), channel d, step i (L steps) and raster token p = index[b, k, i]::

    u      = x[b, d, p]
    raw    = <dt_weight[k, d, :], dbl[b, k, :R, p]> + dt_bias[k, d]        (the dot rounded to x's dtype when 16-bit)
    delta  = softplus(raw)                                                 (threshold 20)
    h_i    = exp(delta * A[k, d, :]) * h_{i-1} + delta * u * dbl[b, k, R:R+N, p]
    out[b, d, p] += <h_i, dbl[b, k, R+N:R+2N, p]> + Ds[k, d] * u

``x`` (B, D, L) and ``out`` (B, D, L, float32) are raster maps, ``dbl`` (B, K, R + 2N, L) the per-token projections of
each sequence (x_proj, in raster order), ``index`` (B or 1, K, L) permutations. Nothing of (B, K, D, L) is written:
the gather is the kernels' loads and the merge their stores.

The steps go in chunks of ``BL``, one program per (channel block of ``BD``, sequence, chunk, batch element), so no
program walks a whole sequence. Inside a chunk the recurrence is an associative scan over the affine maps
h -> a h + b; across chunks, three passes (state passing):

1. ``_chunk_summary``: each chunk's composed map, (product of a, state at its end from h = 0), (B, K, D, N, chunks);
2. ``_carry``: the states entering each chunk, one short sequential loop over the chunks per (b, k, d, n) row;
3. ``_cross_scan_fwd``: each chunk again from its entering state, its outputs added onto ``out`` with atomics.

The backward runs the same three passes on the adjoint recurrence ``G_i = C_i dy_i + a_{i+1} G_{i+1}`` in reverse
order (a reverse scan; a_{i+1} recomputed from the next step's inputs), from the forward's entering states. The
gradients of the per-token projections (sums over channels) and of x (sums over the sequences) are added with atomics,
as the CUDA scan adds dB and dC; those of the per-channel parameters are per-(batch, chunk) partial sums reduced on the
host.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import round_to

NUM_WARPS = 4
BLOCK_D = 16  # channels per program (tl.dot's smallest tile side)
CARRY_BLOCK = 128  # rows per program of the carry pass


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
def _program(n_d, n_state, n_chunks, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr, BL: tl.constexpr):
    """The program's batch element (grid axis 2), sequence and chunk (axis 1), channels (axis 0) with their mask, the
    state, rank and step offsets, and the chunk's steps."""
    k = tl.program_id(1) // n_chunks
    c = tl.program_id(1) % n_chunks
    offs_d = tl.program_id(0) * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, NP)
    offs_l = tl.arange(0, BL)
    return (tl.program_id(2).to(tl.int64), k, c, offs_d, offs_d < n_d, offs_n, offs_n < n_state, tl.arange(0, RP),
            offs_l, c * BL + offs_l)


@triton.jit
def _column(t, offs_l, j):
    """Column j of a (BD, NP, BL) tile."""
    return tl.sum(tl.where(offs_l[None, None, :] == j, t, 0.), 2)


@triton.jit
def _setup(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, n_d, length, n_k, n_rank, n_state, index_batch,
           n_chunks, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr, BL: tl.constexpr):
    """Everything a chunk program starts from: its place, its sequence's parameters and base pointers, and the offset
    of its (b, k, d, n, c) entries in the per-chunk buffers (B, K, D, N, chunks)."""
    b, k, c, offs_d, mask_d, offs_n, mask_n, offs_r, offs_l, offs_i = _program(n_d, n_state, n_chunks, BD, NP, RP, BL)
    kd, w, bias, A, ds = _sequence_params(w_ptr, bias_ptr, a_ptr, ds_ptr, k, offs_d, mask_d, offs_n, mask_n, offs_r,
                                          n_d, n_rank, n_state)
    n_dbl = n_rank + 2 * n_state
    dbl_off = (b * n_k + k) * n_dbl * length
    idx_row = index_ptr + b * index_batch + k * length
    chunk_off = ((b * n_k * n_d + kd[:, None]) * n_state + offs_n[None, :]) * n_chunks + c
    return (b, k, c, offs_d, mask_d, offs_n, mask_n, offs_r, offs_l, offs_i, kd, w, bias, A, ds, dbl_off, idx_row,
            chunk_off, mask_d[:, None] & mask_n[None, :])


@triton.jit
def _forward_chunk(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, n_d, length, n_k, n_rank, n_state,
                   index_batch, n_chunks, LOW: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
                   BL: tl.constexpr):
    """A chunk program's forward from h = 0: what it writes needs, and the scan (products of a, states)."""
    (b, _k, _c, offs_d, mask_d, offs_n, mask_n, offs_r, offs_l, offs_i, _kd, w, bias, A, ds, dbl_off, idx_row,
     chunk_off, mask_dn) = _setup(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, n_d, length, n_k, n_rank,
                                  n_state, index_batch, n_chunks, BD, NP, RP, BL)
    _mask_l, pos, mask, u, _raw, _delta, _dts, _Bv, Cv, a, bx = _chunk(
        x_ptr + b * n_d * length, dbl_ptr + dbl_off, idx_row, w, bias, A, offs_d, mask_d, offs_n, mask_n, offs_r,
        offs_i, n_rank, n_state, length, LOW, x_ptr.dtype.element_ty)
    pa, hs = tl.associative_scan((a, bx), 2, _affine)
    return b, offs_d, offs_l, ds, chunk_off, mask_dn, pos, mask, u, Cv, pa, hs


@triton.jit
def _chunk_summary(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, decay_ptr, last_ptr,
                   n_d, length, n_k, n_rank, n_state, index_batch, n_chunks,
                   LOW: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr, BL: tl.constexpr):
    """Pass 1 of the forward: the product of the chunk's decays and its end state from h = 0."""
    _b, _offs_d, offs_l, _ds, chunk_off, mask_dn, _pos, _mask, _u, _Cv, pa, hs = _forward_chunk(
        x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, n_d, length, n_k, n_rank, n_state, index_batch,
        n_chunks, LOW, BD, NP, RP, BL)
    tl.store(decay_ptr + chunk_off, _column(pa, offs_l, BL - 1), mask=mask_dn)
    tl.store(last_ptr + chunk_off, _column(hs, offs_l, BL - 1), mask=mask_dn)


@triton.jit
def _carry(decay_ptr, local_ptr, out_ptr, n_rows, n_chunks, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: along the chunks of each of the ``n_rows`` (b, k, d, n) rows, ``out[c]`` = the carry entering
    chunk c, with ``carry <- decay[c] * carry + local[c]`` after it (from the last chunk when REVERSE)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n_rows
    carry = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, n_chunks):
        c = n_chunks - 1 - j if REVERSE else j
        offs = rows * n_chunks + c
        tl.store(out_ptr + offs, carry, mask=mask)
        carry = tl.load(decay_ptr + offs, mask=mask, other=0.) * carry + tl.load(local_ptr + offs, mask=mask, other=0.)


@triton.jit
def _cross_scan_fwd(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, state_ptr, out_ptr,
                    n_d, length, n_k, n_rank, n_state, index_batch, n_chunks,
                    LOW: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr, BL: tl.constexpr):
    """Pass 3 of the forward: the chunk's states from its entering state, its outputs added onto ``out``."""
    b, offs_d, _offs_l, ds, chunk_off, mask_dn, pos, mask, u, Cv, pa, hs = _forward_chunk(
        x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, n_d, length, n_k, n_rank, n_state, index_batch,
        n_chunks, LOW, BD, NP, RP, BL)
    hs = hs + pa * tl.load(state_ptr + chunk_off, mask=mask_dn, other=0.)[:, :, None]
    y = tl.sum(hs * Cv[None, :, :], 1) + ds[:, None] * u
    tl.atomic_add(out_ptr + b * n_d * length + offs_d[:, None] * length + pos[None, :], y, mask=mask)


@triton.jit
def _adjoint_chunk(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, gout_ptr,
                   n_d, length, n_k, n_rank, n_state, index_batch, n_chunks,
                   LOW: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr, BL: tl.constexpr):
    """A chunk of the adjoint recurrence from G = 0 after its end: the forward chunk, dy, the next steps' decays and
    the reverse scan (pc: products of those decays from each step to the chunk's end)."""
    (b, k, c, offs_d, mask_d, offs_n, mask_n, offs_r, offs_l, offs_i, kd, w, bias, A, ds, dbl_off, idx_row, chunk_off,
     mask_dn) = _setup(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, n_d, length, n_k, n_rank, n_state,
                       index_batch, n_chunks, BD, NP, RP, BL)
    dtype = x_ptr.dtype.element_ty
    dbl = dbl_ptr + dbl_off
    mask_l, pos, mask, u, raw, delta, dts, Bv, Cv, a, bx = _chunk(
        x_ptr + b * n_d * length, dbl, idx_row, w, bias, A, offs_d, mask_d, offs_n, mask_n, offs_r, offs_i, n_rank,
        n_state, length, LOW, dtype)
    mask_next = offs_i + 1 < length  # a_{i+1}; 0 after the last step
    pos_next = tl.load(idx_row + offs_i + 1, mask=mask_next, other=0)
    _raw_n, delta_next, _dts_n = _step_sizes(dbl, w, bias, pos_next, mask_next, offs_r, n_rank, length, LOW, dtype)
    a_next = tl.where(mask_next[None, None, :], tl.exp(delta_next[:, None, :] * A[:, :, None]), 0.)
    gy = tl.load(gout_ptr + b * n_d * length + offs_d[:, None] * length + pos[None, :], mask=mask, other=0.)
    pc, G = tl.associative_scan((a_next, gy[:, None, :] * Cv[None, :, :]), 2, _affine, reverse=True)
    return (b, k, c, offs_d, mask_d, offs_n, mask_n, offs_r, offs_l, kd, A, ds, w, dbl_off, chunk_off, mask_dn,
            mask_l, pos, mask, u, raw, delta, dts, Bv, a, bx, gy, pc, G)


@triton.jit
def _adjoint_summary(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, gout_ptr, decay_ptr, first_ptr,
                     n_d, length, n_k, n_rank, n_state, index_batch, n_chunks,
                     LOW: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr, BL: tl.constexpr):
    """Pass 1 of the backward: the product of the chunk's next-step decays and G at its first step from G = 0."""
    (_b, _k, _c, _offs_d, _mask_d, _offs_n, _mask_n, _offs_r, offs_l, _kd, _A, _ds, _w, _dbl_off, chunk_off, mask_dn,
     _mask_l, _pos, _mask, _u, _raw, _delta, _dts, _Bv, _a, _bx, _gy, pc, G) = _adjoint_chunk(
         x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, gout_ptr, n_d, length, n_k, n_rank, n_state,
         index_batch, n_chunks, LOW, BD, NP, RP, BL)
    tl.store(decay_ptr + chunk_off, _column(pc, offs_l, 0), mask=mask_dn)
    tl.store(first_ptr + chunk_off, _column(G, offs_l, 0), mask=mask_dn)


@triton.jit
def _cross_scan_bwd(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, gout_ptr, state_ptr, carry_ptr,
                    dx_ptr, ddbl_ptr, dw_ptr, dbias_ptr, da_ptr, dds_ptr,
                    n_d, length, n_k, n_rank, n_state, index_batch, n_chunks,
                    LOW: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr, BL: tl.constexpr):
    """Pass 3 of the backward: the chunk's states and adjoints from the carried ones, and every gradient."""
    (b, k, c, offs_d, mask_d, offs_n, mask_n, offs_r, offs_l, kd, A, ds, w, dbl_off, chunk_off, mask_dn,
     mask_l, pos, mask, u, raw, delta, dts, Bv, a, bx, gy, pc, G) = _adjoint_chunk(
         x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, gout_ptr, n_d, length, n_k, n_rank, n_state,
         index_batch, n_chunks, LOW, BD, NP, RP, BL)
    dtype = x_ptr.dtype.element_ty
    pa, hs = tl.associative_scan((a, bx), 2, _affine)
    hs = hs + pa * tl.load(state_ptr + chunk_off, mask=mask_dn, other=0.)[:, :, None]
    G = G + pc * tl.load(carry_ptr + chunk_off, mask=mask_dn, other=0.)[:, :, None]
    glog = G * (hs - bx)  # d/d(delta * A): G_i * a_i * h_{i-1}
    gb = tl.sum(G * Bv[None, :, :], 1)
    ddelta = tl.sum(glog * A[:, :, None], 1) + gb * u
    tl.atomic_add(dx_ptr + b * n_d * length + offs_d[:, None] * length + pos[None, :], gb * delta + gy * ds[:, None],
                  mask=mask)
    draw = tl.where(mask, ddelta * tl.where(raw <= 20., tl.sigmoid(raw), 1.), 0.)
    draw = round_to(draw, LOW, dtype)
    # sums over channels: this program's share, added to the other channel blocks' shares
    ddbl = ddbl_ptr + dbl_off
    mask_r = offs_r < n_rank
    mask_nl = mask_n[:, None] & mask_l[None, :]
    tl.atomic_add(ddbl + (n_rank + offs_n[:, None]) * length + pos[None, :], tl.sum(G * (delta * u)[:, None, :], 0),
                  mask=mask_nl)
    tl.atomic_add(ddbl + (n_rank + n_state + offs_n[:, None]) * length + pos[None, :], tl.sum(hs * gy[:, None, :], 0),
                  mask=mask_nl)
    tl.atomic_add(ddbl + offs_r[:, None] * length + pos[None, :], _dot(tl.trans(w), draw, LOW, dtype),
                  mask=mask_r[:, None] & mask_l[None, :])
    # per-channel parameters: partial sums of this (batch element, chunk), laid out (B, K, chunks, D, ...)
    part = ((b * n_k + k) * n_chunks + c) * n_d + offs_d
    tl.store(dw_ptr + part[:, None] * n_rank + offs_r[None, :], _dot(draw, tl.trans(dts), LOW, dtype),
             mask=mask_d[:, None] & mask_r[None, :])
    tl.store(da_ptr + part[:, None] * n_state + offs_n[None, :], tl.sum(glog * delta[:, None, :], 2), mask=mask_dn)
    tl.store(dbias_ptr + part, tl.sum(draw, 1), mask=mask_d)
    tl.store(dds_ptr + part, tl.sum(gy * u, 1), mask=mask_d)


def _chunks(n_state: int, length: int):
    """(NP, steps of a full chunk, chunks): about 1024 elements per (BD, NP, steps) tile, 16 to 64 steps.

    The one place the chunk count is computed (the launches and the custom ops' fake implementations): N is made a
    plain int (the kernels' NP is a constexpr; a fake implementation's symbolic N is specialized), L may stay symbolic.
    """
    n_p = triton.next_power_of_2(int(n_state))
    steps = max(16, min(1024 // (BLOCK_D * n_p), 64))
    return n_p, steps, triton.cdiv(length, steps)


def _tiles(n_d: int, n_rank: int, n_state: int, length: int):
    """(channel blocks, NP, RP, BL, chunks): tl.dot needs 16+ per side; BL is a full chunk's steps, or the sequences'
    length rounded up to a power of 2 (at least 16) when they are shorter (one chunk)."""
    n_p, steps, n_chunks = _chunks(n_state, length)
    r_p = max(16, triton.next_power_of_2(n_rank))
    block_l = max(16, min(triton.next_power_of_2(length), steps))
    return triton.cdiv(n_d, BLOCK_D), n_p, r_p, block_l, n_chunks


def state_shape(x: Tensor, index: Tensor, A: Tensor):
    """(B, K, D, N, chunks): the shape of the states :func:`forward` returns (the states entering each chunk)."""
    b, n_d, length = x.shape
    return b, index.shape[1], n_d, A.shape[1], _chunks(A.shape[1], length)[2]


def _check(x: Tensor, dbl: Tensor, index: Tensor):
    if not (x.is_contiguous() and dbl.is_contiguous() and index.is_contiguous()):
        raise ValueError('cross_selective_scan kernel: x, the projections and the index must be contiguous.')


def _carried(kernel, args, grid, shape, n_chunks, reverse, meta):
    """Passes 1 and 2: the per-chunk summaries of ``kernel``, then the carries entering each chunk (zero when there is
    one chunk: nothing to carry)."""
    f32 = dict(dtype=torch.float32, device=args[0].device)
    if n_chunks == 1:
        return torch.zeros(shape, **f32)
    decay, local = torch.empty(shape, **f32), torch.empty(shape, **f32)
    kernel[grid](*args[:-7], decay, local, *args[-7:], **meta)
    carry = torch.empty(shape, **f32)
    rows = decay.numel() // n_chunks
    _carry[(triton.cdiv(rows, CARRY_BLOCK), )](decay, local, carry, rows, n_chunks, REVERSE=reverse, BLOCK=CARRY_BLOCK)
    return carry


def _launch(x: Tensor, dbl: Tensor, index: Tensor, A: Tensor):
    """The sizes, the grid (channel blocks, K x chunks, B), the kernels' size arguments and their constexprs."""
    _check(x, dbl, index)
    b, n_d, length = x.shape
    n_k, n_state = index.shape[1], A.shape[1]
    n_rank = dbl.shape[2] - 2 * n_state
    n_dblk, n_p, r_p, block_l, n_chunks = _tiles(n_d, n_rank, n_state, length)
    sizes = (n_d, length, n_k, n_rank, n_state, 0 if index.shape[0] == 1 else n_k * length, n_chunks)
    meta = dict(LOW=x.dtype in (torch.float16, torch.bfloat16), BD=BLOCK_D, NP=n_p, RP=r_p, BL=block_l,
                num_warps=NUM_WARPS)
    return b, n_d, length, n_k, n_rank, n_state, n_chunks, (n_dblk, n_k * n_chunks, b), sizes, meta


def forward(x: Tensor, dbl: Tensor, index: Tensor, dt_weight: Tensor, dt_bias: Tensor, A: Tensor, Ds: Tensor):
    """x (B, D, L); dbl (B, K, R + 2N, L) of x's dtype; index (B or 1, K, L) int64 permutations; dt_weight (K, D, R)
    of x's dtype; dt_bias, Ds (K * D,) and A (K * D, N) float32 -> out (B, D, L) float32 and the states entering each
    chunk (B, K, D, N, chunks)."""
    b, n_d, length, n_k, n_rank, n_state, n_chunks, grid, sizes, meta = _launch(x, dbl, index, A)
    inputs = (x, dbl, index, dt_weight, dt_bias, A, Ds)
    states = _carried(_chunk_summary, inputs + sizes, grid, state_shape(x, index, A), n_chunks, False, meta)
    out = torch.zeros(b, n_d, length, dtype=torch.float32, device=x.device)
    _cross_scan_fwd[grid](*inputs, states, out, *sizes, **meta)
    return out, states


def backward(gout: Tensor, x: Tensor, dbl: Tensor, index: Tensor, dt_weight: Tensor, dt_bias: Tensor, A: Tensor,
             Ds: Tensor, states: Tensor):
    """Gradients of :func:`forward`'s output ``gout`` (B, D, L): dx (B, D, L), d dbl (B, K, R + 2N, L) (float32),
    d dt_weight (K, D, R), d dt_bias (K * D,), dA (K * D, N), dDs (K * D,) (float32)."""
    b, n_d, length, n_k, n_rank, n_state, n_chunks, grid, sizes, meta = _launch(x, dbl, index, A)
    inputs = (x, dbl, index, dt_weight, dt_bias, A, Ds, gout.float().contiguous())
    carry = _carried(_adjoint_summary, inputs + sizes, grid, states.shape, n_chunks, True, meta)
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.zeros(b, n_d, length, **f32)
    ddbl = torch.zeros(dbl.shape, **f32)
    dw = torch.empty(b, n_k, n_chunks, n_d, n_rank, **f32)
    da = torch.empty(b, n_k, n_chunks, n_d, n_state, **f32)
    dbias = torch.empty(b, n_k, n_chunks, n_d, **f32)
    dds = torch.empty(b, n_k, n_chunks, n_d, **f32)
    _cross_scan_bwd[grid](*inputs, states, carry, dx, ddbl, dw, dbias, da, dds, *sizes, **meta)

    def total(part):
        return part.sum((0, 2)).reshape(n_k * n_d, *part.shape[4:])

    return dx, ddbl, total(dw).view(n_k, n_d, n_rank), total(dbias), total(da), total(dds)
