"""Triton kernels of :func:`vssm.ops.observe_gate`: Spatial-Mamba's observation, norm and gate in one pass.

For pixel p = (b, l) and channel d (D channels, L pixels per image)::

    y[b, d, l] = fused[b, d, l] * C[b, l] + Ds[d] * u[b, d, l]       (rounded to z's dtype when it is 16-bit)
    out[b, l, d] = LayerNorm_D(y[b, :, l])[d] * silu(z[b, l, d])     (silu rounded to z's dtype when 16-bit)

``fused``, ``u`` are channel-major (B, D, L); ``z`` and ``out`` pixel-major (B, L, D): a program takes ``BLOCK_L``
pixels of the flattened B * L axis and the channels in chunks of ``BLOCK_C`` (one chunk when D <= ``SINGLE_MAX_C``;
above, Chan's merge of the chunk statistics and a second pass). The backward recomputes y, the statistics and the
gate from the inputs, and writes d fused, dC, du, dz and per-program partial sums of the weight, bias and Ds
gradients (reduced over programs on the host side). The 16-bit roundings reproduce the reference composition, whose
y is cast to z's dtype before the norm and whose SiLU runs in z's dtype; gradients pass through those casts as
autograd's do (rounded to the 16-bit dtype where the reference's are).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_common import NUM_WARPS, chan_merge, flat_pixels, round_to, tiles


@triton.jit
def _observe(fused_ptr, u_ptr, ds_ptr, c_val, offs_c, base, mask, mask_c, length, LOW: tl.constexpr,
             dtype: tl.constexpr):
    """y (float32, rounded like the reference) of one [channels, pixels] tile."""
    ptrs = offs_c[:, None] * length + base[None, :]
    fused = tl.load(fused_ptr + ptrs, mask=mask, other=0.).to(tl.float32)
    u = tl.load(u_ptr + ptrs, mask=mask, other=0.).to(tl.float32)
    ds = tl.load(ds_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
    y = fused * c_val[None, :] + ds[:, None] * u
    return tl.where(mask, round_to(y, LOW, dtype), 0.), fused, u, ds


@triton.jit
def _gate(z_ptr, zoff, offs_c, mask, LOW: tl.constexpr, dtype: tl.constexpr):
    """z and silu(z) (rounded like the reference) of one tile; ``zoff``: each pixel's offset in z."""
    z = tl.load(z_ptr + zoff[None, :] + offs_c[:, None], mask=mask, other=0.).to(tl.float32)
    sig = tl.sigmoid(z)
    return z, sig, round_to(z * sig, LOW, dtype)


@triton.jit
def _pixels(pid, n_c, length, n_pixels, z_batch, z_pixel, BLOCK_L: tl.constexpr):
    """:func:`flat_pixels`, and each pixel's offset in the pixel-major z (channel d adds d)."""
    offs_p, mask_p, batch, pixel, base = flat_pixels(pid, n_c, length, n_pixels, BLOCK_L)
    return offs_p, mask_p, base, batch * z_batch + pixel * z_pixel, batch


