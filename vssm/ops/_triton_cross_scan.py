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

The steps go in tiles of ``BL``; inside a tile the recurrence is an associative scan over the affine maps
h -> a h + b. One program per (channel block of ``BD``, sequence, segment, batch element) walks the tiles of its segment
in order, the state carried from tile to tile in registers. A sequence is one segment when the batch, sequences and
channel blocks give the GPU enough programs (``PROGRAMS_PER_SM`` per multiprocessor); otherwise (detection's batch of
two, say) it is cut into segments joined by state passing, two more passes:

1. ``_segment_summary``: each segment's composed map, (product of a, state at its end from h = 0);
2. ``_carry``: the states entering each segment, one short sequential loop over the segments per (b, k, d, n) row;
3. ``_cross_scan_fwd``: each segment from its entering state; outputs added onto ``out`` with atomics, and the state
   entering every tile saved (B, K, D, N, tiles) for the backward.

The backward walks the tiles in reverse with the adjoint ``G_i = C_i dy_i + a_{i+1} G_{i+1}``. Its reverse scan keeps
the decay of the step after each one without shifting the tile: a stretch of steps i..j is (a_i, a_{i+1}...a_j, G_i
from G_{j+1} = 0), and two stretches compose as ``_adjoint`` says; what enters a tile from the later ones is
a_{first} G_{first} of the next tile. Segments are joined as in the forward (summary, reverse carry). The gradients
of the per-token projections (sums over channels) and of x (sums over the sequences) are added with atomics, as the
CUDA scan adds dB and dC; those of the per-channel parameters are per-(batch, segment) partial sums reduced on the
host.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import round_to

NUM_WARPS = 8
BLOCK_D = 16  # channels per program (tl.dot's smallest tile side)
TILE_ELEMENTS = 1024  # a (BD, NP, BL) tile: BL = TILE_ELEMENTS / (BD * NP), 16 to 128 steps
PROGRAMS_PER_SM = 4  # fewer programs than this per multiprocessor: sequences cut into segments
CARRY_BLOCK = 128  # rows per program of the carry pass


