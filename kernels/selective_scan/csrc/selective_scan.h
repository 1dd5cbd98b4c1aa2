// Parameters shared by the host code (selective_scan.cpp) and the kernels.
//
// Shapes (all tensors contiguous): u, delta (Bt, D, L); A (D, N) fp32; B, C (Bt, G, N, L); Ds, delta_bias (D,) fp32;
// out: the states h (Bt, D, N, L) fp32 (state form) or y (Bt, D, L) fp32 (output form);
// chunk_states (Bt, D, n_chunks, N) fp32: h at the end of every kChunk-step chunk, for the backward pass.
//
// Cross form (output-returning): the K = groups sequences of a token map read in an order given by an index and added
// back onto it. u is the map x (Bt, D / K, L); index (Bt or 1, K, L) int64, the token sequence k reads at step i;
// x_proj's output (Bt, K, R + 2N, L) comes in each sequence's step order (gathered by the caller: R + 2N rows instead
// of D, and every kernel read of it coalesced): delta points at its R low-rank step inputs (each channel's raw step
// size is dt_weight's row (D, R) fp32 times them), B and C at its other rows (bc_stride: the elements of one (b, k)
// block); out (Bt, D / K, L) fp32, zeroed by the host, receives every sequence's y at its token (atomic adds);
// chunk_states may be null (inference). Its backward gathers dout through the index and adds du (Bt, D / K, L) at the
// tokens; ddelta (Bt, D, L) and dB/dC (rows of one tensor shaped as x_proj's output) are in step order; all fp32,
// du and dB/dC zeroed by the host.
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
  const float *dt_weight;                        // cross form: (D, n_rank) fp32, the step sizes' low-rank projection
  int64_t n_rank;
  int64_t bc_stride;                             // elements between the B (or C) rows of consecutive (b, group)
  const int64_t *index;                          // cross form: (Bt or 1, K, L); nullptr otherwise
  int64_t index_batch_stride;                    // K * L, or 0 for one map shared by the batch
  float *out, *chunk_states;                     // fp32
  // backward only
  const float *dout;                             // fp32, shape of out
  void *du, *ddelta;                             // input dtype (cross form: fp32, accumulated with atomics)
  float *dA_rows, *dD_rows, *dbias_rows;         // per row (Bt, D, N) / (Bt, D): summed over Bt on the host
  float *dB, *dC;                                // fp32 (Bt, G, N, L) rows, accumulated with atomics
  int64_t dbc_stride;                            // elements between the dB (or dC) rows of consecutive (b, group)
};

template <typename T, int kN>
void launch_fwd(const ScanParams &p, cudaStream_t stream);

template <typename T, int kN>
void launch_cross_fwd(const ScanParams &p, cudaStream_t stream);

template <typename T, int kN>
void launch_bwd(const ScanParams &p, cudaStream_t stream);

template <typename T, int kN>
void launch_cross_bwd(const ScanParams &p, cudaStream_t stream);

}  // namespace vssm_scan