@triton.jit
def _write(out_ptr, z_ptr, w_ptr, b_ptr, y, mask, mask_c, offs_c, zoff, out_off, mean, rstd, LOW: tl.constexpr):
    w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
    b = tl.load(b_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
    _z, _sig, s = _gate(z_ptr, zoff, offs_c, mask, LOW, z_ptr.dtype.element_ty)
    out = ((y - mean[None, :]) * rstd[None, :] * w[:, None] + b[:, None]) * s
    tl.store(out_ptr + out_off[None, :] + offs_c[:, None], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _observe_gate_fwd(fused_ptr, c_ptr, u_ptr, ds_ptr, z_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr,
                      n_c, length, n_pixels, c_batch, z_batch, z_pixel, eps,
                      LOW: tl.constexpr, SINGLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    offs_p, mask_l, base, zoff, batch = _pixels(tl.program_id(0), n_c, length, n_pixels, z_batch, z_pixel, BLOCK_L)
    dtype = z_ptr.dtype.element_ty
    c_val = tl.load(c_ptr + batch * c_batch + offs_p % length, mask=mask_l, other=0.).to(tl.float32)
    out_off = offs_p * n_c  # pixel-major output: channel d adds d
    zeros = tl.zeros([BLOCK_L], dtype=tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < n_c
    mask = mask_c[:, None] & mask_l[None, :]
    y, _fused, _u, _ds = _observe(fused_ptr, u_ptr, ds_ptr, c_val, offs_c, base, mask, mask_c, length, LOW, dtype)
    count, mean, m2 = chan_merge(zeros, zeros, zeros, y, mask)
    if not SINGLE:
        for c0 in range(BLOCK_C, n_c, BLOCK_C):
            offs_cb = c0 + tl.arange(0, BLOCK_C)
            mask_cb = offs_cb < n_c
            maskb = mask_cb[:, None] & mask_l[None, :]
            yb, _fused_b, _u_b, _ds_b = _observe(fused_ptr, u_ptr, ds_ptr, c_val, offs_cb, base, maskb, mask_cb, length,
                                                 LOW, dtype)
            count, mean, m2 = chan_merge(count, mean, m2, yb, maskb)
    rstd = 1. / tl.sqrt(m2 / n_c + eps)
    if SINGLE:  # y is still in registers: one read of the inputs in all
        _write(out_ptr, z_ptr, w_ptr, b_ptr, y, mask, mask_c, offs_c, zoff, out_off, mean, rstd, LOW)
    else:
        for c0 in range(0, n_c, BLOCK_C):
            offs_cb = c0 + tl.arange(0, BLOCK_C)
            mask_cb = offs_cb < n_c
            maskb = mask_cb[:, None] & mask_l[None, :]
            yb, _fused_b, _u_b, _ds_b = _observe(fused_ptr, u_ptr, ds_ptr, c_val, offs_cb, base, maskb, mask_cb, length,
                                                 LOW, dtype)
            _write(out_ptr, z_ptr, w_ptr, b_ptr, yb, maskb, mask_cb, offs_cb, zoff, out_off, mean, rstd, LOW)
    tl.store(mean_ptr + offs_p, mean, mask=mask_l)
    tl.store(rstd_ptr + offs_p, rstd, mask=mask_l)


@triton.jit
def _chunk_grads(fused_ptr, c_ptr, u_ptr, ds_ptr, z_ptr, w_ptr, da_ptr, offs_c, offs_p, base, zoff, mask_l, mean, rstd,
                 c_val, n_c, length, LOW: tl.constexpr):
    """The recomputed tile: y, xhat, the norm's output gradient g = d(LN) * w, and what the writes need."""
    dtype = z_ptr.dtype.element_ty
    mask_c = offs_c < n_c
    mask = mask_c[:, None] & mask_l[None, :]
    y, fused, u, ds = _observe(fused_ptr, u_ptr, ds_ptr, c_val, offs_c, base, mask, mask_c, length, LOW, dtype)
    xhat = tl.where(mask, (y - mean[None, :]) * rstd[None, :], 0.)
    w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
    z, sig, s = _gate(z_ptr, zoff, offs_c, mask, LOW, dtype)
    da = tl.load(da_ptr + offs_p[None, :] * n_c + offs_c[:, None], mask=mask, other=0.).to(tl.float32)
    dln = da * s  # the gradient of the norm's output (the reference's product with the gate is float32)
    return mask, mask_c, fused, u, ds, xhat, w, z, sig, da, dln


@triton.jit
def _observe_gate_bwd(fused_ptr, c_ptr, u_ptr, ds_ptr, z_ptr, w_ptr, b_ptr, da_ptr, mean_ptr, rstd_ptr,
                      dfused_ptr, dc_ptr, du_ptr, dz_ptr, dw_part_ptr, db_part_ptr, dds_part_ptr,
                      n_c, length, n_pixels, c_batch, z_batch, z_pixel,
                      LOW: tl.constexpr, SINGLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)
    offs_p, mask_l, base, zoff, batch = _pixels(tl.program_id(0), n_c, length, n_pixels, z_batch, z_pixel, BLOCK_L)
    c_val = tl.load(c_ptr + batch * c_batch + offs_p % length, mask=mask_l, other=0.).to(tl.float32)
    mean = tl.load(mean_ptr + offs_p, mask=mask_l, other=0.)
    rstd = tl.load(rstd_ptr + offs_p, mask=mask_l, other=0.)
    c1 = tl.zeros([BLOCK_L], dtype=tl.float32)
    c2 = tl.zeros([BLOCK_L], dtype=tl.float32)
    n_chunks = 1 if SINGLE else tl.cdiv(n_c, BLOCK_C)
    for chunk in range(0, n_chunks):
        offs_c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
        mask, mask_c, fused, u, ds, xhat, w, z, sig, da, dln = _chunk_grads(
            fused_ptr, c_ptr, u_ptr, ds_ptr, z_ptr, w_ptr, da_ptr, offs_c, offs_p, base, zoff, mask_l, mean, rstd,
            c_val, n_c, length, LOW)
        g = dln * w[:, None]
        c1 += tl.sum(g * xhat, 0)
        c2 += tl.sum(g, 0)
    c1 = c1 / n_c
    c2 = c2 / n_c
    dc = tl.zeros([BLOCK_L], dtype=tl.float32)
    for chunk in range(0, n_chunks):
        offs_c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
        mask, mask_c, fused, u, ds, xhat, w, z, sig, da, dln = _chunk_grads(
            fused_ptr, c_ptr, u_ptr, ds_ptr, z_ptr, w_ptr, da_ptr, offs_c, offs_p, base, zoff, mask_l, mean, rstd,
            c_val, n_c, length, LOW)
        b = tl.load(b_ptr + offs_c, mask=mask_c, other=0.).to(tl.float32)
        dy = round_to((dln * w[:, None] - c2[None, :] - xhat * c1[None, :]) * rstd[None, :], LOW,
                    z_ptr.dtype.element_ty)
        ptrs = offs_c[:, None] * length + base[None, :]
        tl.store(dfused_ptr + ptrs, dy * c_val[None, :], mask=mask)
        tl.store(du_ptr + ptrs, (dy * ds[:, None]).to(du_ptr.dtype.element_ty), mask=mask)
        dc += tl.sum(dy * fused, 0)
        # d silu(z) = sig * (1 + z * (1 - sig)), times the norm's output (the gate's other factor)
        ln = xhat * w[:, None] + b[:, None]
        ds_out = round_to(da * ln, LOW, z_ptr.dtype.element_ty)
        dz = ds_out * sig * (1. + z * (1. - sig))
        tl.store(dz_ptr + offs_p[None, :] * n_c + offs_c[:, None], dz.to(dz_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_part_ptr + program * n_c + offs_c, tl.sum(dln * xhat, 1), mask=mask_c)
        tl.store(db_part_ptr + program * n_c + offs_c, tl.sum(dln, 1), mask=mask_c)
        tl.store(dds_part_ptr + program * n_c + offs_c, tl.sum(dy * u, 1), mask=mask_c)
    tl.store(dc_ptr + offs_p, dc, mask=mask_l)


def _common(fused: Tensor, C: Tensor, z: Tensor):
    b, n_c, length = fused.shape
    if z.stride(-1) != 1 or C.stride(-1) != 1:
        raise ValueError('observe_gate kernel: z and C need a unit stride along their last dimension.')
    return b, n_c, length, C.stride(0), z.stride(0), z.stride(-2), z.dtype in (torch.float16, torch.bfloat16)


def forward(fused: Tensor, C: Tensor, u: Tensor, Ds: Tensor, z: Tensor, weight: Tensor, bias: Tensor, eps: float):
    """fused, u (B, D, L) contiguous; C (B, 1, L); z (B, L, D) with unit channel stride -> out (B, L, D) of z's
    dtype, mean and rstd (B * L,) float32."""
    b, n_c, length, c_batch, z_batch, z_pixel, low = _common(fused, C, z)
    single, block_c, block_l = tiles(n_c, 4096)
    out = torch.empty(b, length, n_c, dtype=z.dtype, device=z.device)
    mean = torch.empty(b * length, dtype=torch.float32, device=z.device)
    rstd = torch.empty_like(mean)
    grid = (triton.cdiv(b * length, block_l), )
    _observe_gate_fwd[grid](fused, C, u, Ds, z, weight, bias, out, mean, rstd, n_c, length, b * length, c_batch,
                            z_batch, z_pixel, eps, LOW=low, SINGLE=single, BLOCK_C=block_c, BLOCK_L=block_l,
                            num_warps=NUM_WARPS)
    return out, mean, rstd


def backward(da: Tensor, fused: Tensor, C: Tensor, u: Tensor, Ds: Tensor, z: Tensor, weight: Tensor, bias: Tensor,
             mean: Tensor, rstd: Tensor):
    """Gradients of :func:`forward`'s output ``da`` (B, L, D): d fused (float32), dC (B, 1, L) float32, du (u's
    dtype), dz (B, L, D) of z's dtype, dDs, dweight, dbias (float32)."""
    b, n_c, length, c_batch, z_batch, z_pixel, low = _common(fused, C, z)
    single, block_c, block_l = tiles(n_c, 2048)
    grid = (triton.cdiv(b * length, block_l), )
    dfused = torch.empty_like(fused, dtype=torch.float32)
    dc = torch.empty(b, 1, length, dtype=torch.float32, device=z.device)
    du = torch.empty_like(u)
    dz = torch.empty(b, length, n_c, dtype=z.dtype, device=z.device)
    parts = [torch.empty(grid[0], n_c, dtype=torch.float32, device=z.device) for _ in range(3)]
    _observe_gate_bwd[grid](fused, C, u, Ds, z, weight, bias, da, mean, rstd, dfused, dc, du, dz, *parts, n_c, length,
                            b * length, c_batch, z_batch, z_pixel, LOW=low, SINGLE=single, BLOCK_C=block_c,
                            BLOCK_L=block_l, num_warps=NUM_WARPS)
    dw, db, dds = (p.sum(0) for p in parts)
    return dfused, dc, du, dz, dds, dw, db