@triton.jit
def _affine(a1, b1, a2, b2):
    """Composition of two steps h -> a*h + b, the first (a1, b1) then (a2, b2); for a reverse scan, the accumulated
    suffix first: G -> b2 + a2 * (b1 + a1 * G), the same formula."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _adjoint(f1, r1, g1, f2, r2, g2):
    """Composition of two stretches of the adjoint recurrence G_i = c_i + a_{i+1} G_{i+1} in a reverse scan: the later
    stretch (1) accumulated first, then the earlier one (2). A stretch i..j is (f, r, g) = (a_i, a_{i+1}...a_j, G_i
    with G_{j+1} = 0); a single step is (a_i, 1, c_i). Then G_i = g + r * a_{j+1} G_{j+1} for what comes after."""
    return f2, r2 * f1 * r1, g2 + r2 * f1 * g1


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
def _step_inputs(dbl, pos, mask_l, offs_r, n_rank, length):
    """The tile's low-rank step inputs (RP, BL), float32 (the backward's dot operands)."""
    return tl.load(dbl + offs_r[:, None] * length + pos[None, :], mask=(offs_r[:, None] < n_rank) & mask_l[None, :],
                   other=0.).to(tl.float32)


@triton.jit
def _step_sizes(dbl, w, w_rows, offs_r, mask_d, bias, pos, mask_l, length, LOW: tl.constexpr, dtype: tl.constexpr,
                R: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr):
    """(raw, delta) of a tile: raw = w @ dts + bias. Below rank 16 the product is R outer-product updates in float32
    (one row of the step inputs at ``pos`` and one column of ``w_rows``, the channels' dt weights, at a time: no dot
    operand layouts, no padded tile of the step inputs); from rank 16 a ``tl.dot`` of the (BD, RP) weights ``w``."""
    if R >= 16:
        acc = _dot(w, _step_inputs(dbl, pos, mask_l, offs_r, R, length), LOW, dtype)
    else:
        acc = tl.zeros([BD, BL], dtype=tl.float32)
        for r in tl.static_range(R):
            dts_r = tl.load(dbl + r * length + pos, mask=mask_l, other=0.).to(tl.float32)
            acc += tl.load(w_rows + r, mask=mask_d, other=0.).to(tl.float32)[:, None] * dts_r[None, :]
    raw = round_to(acc, LOW, dtype) + bias[:, None]
    return raw, _softplus(raw)


@triton.jit
def _tile_inputs(x_row, dbl, idx_row, w, w_rows, bias, A, offs_d, mask_d, offs_n, mask_n, offs_r, offs_i, n_rank,
                 n_state, length, LOW: tl.constexpr, dtype: tl.constexpr, R: tl.constexpr, BD: tl.constexpr,
                 BL: tl.constexpr):
    """One tile's inputs and decays: positions, u, raw, delta, B, C (NP, BL), a and delta * u * B (BD, NP, BL)
    (a = 1 and delta * u * B = 0 past the end, so the state stays put there)."""
    mask_l = offs_i < length
    pos = tl.load(idx_row + offs_i, mask=mask_l, other=0)
    mask = mask_d[:, None] & mask_l[None, :]
    u = tl.load(x_row + offs_d[:, None] * length + pos[None, :], mask=mask, other=0.).to(tl.float32)
    raw, delta = _step_sizes(dbl, w, w_rows, offs_r, mask_d, bias, pos, mask_l, length, LOW, dtype, R, BD, BL)
    mask_nl = mask_n[:, None] & mask_l[None, :]
    Bv = tl.load(dbl + (n_rank + offs_n[:, None]) * length + pos[None, :], mask=mask_nl, other=0.).to(tl.float32)
    Cv = tl.load(dbl + (n_rank + n_state + offs_n[:, None]) * length + pos[None, :], mask=mask_nl,
                 other=0.).to(tl.float32)
    live = mask_l[None, None, :]
    a = tl.where(live, tl.exp(delta[:, None, :] * A[:, :, None]), 1.)
    bx = tl.where(live, (delta * u)[:, None, :] * Bv[None, :, :], 0.)
    return mask_l, pos, mask, u, raw, delta, Bv, Cv, a, bx


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
def _column(t, offs_l, j):
    """Column j of a (BD, NP, BL) tile."""
    return tl.sum(tl.where(offs_l[None, None, :] == j, t, 0.), 2)


@triton.jit
def _setup(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, n_d, length, n_k, n_rank, n_state, index_batch,
           n_tiles, tiles_per_seg, n_seg, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr):
    """Everything a program starts from: its batch element (grid axis 2), sequence and segment (axis 1), channels
    (axis 0), its tiles [first, end), its sequence's parameters (the dt weights as a (BD, RP) tile and as row
    pointers) and base pointers, and the offsets of its
    (b, k, d, n) rows in the per-tile (B, K, D, N, tiles) and per-segment (B, K, D, N, segments) buffers."""
    b = tl.program_id(2).to(tl.int64)
    k = tl.program_id(1) // n_seg
    seg = tl.program_id(1) % n_seg
    offs_d = tl.program_id(0) * BD + tl.arange(0, BD)
    mask_d = offs_d < n_d
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < n_state
    offs_r = tl.arange(0, RP)
    kd, w, bias, A, ds = _sequence_params(w_ptr, bias_ptr, a_ptr, ds_ptr, k, offs_d, mask_d, offs_n, mask_n, offs_r,
                                          n_d, n_rank, n_state)
    first = seg * tiles_per_seg
    end = tl.minimum(first + tiles_per_seg, n_tiles)
    dbl_off = (b * n_k + k) * (n_rank + 2 * n_state) * length
    idx_row = index_ptr + b * index_batch + k * length
    rows = (b * n_k * n_d + kd[:, None]) * n_state + offs_n[None, :]
    return (b, k, seg, first, end, offs_d, mask_d, offs_n, mask_n, offs_r, kd, w, w_ptr + kd * n_rank, bias, A, ds,
            dbl_off, idx_row, rows, mask_d[:, None] & mask_n[None, :])


@triton.jit
def _forward_tile(x_ptr, dbl_ptr, idx_row, b, dbl_off, t, w, w_rows, bias, A, offs_d, mask_d, offs_n, mask_n,
                  offs_r, n_d, n_rank, n_state, length, LOW: tl.constexpr, R: tl.constexpr, BD: tl.constexpr,
                  BL: tl.constexpr):
    """Tile t of a sequence from h = 0: its inputs and the scan (products of a, states)."""
    offs_l = tl.arange(0, BL)
    mask_l, pos, mask, u, raw, delta, Bv, Cv, a, bx = _tile_inputs(
        x_ptr + b * n_d * length, dbl_ptr + dbl_off, idx_row, w, w_rows, bias, A, offs_d, mask_d, offs_n, mask_n,
        offs_r, t * BL + offs_l, n_rank, n_state, length, LOW, x_ptr.dtype.element_ty, R, BD, BL)
    pa, hs = tl.associative_scan((a, bx), 2, _affine)
    return offs_l, mask_l, pos, mask, u, raw, delta, Bv, Cv, a, bx, pa, hs


@triton.jit
def _segment_summary(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, decay_ptr, last_ptr,
                     n_d, length, n_k, n_rank, n_state, index_batch, n_tiles, tiles_per_seg, n_seg,
                     LOW: tl.constexpr, R: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
                     BL: tl.constexpr):
    """Pass 1 of the forward: the product of the segment's decays and its end state from h = 0."""
    (b, _k, seg, first, end, offs_d, mask_d, offs_n, mask_n, offs_r, _kd, w, w_rows, bias, A, _ds, dbl_off,
     idx_row, rows, mask_dn) = _setup(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, n_d, length, n_k,
                                      n_rank, n_state, index_batch, n_tiles, tiles_per_seg, n_seg, BD, NP, RP)
    h = tl.zeros([BD, NP], dtype=tl.float32)
    decay = tl.full([BD, NP], 1., dtype=tl.float32)
    for t in range(first, end):
        offs_l, _, _, _, _, _, _, _, _, _, _, pa, hs = _forward_tile(
            x_ptr, dbl_ptr, idx_row, b, dbl_off, t, w, w_rows, bias, A, offs_d, mask_d, offs_n, mask_n, offs_r, n_d,
            n_rank, n_state, length, LOW, R, BD, BL)
        pa_last = _column(pa, offs_l, BL - 1)
        h = pa_last * h + _column(hs, offs_l, BL - 1)
        decay = decay * pa_last
    tl.store(decay_ptr + rows * n_seg + seg, decay, mask=mask_dn)
    tl.store(last_ptr + rows * n_seg + seg, h, mask=mask_dn)


