// Parameters shared by the host code (selective_scan.cpp) and the kernels.
//
// Shapes (all tensors contiguous): u, delta (Bt, D, L); A (D, N) fp32; B, C (Bt, G, N, L); Ds, delta_bias (D,) fp32;
// out: the states h (Bt, D, N, L) fp32 (state form) or y (Bt, D, L) fp32 (output form);
// chunk_states (Bt, D, n_chunks, N) fp32: h at the end of every kChunk-step chunk, for the backward pass.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace vssm_scan {

constexpr int kWarpSize = 32;
constexpr int kItems = 8;                        // consecutive steps per lane
constexpr int kChunk = kWarpSize * kItems;       // steps per warp iteration (must match vssm/ops/selective_scan.py)
constexpr int kMaxState = 16;                    // largest state size N (KERNEL_MAX_STATE in vssm/ops/selective_scan.py)

struct ScanParams {
  int64_t batch, dim, length, groups, dstate, n_chunks;
  bool has_c, has_d, has_bias, softplus;
  bool vec;                                      // 16-byte vector loads and stores are safe for every row
  const void *u, *delta, *B, *C;                 // input dtype
  const float *A, *Ds, *delta_bias;              // fp32
  float *out, *chunk_states;                     // fp32
  // backward only
  const float *dout;                             // fp32, shape of out
  void *du, *ddelta;                             // input dtype
  float *dA_rows, *dD_rows, *dbias_rows;         // per row (Bt, D, N) / (Bt, D): summed over Bt on the host
  float *dB, *dC;                                // fp32 (Bt, G, N, L), accumulated with atomics
};

template <typename T, int kN>
void launch_fwd(const ScanParams &p, cudaStream_t stream);

template <typename T, int kN>
void launch_bwd(const ScanParams &p, cudaStream_t stream);

}  // namespace vssm_scan
