// Forward selective scan: one warp per (batch, channel) row, kChunk steps per iteration.
//
// Each lane owns kItems consecutive steps. It composes the affine maps h -> a_t h + b_t of its steps
// (a_t = exp(dt_t A), b_t = dt_t B_t u_t), the warp scans these compositions over the lanes, and every lane
// then replays its steps from its exclusive prefix applied to the carry of the previous chunks. Inputs are
// read once and the outputs written once; the state at the end of each chunk is kept for the backward pass.
//
// The cross form (kCross, selective_scan.h) runs the same steps on the sequences of a token map: each lane reads its
// steps' tokens at their index entries and adds its outputs at the same tokens (atomics: the K sequences of a map,
// or repeated entries of one, meet there); where a lane's entries run by one up or down (VMamba's row-major
// directions), with vector loads and float4 atomics. The step sizes' low-rank inputs, B and C come in step order
// (read as the plain scan reads them, coalesced). It keeps the chunk states only when asked (training).
#pragma once

#include <c10/cuda/CUDAException.h>

#include "selective_scan_common.cuh"

namespace vssm_scan {

constexpr int kFwdWarps = 4;

template <typename T, int kN, bool kHasC, bool kCross>
__global__ void __launch_bounds__(kFwdWarps *kWarpSize) scan_fwd_kernel(const ScanParams p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kFwdWarps + threadIdx.x / kWarpSize;
  if (row >= p.batch * p.dim) return;  // whole warps leave together
  const int64_t length = p.length;
  const int nstate = static_cast<int>(p.dstate);
  const int64_t b = row / p.dim, d = row % p.dim;
  const int64_t per_group = p.dim / p.groups, g = d / per_group;
  const bool vec = p.vec;
  // cross form: sequence g reads (and adds back to) channel d % per_group of image b's map
  const int64_t map_row = kCross ? b * per_group + d % per_group : row;

  const T *u = static_cast<const T *>(p.u) + map_row * length;
  // cross form: the low-rank step inputs of sequence g (rows of x_proj's output in step order), else this row's step
  // sizes
  const T *delta = static_cast<const T *>(p.delta) + (kCross ? (b * p.groups + g) * p.bc_stride : row * length);
  const T *Bg = static_cast<const T *>(p.B) + (b * p.groups + g) * p.bc_stride;
  const T *Cg = kHasC ? static_cast<const T *>(p.C) + (b * p.groups + g) * p.bc_stride : nullptr;
  const int64_t *index = kCross ? p.index + b * p.index_batch_stride + g * length : nullptr;

  float A2[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) A2[n] = n < nstate ? p.A[d * nstate + n] * kLog2e : 0.f;
  const float bias = p.has_bias ? p.delta_bias[d] : 0.f;
  const float skip = (kHasC && p.has_d) ? p.Ds[d] : 0.f;

  float carry[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) carry[n] = 0.f;

  for (int64_t chunk = 0; chunk < p.n_chunks; ++chunk) {
    const int64_t start = chunk * kChunk + lane * kItems;
    int ix[kItems], run;
    lane_tokens<kCross>(index, start, length, ix, run);
    float uv[kItems], dt[kItems];
    load_steps<kCross>(u, start, length, ix, run, vec, uv);
    if constexpr (kCross) {
      low_rank_items(delta, start, length, p.dt_weight + d * p.n_rank, static_cast<int>(p.n_rank), vec, dt);
    } else {
      load_items(delta, start, length, vec, dt);
    }
    float a[kItems][kN], bu[kItems][kN];
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      float bv[kItems];
      if (n < nstate) {
        load_items(Bg + n * length, start, length, vec, bv);
      } else {
#pragma unroll
        for (int i = 0; i < kItems; ++i) bv[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const float step = p.softplus ? softplus(dt[i] + bias) : dt[i] + bias;
        const bool valid = start + i < length;
        a[i][n] = valid ? fast_exp2(step * A2[n]) : 1.f;
        bu[i][n] = valid ? step * uv[i] * bv[i] : 0.f;
      }
    }
    // This lane's composition, then the warp's inclusive scan of compositions.
    float pa[kN], pb[kN];
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      pa[n] = 1.f;
      pb[n] = 0.f;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        pb[n] = a[i][n] * pb[n] + bu[i][n];
        pa[n] *= a[i][n];
      }
    }
    warp_scan_forward<kN>(pa, pb, lane);
    float h[kN];
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      float ea = __shfl_up_sync(kFullMask, pa[n], 1), eb = __shfl_up_sync(kFullMask, pb[n], 1);
      if (lane == 0) {
        ea = 1.f;
        eb = 0.f;
      }
      h[n] = ea * carry[n] + eb;
      carry[n] = __shfl_sync(kFullMask, pa[n], kWarpSize - 1) * carry[n] + __shfl_sync(kFullMask, pb[n], kWarpSize - 1);
    }
    if constexpr (kHasC) {
      float y[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) y[i] = skip * uv[i];
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        float cv[kItems];
        if (n < nstate) {
          load_items(Cg + n * length, start, length, vec, cv);
        } else {
#pragma unroll
          for (int i = 0; i < kItems; ++i) cv[i] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          h[n] = a[i][n] * h[n] + bu[i][n];
          y[i] += cv[i] * h[n];
        }
      }
      if constexpr (kCross) {
        scatter_add_items(p.out + map_row * length, ix, run, vec, y);
      } else {
        store_items(p.out + row * length, start, length, vec, y);
      }
    } else {
#pragma unroll
      for (int n = 0; n < kN; ++n) {
        if (n >= nstate) break;
        float hs[kItems];
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          h[n] = a[i][n] * h[n] + bu[i][n];
          hs[i] = h[n];
        }
        store_items(p.out + (row * nstate + n) * length, start, length, vec, hs);
      }
    }
    if ((!kCross || p.chunk_states != nullptr) && lane == 0) {
#pragma unroll
      for (int n = 0; n < kN; ++n)
        if (n < nstate) p.chunk_states[(row * p.n_chunks + chunk) * nstate + n] = carry[n];
    }
  }
}

template <typename T, int kN>
void launch_fwd(const ScanParams &p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.dim;
  const dim3 grid(static_cast<unsigned>((rows + kFwdWarps - 1) / kFwdWarps));
  if (p.has_c) {
    scan_fwd_kernel<T, kN, true, false><<<grid, kFwdWarps * kWarpSize, 0, stream>>>(p);
  } else {
    scan_fwd_kernel<T, kN, false, false><<<grid, kFwdWarps * kWarpSize, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kN>
void launch_cross_fwd(const ScanParams &p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.dim;
  const dim3 grid(static_cast<unsigned>((rows + kFwdWarps - 1) / kFwdWarps));
  scan_fwd_kernel<T, kN, true, true><<<grid, kFwdWarps * kWarpSize, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace vssm_scan