@triton.jit
def _carry(decay_ptr, local_ptr, out_ptr, n_rows, n_seg, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2: along the segments of each of the ``n_rows`` (b, k, d, n) rows, ``out[s]`` = the carry entering
    segment s, with ``carry <- decay[s] * carry + local[s]`` after it (from the last segment when REVERSE)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n_rows
    carry = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, n_seg):
        s = n_seg - 1 - j if REVERSE else j
        offs = rows * n_seg + s
        tl.store(out_ptr + offs, carry, mask=mask)
        carry = tl.load(decay_ptr + offs, mask=mask, other=0.) * carry + tl.load(local_ptr + offs, mask=mask, other=0.)


@triton.jit
def _cross_scan_fwd(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, carry_ptr, state_ptr, out_ptr,
                    n_d, length, n_k, n_rank, n_state, index_batch, n_tiles, tiles_per_seg, n_seg,
                    LOW: tl.constexpr, R: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
                    BL: tl.constexpr):
    """Pass 3 of the forward: the segment's tiles from its entering state; outputs added onto ``out``, the state
    entering each tile saved."""
    (b, _k, seg, first, end, offs_d, mask_d, offs_n, mask_n, offs_r, _kd, w, w_rows, bias, A, ds, dbl_off,
     idx_row, rows, mask_dn) = _setup(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, n_d, length, n_k,
                                      n_rank, n_state, index_batch, n_tiles, tiles_per_seg, n_seg, BD, NP, RP)
    h = tl.load(carry_ptr + rows * n_seg + seg, mask=mask_dn, other=0.)
    out_row = out_ptr + b * n_d * length + offs_d[:, None] * length
    for t in range(first, end):
        offs_l, _, pos, mask, u, _, _, _, Cv, _, _, pa, hs = _forward_tile(
            x_ptr, dbl_ptr, idx_row, b, dbl_off, t, w, w_rows, bias, A, offs_d, mask_d, offs_n, mask_n, offs_r, n_d,
            n_rank, n_state, length, LOW, R, BD, BL)
        tl.store(state_ptr + rows * n_tiles + t, h, mask=mask_dn)
        hs = hs + pa * h[:, :, None]
        y = tl.sum(hs * Cv[None, :, :], 1) + ds[:, None] * u
        tl.atomic_add(out_row + pos[None, :], y, mask=mask)
        h = _column(hs, offs_l, BL - 1)


