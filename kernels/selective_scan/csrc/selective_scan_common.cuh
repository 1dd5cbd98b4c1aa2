// Helpers shared by the forward and backward scan kernels: dtype conversion, vectorised row loads and stores,
// softplus, and the warp-level composition of affine maps h -> a * h + b.
#pragma once

#include <cuda_runtime.h>

#include "selective_scan.h"
#include "vssm_cuda.h"

namespace vssm_scan {

constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;

using vssm::from_float;
using vssm::to_float;

// kItems consecutive elements of a row starting at `start` (zero past `length`). `vec` says that the row
// start is 16-byte aligned and the row length keeps every lane's start 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load_items(const T *row, int64_t start, int64_t length, bool vec,
                                           float (&v)[kItems]) {
  if (vec && start + kItems <= length) {
    constexpr int kVec = kItems * sizeof(T) / 16;
    uint4 raw[kVec];
    const uint4 *src = reinterpret_cast<const uint4 *>(row + start);
#pragma unroll
    for (int k = 0; k < kVec; ++k) raw[k] = __ldg(src + k);
    const T *vals = reinterpret_cast<const T *>(raw);
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[i] = to_float(vals[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[i] = (start + i < length) ? to_float(row[start + i]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_items(T *row, int64_t start, int64_t length, bool vec,
                                            const float (&v)[kItems]) {
  if (vec && start + kItems <= length) {
    constexpr int kVec = kItems * sizeof(T) / 16;
    uint4 raw[kVec];
    T *vals = reinterpret_cast<T *>(raw);
#pragma unroll
    for (int i = 0; i < kItems; ++i) vals[i] = from_float<T>(v[i]);
    uint4 *dst = reinterpret_cast<uint4 *>(row + start);
#pragma unroll
    for (int k = 0; k < kVec; ++k) dst[k] = raw[k];
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (start + i < length) row[start + i] = from_float<T>(v[i]);
  }
}

// kItems consecutive entries of an index row starting at `start` (as int: the host keeps lengths below 2^31); -1
// past `length` and for entries outside [0, length) (their steps read zeros and add nothing).
__device__ __forceinline__ void load_index(const int64_t *row, int64_t start, int64_t length, int (&ix)[kItems]) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t v = (start + i < length) ? __ldg(row + start + i) : -1;
    ix[i] = (v >= 0 && v < length) ? static_cast<int>(v) : -1;
  }
}

// How a lane's index entries run: 1 when they ascend by one from ix[0], -1 when they descend by one, 0 otherwise
// (VMamba's row-major directions run; its column-major ones and per-image orders do not).
__device__ __forceinline__ int index_run(const int (&ix)[kItems]) {
  bool up = ix[0] >= 0, down = ix[0] >= 0;
#pragma unroll
  for (int i = 1; i < kItems; ++i) {
    up = up && ix[i] == ix[0] + i;
    down = down && ix[i] == ix[0] - i;
  }
  return up ? 1 : (down ? -1 : 0);
}

// The first of a run's kItems entries in memory order when that start is 16-byte aligned (rows aligned: `vec`),
// else -1: the run is then read and written with vector instructions.
template <typename E>
__device__ __forceinline__ int aligned_run_start(const int (&ix)[kItems], int run, bool vec) {
  const int lo = run > 0 ? ix[0] : ix[kItems - 1];
  return (vec && run != 0 && lo % (16 / static_cast<int>(sizeof(E))) == 0) ? lo : -1;
}

// The elements of a row at the positions ix (zero where ix < 0); an aligned run with vector loads.
template <typename T>
__device__ __forceinline__ void gather_items(const T *row, const int (&ix)[kItems], int run, bool vec,
                                             float (&v)[kItems]) {
  const int lo = aligned_run_start<T>(ix, run, vec);
  if (lo >= 0) {
    float t[kItems];
    load_items(row, lo, lo + kItems, true, t);
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[i] = run > 0 ? t[i] : t[kItems - 1 - i];
    return;
  }
#pragma unroll
  for (int i = 0; i < kItems; ++i) v[i] = ix[i] >= 0 ? to_float(__ldg(row + ix[i])) : 0.f;
}

// v added to a float32 row at the positions ix (none where ix < 0), atomically; an aligned run with float4 atomics
// where the architecture has them (sm_90).
__device__ __forceinline__ void scatter_add_items(float *row, const int (&ix)[kItems], int run, bool vec,
                                                  const float (&v)[kItems]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int lo = aligned_run_start<float>(ix, run, vec);
  if (lo >= 0) {
    float t[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) t[i] = run > 0 ? v[i] : v[kItems - 1 - i];
    float4 *dst = reinterpret_cast<float4 *>(row + lo);
#pragma unroll
    for (int q = 0; q < kItems / 4; ++q)
      atomicAdd(dst + q, make_float4(t[4 * q], t[4 * q + 1], t[4 * q + 2], t[4 * q + 3]));
    return;
  }
#endif
#pragma unroll
  for (int i = 0; i < kItems; ++i)
    if (ix[i] >= 0) atomicAdd(row + ix[i], v[i]);
}

// The entries of an index row a lane's steps read (cross form), and how they run (index_run); none otherwise.
template <bool kCross>
__device__ __forceinline__ void lane_tokens(const int64_t *index, int64_t start, int64_t length, int (&ix)[kItems],
                                            int &run) {
  run = 0;
  if constexpr (kCross) {
    load_index(index, start, length, ix);
    run = index_run(ix);
  }
}

// A lane's steps of a map row: its tokens through the index in the cross form, else kItems consecutive elements.
template <bool kCross, typename E>
__device__ __forceinline__ void load_steps(const E *row, int64_t start, int64_t length, const int (&ix)[kItems],
                                           int run, bool vec, float (&v)[kItems]) {
  if constexpr (kCross) {
    gather_items(row, ix, run, vec, v);
  } else {
    load_items(row, start, length, vec, v);
  }
}

// The cross form's raw step sizes of a lane's steps: sum_r w[r] dts[r, step], dts the R low-rank rows of x_proj's
// output in the sequence's step order (rows `length` apart), w the channel's row of dt_proj's weight.
template <typename T>
__device__ __forceinline__ void low_rank_items(const T *dts, int64_t start, int64_t length, const float *w, int rank,
                                               bool vec, float (&v)[kItems]) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) v[i] = 0.f;
  for (int r = 0; r < rank; ++r) {
    float t[kItems];
    load_items(dts + r * length, start, length, vec, t);
    const float wr = __ldg(w + r);
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[i] += wr * t[i];
  }
}

// 2^x with one MUFU instruction (relative error below 2^-22; flushes denormal results to zero, which for a decay
// exp(dt * A) only means underflowing to 0 a little earlier).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// softplus with PyTorch's threshold 20 (identity above it).
__device__ __forceinline__ float softplus(float x) { return x <= 20.f ? log1pf(__expf(x)) : x; }
__device__ __forceinline__ float softplus_grad(float x) { return x <= 20.f ? __fdividef(1.f, 1.f + __expf(-x)) : 1.f; }

// Inclusive scan over the lanes of a warp of the affine maps (a, b): h -> a * h + b, lane 0 first.
template <int kN>
__device__ __forceinline__ void warp_scan_forward(float (&a)[kN], float (&b)[kN], int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      const float a_up = __shfl_up_sync(kFullMask, a[n], offset);
      const float b_up = __shfl_up_sync(kFullMask, b[n], offset);
      if (lane >= offset) {
        b[n] = a[n] * b_up + b[n];
        a[n] = a[n] * a_up;
      }
    }
  }
}

// Inclusive scan over the lanes of a warp of the same maps applied from lane 31 down to lane 0.
template <int kN>
__device__ __forceinline__ void warp_scan_backward(float (&a)[kN], float (&b)[kN], int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      const float a_dn = __shfl_down_sync(kFullMask, a[n], offset);
      const float b_dn = __shfl_down_sync(kFullMask, b[n], offset);
      if (lane + offset < kWarpSize) {
        b[n] = a[n] * b_dn + b[n];
        a[n] = a[n] * a_dn;
      }
    }
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

}  // namespace vssm_scan
