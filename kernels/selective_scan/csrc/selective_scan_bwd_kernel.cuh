// Backward selective scan. A block holds kW warps for kW consecutive channels of one (batch, group); each warp
// walks its row's chunks from the last to the first. Per chunk it replays the forward states from the saved
// chunk-boundary state, runs the adjoint recurrence g_t = gh_t + a_{t+1} g_{t+1} backwards with the same
// warp-scan of affine maps (lane 31 first), and forms every gradient. dB and dC are shared by all channels of a
// group: the block sums its kW warps in shared memory and adds the sum to global memory with one atomic per step.
//
// The cross form (kCross, selective_scan.h) reads its steps' tokens, dout included, through the index as the forward
// does and adds du at those tokens (atomics: the K sequences of a map, or repeated entries of one, meet there); the
// raw step sizes' gradient, dB and dC are in step order, as the low-rank inputs, B and C it reads.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "selective_scan_common.cuh"

namespace vssm_scan {

template <int kN, bool kHasC, int kW>
constexpr int bwd_smem_floats() {
  return (kHasC ? 2 : 1) * kW * kN * kWarpSize * (kItems + 1);
}

template <typename T, int kN, bool kHasC, int kW, bool kCross>
__global__ void __launch_bounds__(kW *kWarpSize) scan_bwd_kernel(const ScanParams p) {
  extern __shared__ float smem[];
  // Reduction buffers, laid out [warp][state][lane][item] with one float of padding per lane.
  float *sdB = smem;
  float *sdC = smem + kW * kN * kWarpSize * (kItems + 1);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t blocks_per_batch = p.dim / kW;
  const int64_t b = blockIdx.x / blocks_per_batch;
  const int64_t d = (blockIdx.x % blocks_per_batch) * kW + warp;
  const int64_t row = b * p.dim + d;
  const int64_t per_group = p.dim / p.groups, g = d / per_group;  // g is the same for all warps: kW divides per_group
  const int64_t length = p.length;
  const int nstate = static_cast<int>(p.dstate);
  const bool vec = p.vec;
  // cross form: sequence g reads (and adds back to) channel d % per_group of image b's map
  const int64_t map_row = kCross ? b * per_group + d % per_group : row;

  const T *u = static_cast<const T *>(p.u) + map_row * length;
  // cross form: the low-rank step inputs of sequence g (rows of x_proj's output in step order), else this row's step
  // sizes
  const T *delta = static_cast<const T *>(p.delta) + (kCross ? (b * p.groups + g) * p.bc_stride : row * length);
  const float *dout = p.dout + (kHasC ? map_row * length : 0);
  const T *Bg = static_cast<const T *>(p.B) + (b * p.groups + g) * p.bc_stride;
  const T *Cg = kHasC ? static_cast<const T *>(p.C) + (b * p.groups + g) * p.bc_stride : nullptr;
  float *dBg = p.dB + (b * p.groups + g) * p.dbc_stride;
  float *dCg = kHasC ? p.dC + (b * p.groups + g) * p.dbc_stride : nullptr;
  const int64_t *index = kCross ? p.index + b * p.index_batch_stride + g * length : nullptr;

  float A[kN], A2[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    A[n] = n < nstate ? p.A[d * nstate + n] : 0.f;
    A2[n] = A[n] * kLog2e;
  }
  const float bias = p.has_bias ? p.delta_bias[d] : 0.f;
  const float skip = (kHasC && p.has_d) ? p.Ds[d] : 0.f;

  float carry_g[kN];  // a_{t'} g_{t'} for the first step t' of the chunk after the current one
  float dA_acc[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) carry_g[n] = dA_acc[n] = 0.f;
  float dD_acc = 0.f, dbias_acc = 0.f;

  for (int64_t chunk = p.n_chunks - 1; chunk >= 0; --chunk) {
    const int64_t start = chunk * kChunk + lane * kItems;
    int ix[kItems], run;
    lane_tokens<kCross>(index, start, length, ix, run);
    float uv[kItems], raw[kItems], dt[kItems], dy[kItems];
    load_steps<kCross>(u, start, length, ix, run, vec, uv);
    if constexpr (kCross) {
      low_rank_items(delta, start, length, p.dt_weight + d * p.n_rank, static_cast<int>(p.n_rank), vec, raw);
    } else {
      load_items(delta, start, length, vec, raw);
    }
    if constexpr (kHasC) load_steps<kCross>(dout, start, length, ix, run, vec, dy);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      raw[i] += bias;
      dt[i] = p.softplus ? softplus(raw[i]) : raw[i];
    }
    float a[kItems][kN], bv[kN][kItems], gh[kItems][kN], h_prev[kItems][kN];
    float pa[kN], pb[kN];
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      if (n < nstate) {
        load_items(Bg + n * length, start, length, vec, bv[n]);
      } else {
#pragma unroll
        for (int i = 0; i < kItems; ++i) bv[n][i] = 0.f;
      }
      float cv[kItems];
      if constexpr (kHasC) {
        if (n < nstate) {
          load_items(Cg + n * length, start, length, vec, cv);
        } else {
#pragma unroll
          for (int i = 0; i < kItems; ++i) cv[i] = 0.f;
        }
      } else if (n < nstate) {
        load_items(p.dout + (row * nstate + n) * length, start, length, vec, cv);  // dL/dh directly (not kCross)
      } else {
#pragma unroll
        for (int i = 0; i < kItems; ++i) cv[i] = 0.f;
      }
      pa[n] = 1.f;
      pb[n] = 0.f;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const bool valid = start + i < length;
        a[i][n] = valid ? fast_exp2(dt[i] * A2[n]) : 1.f;
        const float bu = valid ? dt[i] * uv[i] * bv[n][i] : 0.f;
        h_prev[i][n] = bu;  // temporarily the input term b_t; turned into h_{t-1} below
        gh[i][n] = valid ? (kHasC ? dy[i] * cv[i] : cv[i]) : 0.f;
        pb[n] = a[i][n] * pb[n] + bu;
        pa[n] *= a[i][n];
      }
    }
    // Replay the forward states of this chunk from the saved state at the end of the previous chunk.
    warp_scan_forward<kN>(pa, pb, lane);
    float hc[kItems][kN];  // h_t (needed for dC)
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      const float h0 = (chunk > 0 && n < nstate) ? p.chunk_states[(row * p.n_chunks + chunk - 1) * nstate + n] : 0.f;
      float ea = __shfl_up_sync(kFullMask, pa[n], 1), eb = __shfl_up_sync(kFullMask, pb[n], 1);
      if (lane == 0) {
        ea = 1.f;
        eb = 0.f;
      }
      float h = ea * h0 + eb;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const float bu = h_prev[i][n];
        h_prev[i][n] = h;
        h = a[i][n] * h + bu;
        hc[i][n] = h;
      }
    }
    // Adjoint recurrence g_t = gh_t + a_{t+1} g_{t+1}, composed per lane from its last step to its first.
    float qa[kN], qb[kN];
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      const float a_next_lane = __shfl_down_sync(kFullMask, a[0][n], 1);
      qa[n] = 1.f;
      qb[n] = 0.f;
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        const float a_next = i == kItems - 1 ? (lane == kWarpSize - 1 ? 1.f : a_next_lane) : a[i + 1][n];
        qb[n] = a_next * qb[n] + gh[i][n];
        qa[n] *= a_next;
      }
    }
    warp_scan_backward<kN>(qa, qb, lane);
    float gs[kItems][kN];
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      float ea = __shfl_down_sync(kFullMask, qa[n], 1), eb = __shfl_down_sync(kFullMask, qb[n], 1);
      if (lane == kWarpSize - 1) {
        ea = 1.f;
        eb = 0.f;
      }
      const float a_next_lane = __shfl_down_sync(kFullMask, a[0][n], 1);
      float gnext = ea * carry_g[n] + eb;  // g at the next lane's first step (lane 31: the carry term)
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        const float a_next = i == kItems - 1 ? (lane == kWarpSize - 1 ? 1.f : a_next_lane) : a[i + 1][n];
        gnext = a_next * gnext + gh[i][n];
        gs[i][n] = gnext;
      }
      carry_g[n] = __shfl_sync(kFullMask, a[0][n] * gs[0][n], 0);
    }
    // Gradients of this chunk.
    float du[kItems], ddelta[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const bool valid = start + i < length;
      float ddt = 0.f;
      du[i] = kHasC ? dy[i] * skip : 0.f;
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        const float g_logdecay = gs[i][n] * h_prev[i][n] * a[i][n];  // d/d(dt A)
        ddt += g_logdecay * A[n] + gs[i][n] * bv[n][i] * uv[i];
        dA_acc[n] += g_logdecay * dt[i];
        du[i] += gs[i][n] * bv[n][i] * dt[i];
        sdB[((warp * kN + n) * kWarpSize + lane) * (kItems + 1) + i] = gs[i][n] * dt[i] * uv[i];
        if constexpr (kHasC) sdC[((warp * kN + n) * kWarpSize + lane) * (kItems + 1) + i] = dy[i] * hc[i][n];
      }
      if constexpr (kHasC) dD_acc += valid ? dy[i] * uv[i] : 0.f;
      ddelta[i] = p.softplus ? ddt * softplus_grad(raw[i]) : ddt;
      dbias_acc += valid ? ddelta[i] : 0.f;
    }
    if constexpr (kCross) {
      scatter_add_items(static_cast<float *>(p.du) + map_row * length, ix, run, vec, du);
      store_items(static_cast<float *>(p.ddelta) + row * length, start, length, vec, ddelta);
    } else {
      store_items(static_cast<T *>(p.du) + row * length, start, length, vec, du);
      store_items(static_cast<T *>(p.ddelta) + row * length, start, length, vec, ddelta);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < kN * kChunk; idx += kW * kWarpSize) {
      const int n = idx / kChunk, pos = idx % kChunk;
      const int64_t t = chunk * kChunk + pos;
      if (n >= nstate || t >= length) continue;
      const int slot = (pos / kItems) * (kItems + 1) + pos % kItems;
      float sb = 0.f, sc = 0.f;
#pragma unroll
      for (int w = 0; w < kW; ++w) {
        sb += sdB[(w * kN + n) * kWarpSize * (kItems + 1) + slot];
        if constexpr (kHasC) sc += sdC[(w * kN + n) * kWarpSize * (kItems + 1) + slot];
      }
      atomicAdd(dBg + n * length + t, sb);
      if constexpr (kHasC) atomicAdd(dCg + n * length + t, sc);
    }
    __syncthreads();
  }
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    const float s = warp_sum(dA_acc[n]);
    if (lane == 0 && n < nstate) p.dA_rows[row * nstate + n] = s;
  }
  dbias_acc = warp_sum(dbias_acc);
  if (lane == 0 && p.has_bias) p.dbias_rows[row] = dbias_acc;
  if constexpr (kHasC) {
    dD_acc = warp_sum(dD_acc);
    if (lane == 0 && p.has_d) p.dD_rows[row] = dD_acc;
  }
}