@triton.jit
def _adjoint_tile(x_ptr, dbl_ptr, idx_row, gout_ptr, b, dbl_off, t, w, w_rows, bias, A, offs_d, mask_d, offs_n,
                  mask_n, offs_r, n_d, n_rank, n_state, length, LOW: tl.constexpr, R: tl.constexpr, BD: tl.constexpr,
                  BL: tl.constexpr):
    """Tile t of the adjoint recurrence with G = 0 after it: the forward tile's inputs, dy, and the reverse scan
    (``r``: the products of the decays after each step to the tile's end; ``G``: the local adjoints)."""
    offs_l, mask_l, pos, mask, u, raw, delta, Bv, Cv, a, bx, pa, hs = _forward_tile(
        x_ptr, dbl_ptr, idx_row, b, dbl_off, t, w, w_rows, bias, A, offs_d, mask_d, offs_n, mask_n, offs_r, n_d,
        n_rank, n_state, length, LOW, R, BD, BL)
    gy = tl.load(gout_ptr + b * n_d * length + offs_d[:, None] * length + pos[None, :], mask=mask, other=0.)
    _, r, G = tl.associative_scan((a, tl.full(a.shape, 1., tl.float32), gy[:, None, :] * Cv[None, :, :]), 2,
                                  _adjoint, reverse=True)
    return offs_l, mask_l, pos, mask, u, raw, delta, Bv, a, bx, pa, hs, gy, r, G


@triton.jit
def _adjoint_summary(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, gout_ptr, decay_ptr, local_ptr,
                     n_d, length, n_k, n_rank, n_state, index_batch, n_tiles, tiles_per_seg, n_seg,
                     LOW: tl.constexpr, R: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
                     BL: tl.constexpr):
    """Pass 1 of the backward: the product of the segment's decays and a_first G_first, what it passes to the segment
    before it, from G = 0 after its end."""
    (b, _k, seg, first, end, offs_d, mask_d, offs_n, mask_n, offs_r, _kd, w, w_rows, bias, A, _ds, dbl_off,
     idx_row, rows, mask_dn) = _setup(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, n_d, length, n_k,
                                      n_rank, n_state, index_batch, n_tiles, tiles_per_seg, n_seg, BD, NP, RP)
    passed = tl.zeros([BD, NP], dtype=tl.float32)  # a_{j+1} G_{j+1} entering the tile's last step j from later tiles
    decay = tl.full([BD, NP], 1., dtype=tl.float32)
    for j in range(0, end - first):
        offs_l, _, _, _, _, _, _, _, a, _, _, _, _, r, G = _adjoint_tile(
            x_ptr, dbl_ptr, idx_row, gout_ptr, b, dbl_off, end - 1 - j, w, w_rows, bias, A, offs_d, mask_d, offs_n,
            mask_n, offs_r, n_d, n_rank, n_state, length, LOW, R, BD, BL)
        a_first, r_first = _column(a, offs_l, 0), _column(r, offs_l, 0)
        passed = a_first * (_column(G, offs_l, 0) + r_first * passed)
        decay = decay * a_first * r_first
    tl.store(decay_ptr + rows * n_seg + seg, decay, mask=mask_dn)
    tl.store(local_ptr + rows * n_seg + seg, passed, mask=mask_dn)


