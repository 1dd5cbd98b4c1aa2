// Parameters shared by the host code (dwconv2d.cpp) and the kernels.
//
// The op is a sum of up to three dilated depthwise convolutions over the same input, stride 1, "same" output:
//   out[b, c, y, x] = bias[c] + sum_t weight[c, t] * pad(x)[b, c, y + oy_t, x + ox_t]
// where the taps t run over the groups in order, each a K x K grid with dilation d (row-major, the centre tap left
// out when skip_center is set). A dense depthwise conv is one group; Spatial-Mamba's state fusion is the groups
// (3, 1), (3, 3, skip centre), (3, 5, skip centre): its 25 distinct taps. Padding repeats the border (replicate) or
// reads zeros.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace vssm_dwconv {

constexpr int kMaxGroups = 3;
// Tile kernels (tap sets read at run time, the dense 11x11 backward, small planes' backward; see dwconv2d_kernel.cuh):
constexpr int kTileH = 32, kTileW = 32;                 // output tile of a block
constexpr int kPy = 8;                                   // each thread computes a column of kPy outputs of it, so a
                                                         // warp reads 32 consecutive floats: no bank conflicts
constexpr int kThreads = (kTileH / kPy) * kTileW;        // 128

struct TapGroups {
  int count = 0;
  int ksize[kMaxGroups] = {0, 0, 0};
  int dilation[kMaxGroups] = {0, 0, 0};
  bool skip_center[kMaxGroups] = {false, false, false};
  int reach = 0;   // max over groups of dilation * (ksize / 2)
  int taps = 0;    // total taps over groups
};

struct ConvParams {
  int64_t batch, channels, height, width;
  int tiles_x, tiles_y;
  TapGroups groups;
  bool replicate;
  bool fusion;            // the groups are the state fusion's (3, 1), (3, 3, skip), (3, 5, skip)
  bool vec;               // every (B, C, H, W) tensor of the call starts 16-byte aligned and a row is a multiple of
                          // 16 bytes: rows can be read in 16-byte vectors
  int sm_count;           // multiprocessors of the device
  const void *x;          // (B, C, H, W), input dtype
  const float *weight;    // (C, taps) fp32
  const float *bias;      // (C,) fp32 or null
  void *out;              // (B, C, H, W), input dtype
  // backward
  const void *dout;       // (B, C, H, W), input dtype
  void *dx;               // (B, C, H, W), input dtype
  float *dweight;         // (C, taps) fp32, accumulated with atomics
  float *dbias;           // (C,) fp32 or null, accumulated with atomics
};

inline int tile_floats(const TapGroups &g) { return (kTileH + 2 * g.reach) * (kTileW + 2 * g.reach); }
// Shared memory of the forward block: the input tile and the channel's weights.
inline int fwd_smem_bytes(const TapGroups &g) { return (tile_floats(g) + g.taps) * sizeof(float); }
// Backward block: dout and input tiles, weights, and per-warp partial weight (+ bias) gradients.
inline int bwd_smem_bytes(const TapGroups &g) {
  return (2 * tile_floats(g) + g.taps + (kThreads / 32) * (g.taps + 1)) * sizeof(float);
}

template <typename T>
void launch_fwd(const ConvParams &p, cudaStream_t stream);

template <typename T>
void launch_bwd(const ConvParams &p, cudaStream_t stream);

}  // namespace vssm_dwconv