template <typename T, int kN, bool kHasC, int kW, bool kCross = false>
void launch_bwd_variant(const ScanParams &p, cudaStream_t stream) {
  constexpr int smem = bwd_smem_floats<kN, kHasC, kW>() * sizeof(float);
  static_assert(smem <= 48 * 1024, "backward scan: shared memory over the default 48 KB");
  const dim3 grid(static_cast<unsigned>(p.batch * (p.dim / kW)));
  scan_bwd_kernel<T, kN, kHasC, kW, kCross><<<grid, kW * kWarpSize, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Warps per block: as many channels as share B/C and fit the reduction buffers (one per block otherwise).
template <int kN>
constexpr int max_bwd_warps() {
  return kN == 1 ? 8 : (kN <= 4 ? 2 : 1);
}

template <typename T, int kN>
void launch_bwd(const ScanParams &p, cudaStream_t stream) {
  constexpr int kW = max_bwd_warps<kN>();
  const bool wide = (p.dim / p.groups) % kW == 0;
  if (p.has_c) {
    if (wide) launch_bwd_variant<T, kN, true, kW>(p, stream);
    else launch_bwd_variant<T, kN, true, 1>(p, stream);
  } else {
    if (wide) launch_bwd_variant<T, kN, false, kW>(p, stream);
    else launch_bwd_variant<T, kN, false, 1>(p, stream);
  }
}

template <typename T, int kN>
void launch_cross_bwd(const ScanParams &p, cudaStream_t stream) {
  constexpr int kW = max_bwd_warps<kN>();
  if ((p.dim / p.groups) % kW == 0) launch_bwd_variant<T, kN, true, kW, true>(p, stream);
  else launch_bwd_variant<T, kN, true, 1, true>(p, stream);
}

}  // namespace vssm_scan