@triton.jit
def _cross_scan_bwd(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, gout_ptr, state_ptr, carry_ptr,
                    dx_ptr, ddbl_ptr, dw_ptr, dbias_ptr, da_ptr, dds_ptr,
                    n_d, length, n_k, n_rank, n_state, index_batch, n_tiles, tiles_per_seg, n_seg,
                    LOW: tl.constexpr, R: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
                    BL: tl.constexpr):
    """Pass 3 of the backward: the segment's tiles in reverse, states from the saved ones and adjoints from what the
    later tiles pass on; every gradient."""
    (b, k, seg, first, end, offs_d, mask_d, offs_n, mask_n, offs_r, _kd, w, w_rows, bias, A, ds, dbl_off,
     idx_row, rows, mask_dn) = _setup(x_ptr, dbl_ptr, index_ptr, w_ptr, bias_ptr, a_ptr, ds_ptr, n_d, length, n_k,
                                      n_rank, n_state, index_batch, n_tiles, tiles_per_seg, n_seg, BD, NP, RP)
    dtype = x_ptr.dtype.element_ty
    ddbl = ddbl_ptr + dbl_off
    dx_row = dx_ptr + b * n_d * length + offs_d[:, None] * length
    mask_r = offs_r < n_rank
    passed = tl.load(carry_ptr + rows * n_seg + seg, mask=mask_dn, other=0.)
    dw = tl.zeros([BD, RP], dtype=tl.float32)
    da = tl.zeros([BD, NP], dtype=tl.float32)
    dbias = tl.zeros([BD], dtype=tl.float32)
    dds = tl.zeros([BD], dtype=tl.float32)
    for j in range(0, end - first):
        t = end - 1 - j
        offs_l, mask_l, pos, mask, u, raw, delta, Bv, a, bx, pa, hs, gy, r, G = _adjoint_tile(
            x_ptr, dbl_ptr, idx_row, gout_ptr, b, dbl_off, t, w, w_rows, bias, A, offs_d, mask_d, offs_n, mask_n,
            offs_r, n_d, n_rank, n_state, length, LOW, R, BD, BL)
        hs = hs + pa * tl.load(state_ptr + rows * n_tiles + t, mask=mask_dn, other=0.)[:, :, None]
        G = G + r * passed[:, :, None]
        passed = _column(a, offs_l, 0) * _column(G, offs_l, 0)
        glog = G * (hs - bx)  # d/d(delta * A): G_i * a_i * h_{i-1}
        gb = tl.sum(G * Bv[None, :, :], 1)
        ddelta = tl.sum(glog * A[:, :, None], 1) + gb * u
        tl.atomic_add(dx_row + pos[None, :], gb * delta + gy * ds[:, None], mask=mask)
        draw = tl.where(mask, ddelta * tl.where(raw <= 20., tl.sigmoid(raw), 1.), 0.)
        draw = round_to(draw, LOW, dtype)
        # sums over channels: this program's share, added to the other channel blocks' shares
        mask_nl = mask_n[:, None] & mask_l[None, :]
        tl.atomic_add(ddbl + (n_rank + offs_n[:, None]) * length + pos[None, :],
                      tl.sum(G * (delta * u)[:, None, :], 0), mask=mask_nl)
        tl.atomic_add(ddbl + (n_rank + n_state + offs_n[:, None]) * length + pos[None, :],
                      tl.sum(hs * gy[:, None, :], 0), mask=mask_nl)
        tl.atomic_add(ddbl + offs_r[:, None] * length + pos[None, :], _dot(tl.trans(w), draw, LOW, dtype),
                      mask=mask_r[:, None] & mask_l[None, :])
        dts = _step_inputs(dbl_ptr + dbl_off, pos, mask_l, offs_r, n_rank, length)
        dw += _dot(draw, tl.trans(dts), LOW, dtype)
        da += tl.sum(glog * delta[:, None, :], 2)
        dbias += tl.sum(draw, 1)
        dds += tl.sum(gy * u, 1)
    # per-channel parameters: partial sums of this (batch element, segment), laid out (B, K, segments, D, ...)
    part = ((b * n_k + k) * n_seg + seg) * n_d + offs_d
    tl.store(dw_ptr + part[:, None] * n_rank + offs_r[None, :], dw, mask=mask_d[:, None] & mask_r[None, :])
    tl.store(da_ptr + part[:, None] * n_state + offs_n[None, :], da, mask=mask_dn)
    tl.store(dbias_ptr + part, dbias, mask=mask_d)
    tl.store(dds_ptr + part, dds, mask=mask_d)


def _steps(n_state: int, length: int):
    """(NP, steps of a full tile, tiles): about ``TILE_ELEMENTS`` per (BD, NP, steps) tile, 16 to 128 steps.

    The one place the tile count is computed (the launches and the custom ops' fake implementations): N is made a
    plain int (the kernels' NP is a constexpr; a fake implementation's symbolic N is specialized), L may stay symbolic.
    """
    n_p = triton.next_power_of_2(int(n_state))
    steps = max(16, min(TILE_ELEMENTS // (BLOCK_D * n_p), 128))
    return n_p, steps, triton.cdiv(length, steps)


def _tiles(n_d: int, n_rank: int, n_state: int, length: int):
    """(channel blocks, NP, RP, BL, tiles): tl.dot needs 16+ per side; BL is a full tile's steps, or the sequences'
    length rounded up to a power of 2 (at least 16) when they are shorter (one tile)."""
    n_p, steps, n_tiles = _steps(n_state, length)
    r_p = max(16, triton.next_power_of_2(n_rank))
    block_l = max(16, min(triton.next_power_of_2(length), steps))
    return triton.cdiv(n_d, BLOCK_D), n_p, r_p, block_l, n_tiles


def state_shape(x: Tensor, index: Tensor, A: Tensor):
    """(B, K, D, N, tiles): the shape of the states :func:`forward` returns (the states entering each tile)."""
    b, n_d, length = x.shape
    return b, index.shape[1], n_d, A.shape[1], _steps(A.shape[1], length)[2]


_SM_COUNT = {}


def _multiprocessors(device: torch.device) -> int:
    """The device's multiprocessors (1 for CPU tensors: Triton's interpreter)."""
    if device.type != 'cuda':
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _segments(programs: int, n_tiles: int, device: torch.device):
    """(tiles per segment, segments): one segment per sequence when ``programs`` (channel blocks x sequences x batch)
    already fill the GPU, else as many as bring them to ``PROGRAMS_PER_SM`` per multiprocessor."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * _multiprocessors(device), programs)
    per_seg = triton.cdiv(n_tiles, max(1, min(wanted, n_tiles)))
    return per_seg, triton.cdiv(n_tiles, per_seg)


def _check(x: Tensor, dbl: Tensor, index: Tensor):
    if not (x.is_contiguous() and dbl.is_contiguous() and index.is_contiguous()):
        raise ValueError('cross_selective_scan kernel: x, the projections and the index must be contiguous.')


def _carried(kernel, args, grid, shape, n_seg, reverse, meta):
    """Passes 1 and 2: the per-segment summaries of ``kernel``, then the carries entering each segment (zero when
    there is one segment: nothing to carry)."""
    f32 = dict(dtype=torch.float32, device=args[0].device)
    if n_seg == 1:
        return torch.zeros(shape, **f32)
    decay, local = torch.empty(shape, **f32), torch.empty(shape, **f32)
    kernel[grid](*args[:-9], decay, local, *args[-9:], **meta)
    carry = torch.empty(shape, **f32)
    rows = decay.numel() // n_seg
    _carry[(triton.cdiv(rows, CARRY_BLOCK), )](decay, local, carry, rows, n_seg, REVERSE=reverse, BLOCK=CARRY_BLOCK)
    return carry


def _launch(x: Tensor, dbl: Tensor, index: Tensor, A: Tensor):
    """The sizes, the grid (channel blocks, K x segments, B), the kernels' size arguments and their constexprs."""
    _check(x, dbl, index)
    b, n_d, length = x.shape
    n_k, n_state = index.shape[1], A.shape[1]
    n_rank = dbl.shape[2] - 2 * n_state
    n_dblk, n_p, r_p, block_l, n_tiles = _tiles(n_d, n_rank, n_state, length)
    per_seg, n_seg = _segments(n_dblk * n_k * b, n_tiles, x.device)
    sizes = (n_d, length, n_k, n_rank, n_state, 0 if index.shape[0] == 1 else n_k * length, n_tiles, per_seg, n_seg)
    meta = dict(LOW=x.dtype in (torch.float16, torch.bfloat16), R=n_rank, BD=BLOCK_D, NP=n_p, RP=r_p, BL=block_l,
                num_warps=NUM_WARPS)
    return b, n_d, length, n_k, n_rank, n_state, n_tiles, n_seg, (n_dblk, n_k * n_seg, b), sizes, meta


def forward(x: Tensor, dbl: Tensor, index: Tensor, dt_weight: Tensor, dt_bias: Tensor, A: Tensor, Ds: Tensor):
    """x (B, D, L); dbl (B, K, R + 2N, L) of x's dtype; index (B or 1, K, L) int64 permutations; dt_weight (K, D, R)
    of x's dtype; dt_bias, Ds (K * D,) and A (K * D, N) float32 -> out (B, D, L) float32 and the states entering each
    tile (B, K, D, N, tiles)."""
    b, n_d, length, n_k, n_rank, n_state, n_tiles, n_seg, grid, sizes, meta = _launch(x, dbl, index, A)
    inputs = (x, dbl, index, dt_weight, dt_bias, A, Ds)
    carry = _carried(_segment_summary, inputs + sizes, grid, (b, n_k, n_d, n_state, n_seg), n_seg, False, meta)
    states = torch.empty(state_shape(x, index, A), dtype=torch.float32, device=x.device)
    out = torch.zeros(b, n_d, length, dtype=torch.float32, device=x.device)
    _cross_scan_fwd[grid](*inputs, carry, states, out, *sizes, **meta)
    return out, states


def backward(gout: Tensor, x: Tensor, dbl: Tensor, index: Tensor, dt_weight: Tensor, dt_bias: Tensor, A: Tensor,
             Ds: Tensor, states: Tensor):
    """Gradients of :func:`forward`'s output ``gout`` (B, D, L): dx (B, D, L), d dbl (B, K, R + 2N, L) (float32),
    d dt_weight (K, D, R), d dt_bias (K * D,), dA (K * D, N), dDs (K * D,) (float32)."""
    b, n_d, length, n_k, n_rank, n_state, n_tiles, n_seg, grid, sizes, meta = _launch(x, dbl, index, A)
    inputs = (x, dbl, index, dt_weight, dt_bias, A, Ds, gout.float().contiguous())
    carry = _carried(_adjoint_summary, inputs + sizes, grid, (b, n_k, n_d, n_state, n_seg), n_seg, True, meta)
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.zeros(b, n_d, length, **f32)
    ddbl = torch.zeros(dbl.shape, **f32)
    dw = torch.empty(b, n_k, n_seg, n_d, n_rank, **f32)
    da = torch.empty(b, n_k, n_seg, n_d, n_state, **f32)
    dbias = torch.empty(b, n_k, n_seg, n_d, **f32)
    dds = torch.empty(b, n_k, n_seg, n_d, **f32)
    _cross_scan_bwd[grid](*inputs, states, carry, dx, ddbl, dw, dbias, da, dds, *sizes, **meta)

    def total(part):
        return part.sum((0, 2)).reshape(n_k * n_d, *part.shape[4:])

    return dx, ddbl, total(dw).view(n_k, n_d, n_rank), total(dbias), total(da), total(dds)
