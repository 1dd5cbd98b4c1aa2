// Depthwise convolution over a set of taps (see dwconv2d.h), forward and backward.
//
// A block computes a kTileH x kTileW tile of one (batch, channel) plane. It stages the input tile with a halo of
// `reach` pixels in shared memory (the padding mode applied while loading), and every thread accumulates
// a column of kPy outputs over the taps (a warp covers 32 adjacent columns, so its shared-memory reads hit 32
// banks). The state fusion's 25 taps and the dense undilated 3/5/7/11 kernels are compile-time constants: their
// offsets are immediates and a word shared by several taps is read once. Other tap sets are read at run time.
//
// Backward: the block stages dout (zero outside the plane) and the input. The input gradient is the transposed tap
// sum over dout, which is exact for zero padding and for every pixel off the border; with replicate padding the
// border pixels also collect the taps that were clamped onto them, which a second small kernel computes
// (one thread per border pixel). The weight gradient is a per-tap correlation summed over the block and added to
// global memory with one atomic per tap and block.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "dwconv2d.h"
#include "vssm_cuda.h"

namespace vssm_dwconv {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kFusionReach = 5;

using vssm::from_float;
using vssm::to_float;

__device__ __forceinline__ int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// The 3x3 taps of one fusion branch, starting at weight index kT0 (the centre skipped for the dilated branches).
template <int kDil, bool kSkip, int kT0, typename Fn>
__device__ __forceinline__ void fusion_branch(Fn &fn) {
#pragma unroll
  for (int ky = 0; ky < 3; ++ky) {
#pragma unroll
    for (int kx = 0; kx < 3; ++kx) {
      if (kSkip && ky == 1 && kx == 1) continue;
      const int idx = ky * 3 + kx;
      fn(kT0 + idx - ((kSkip && idx > 4) ? 1 : 0), (ky - 1) * kDil, (kx - 1) * kDil);
    }
  }
}

// Tap sets: for_each(groups, fn) calls fn(t, oy, ox) for every tap t in weight order.
struct FusionTaps {
  static constexpr bool kStatic = true;
  template <typename Fn>
  __device__ __forceinline__ static void for_each(const TapGroups &, Fn fn) {
    fusion_branch<1, false, 0>(fn);
    fusion_branch<3, true, 9>(fn);
    fusion_branch<5, true, 17>(fn);
  }
  __device__ __forceinline__ static int reach(const TapGroups &) { return kFusionReach; }
};

// A dense K x K kernel without dilation: every offset is a compile-time constant, so loads shared by several
// taps (the same shared-memory word for different output rows) are issued once.
template <int K>
struct DenseTaps {
  static constexpr bool kStatic = true;
  template <typename Fn>
  __device__ __forceinline__ static void for_each(const TapGroups &, Fn fn) {
#pragma unroll
    for (int ky = 0; ky < K; ++ky)
#pragma unroll
      for (int kx = 0; kx < K; ++kx) fn(ky * K + kx, ky - K / 2, kx - K / 2);
  }
  __device__ __forceinline__ static int reach(const TapGroups &) { return K / 2; }
};

struct RuntimeTaps {
  static constexpr bool kStatic = false;
  template <typename Fn>
  __device__ __forceinline__ static void for_each(const TapGroups &g, Fn fn) {
    int t = 0;
    for (int k = 0; k < g.count; ++k) {
      const int half = g.ksize[k] / 2, dil = g.dilation[k];
      for (int ky = 0; ky < g.ksize[k]; ++ky) {
        for (int kx = 0; kx < g.ksize[k]; ++kx) {
          if (g.skip_center[k] && ky == half && kx == half) continue;
          fn(t++, (ky - half) * dil, (kx - half) * dil);
        }
      }
    }
  }
  __device__ __forceinline__ static int reach(const TapGroups &g) { return g.reach; }
};

// Stage a (kTileH + 2R) x (kTileW + 2R) window of a plane, starting at (y0 - R, x0 - R), in shared memory.
// Outside the plane: the clamped border pixel (replicate) or zero.
template <typename T>
__device__ __forceinline__ void stage_tile(float *tile, const T *plane, int height, int width, int y0, int x0, int reach,
                                           bool replicate) {
  const int sh = kTileH + 2 * reach, sw = kTileW + 2 * reach;
  for (int i = threadIdx.x; i < sh * sw; i += blockDim.x) {
    int gy = y0 - reach + i / sw, gx = x0 - reach + i % sw;
    const bool inside = gy >= 0 && gy < height && gx >= 0 && gx < width;
    if (replicate) {
      gy = clampi(gy, 0, height - 1);
      gx = clampi(gx, 0, width - 1);
    }
    tile[i] = (inside || replicate) ? to_float(plane[static_cast<int64_t>(gy) * width + gx]) : 0.f;
  }
}

// Accumulate the kPy outputs of column lx from row ly: acc[r] += w_t * tile[ly + r + oy, lx + ox] (offsets negated
// when kTranspose, for the input gradient).
template <typename Taps, bool kTranspose>
__device__ __forceinline__ void tap_sum(const TapGroups &g, const float *tile, int sw, int reach, const float *weights,
                                        int ly, int lx, float (&acc)[kPy]) {
  const float *base = tile + (ly + reach) * sw + lx + reach;
  Taps::for_each(g, [&](int t, int oy, int ox) {
    const float w = weights[t];
    const float *src = kTranspose ? base - oy * sw - ox : base + oy * sw + ox;
#pragma unroll
    for (int r = 0; r < kPy; ++r) acc[r] = fmaf(w, src[r * sw], acc[r]);
  });
}

// Tile width of a block's staged window: a compile-time constant for static tap sets.
template <typename Taps>
__device__ __forceinline__ int window_width(int reach) {
  return kTileW + 2 * reach;
}

template <typename T, typename Taps>
__global__ void __launch_bounds__(kThreads) dw_fwd_kernel(const ConvParams p) {
  extern __shared__ float smem[];
  const TapGroups &g = p.groups;
  const int reach = Taps::reach(g);
  const int sw = window_width<Taps>(reach);
  float *tile = smem;
  float *wsm = smem + (kTileH + 2 * reach) * sw;
  const int c = blockIdx.y, b = blockIdx.z;
  const int y0 = (blockIdx.x / p.tiles_x) * kTileH, x0 = (blockIdx.x % p.tiles_x) * kTileW;
  const int height = static_cast<int>(p.height), width = static_cast<int>(p.width);
  const int64_t plane_off = (static_cast<int64_t>(b) * p.channels + c) * height * width;
  stage_tile(tile, static_cast<const T *>(p.x) + plane_off, height, width, y0, x0, reach, p.replicate);
  for (int t = threadIdx.x; t < g.taps; t += blockDim.x) wsm[t] = p.weight[static_cast<int64_t>(c) * g.taps + t];
  __syncthreads();

  const int ly = (threadIdx.x / kTileW) * kPy, lx = threadIdx.x % kTileW;
  if (y0 + ly >= height || x0 + lx >= width) return;
  float acc[kPy];
  const float bias = p.bias ? p.bias[c] : 0.f;
#pragma unroll
  for (int r = 0; r < kPy; ++r) acc[r] = bias;
  tap_sum<Taps, false>(g, tile, sw, reach, wsm, ly, lx, acc);
  T *out = static_cast<T *>(p.out) + plane_off + x0 + lx;
#pragma unroll
  for (int r = 0; r < kPy; ++r)
    if (y0 + ly + r < height) out[static_cast<int64_t>(y0 + ly + r) * width] = from_float<T>(acc[r]);
}

template <typename T, typename Taps>
__global__ void __launch_bounds__(kThreads) dw_bwd_kernel(const ConvParams p) {
  extern __shared__ float smem[];
  constexpr int kWarps = kThreads / 32;
  const TapGroups &g = p.groups;
  const int reach = Taps::reach(g);
  const int sh = kTileH + 2 * reach, sw = window_width<Taps>(reach);
  float *gtile = smem;                    // dout, zero outside the plane
  float *xtile = gtile + sh * sw;         // x, padded as in the forward pass
  float *wsm = xtile + sh * sw;           // weights of this channel
  float *red = wsm + g.taps;              // [kWarps][taps + 1] per-warp partial weight gradients (+ bias)
  const int c = blockIdx.y, b = blockIdx.z;
  const int y0 = (blockIdx.x / p.tiles_x) * kTileH, x0 = (blockIdx.x % p.tiles_x) * kTileW;
  const int height = static_cast<int>(p.height), width = static_cast<int>(p.width);
  const int64_t plane_off = (static_cast<int64_t>(b) * p.channels + c) * height * width;
  stage_tile(gtile, static_cast<const T *>(p.dout) + plane_off, height, width, y0, x0, reach, false);
  stage_tile(xtile, static_cast<const T *>(p.x) + plane_off, height, width, y0, x0, reach, p.replicate);
  for (int t = threadIdx.x; t < g.taps; t += blockDim.x) wsm[t] = p.weight[static_cast<int64_t>(c) * g.taps + t];
  __syncthreads();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int ly = (threadIdx.x / kTileW) * kPy, lx = threadIdx.x % kTileW;

  // Input gradient (the zero-padding adjoint; replicate borders are redone by dw_fold_kernel).
  if (y0 + ly < height && x0 + lx < width) {
    float dx[kPy];
#pragma unroll
    for (int r = 0; r < kPy; ++r) dx[r] = 0.f;
    tap_sum<Taps, true>(g, gtile, sw, reach, wsm, ly, lx, dx);
    T *dxp = static_cast<T *>(p.dx) + plane_off + x0 + lx;
#pragma unroll
    for (int r = 0; r < kPy; ++r)
      if (y0 + ly + r < height) dxp[static_cast<int64_t>(y0 + ly + r) * width] = from_float<T>(dx[r]);
  }

  // Weight gradient: per tap, sum over this block's outputs of dout * shifted padded input. dout is zero past the
  // plane, so the sums need no masks.
  const float *gsrc = gtile + (ly + reach) * sw + lx + reach;
  Taps::for_each(g, [&](int t, int oy, int ox) {
    const float *xsrc = xtile + (ly + reach + oy) * sw + lx + reach + ox;
    float v = 0.f;
#pragma unroll
    for (int r = 0; r < kPy; ++r) v = fmaf(gsrc[r * sw], xsrc[r * sw], v);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
    if (lane == 0) red[warp * (g.taps + 1) + t] = v;
  });
  if (p.dbias) {
    float v = 0.f;
#pragma unroll
    for (int r = 0; r < kPy; ++r) v += gsrc[r * sw];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
    if (lane == 0) red[warp * (g.taps + 1) + g.taps] = v;
  }
  __syncthreads();
  const int nred = g.taps + (p.dbias ? 1 : 0);
  for (int t = threadIdx.x; t < nred; t += blockDim.x) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[w * (g.taps + 1) + t];
    if (t < g.taps) {
      atomicAdd(p.dweight + static_cast<int64_t>(c) * g.taps + t, s);
    } else {
      atomicAdd(p.dbias + c, s);
    }
  }
}

// Number of border pixels of an H x W plane (every pixel when H or W is at most 2).
__host__ __device__ inline int64_t border_pixels(int64_t height, int64_t width) {
  return (height <= 2 || width <= 2) ? height * width : 2 * width + 2 * (height - 2);
}

// Replicate padding, backward: a border pixel also receives every tap that the forward pass clamped onto it. One
// thread per border pixel recomputes its whole gradient: sum over the padded positions (py, px) folded onto it of
// sum_t w_t dout[py - oy_t, px - ox_t].
template <typename T, typename Taps>
__global__ void dw_fold_kernel(const ConvParams p) {
  const int64_t nb = border_pixels(p.height, p.width);
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * p.channels * nb) return;
  const int64_t plane = idx / nb;
  int64_t k = idx % nb;
  const int height = static_cast<int>(p.height), width = static_cast<int>(p.width);
  int y, x;
  if (height <= 2 || width <= 2) {
    y = static_cast<int>(k / width);
    x = static_cast<int>(k % width);
  } else if (k < width) {
    y = 0;
    x = static_cast<int>(k);
  } else if (k < 2 * width) {
    y = height - 1;
    x = static_cast<int>(k - width);
  } else {
    k -= 2 * width;
    y = 1 + static_cast<int>(k / 2);
    x = (k % 2) ? width - 1 : 0;
  }
  const TapGroups &g = p.groups;
  const int reach = Taps::reach(g);
  const int ylo = y == 0 ? -reach : y, yhi = y == height - 1 ? height - 1 + reach : y;
  const int xlo = x == 0 ? -reach : x, xhi = x == width - 1 ? width - 1 + reach : x;
  const int c = static_cast<int>(plane % p.channels);
  const T *dout = static_cast<const T *>(p.dout) + plane * height * width;
  const float *w = p.weight + static_cast<int64_t>(c) * g.taps;
  float s = 0.f;
  Taps::for_each(g, [&](int t, int oy, int ox) {
    // Rows py in [ylo, yhi] with 0 <= py - oy < height, likewise for columns.
    const int ya = max(ylo, oy), yb = min(yhi, height - 1 + oy);
    const int xa = max(xlo, ox), xb = min(xhi, width - 1 + ox);
    float tap = 0.f;
    for (int py = ya; py <= yb; ++py)
      for (int px = xa; px <= xb; ++px) tap += to_float(dout[static_cast<int64_t>(py - oy) * width + px - ox]);
    s = fmaf(w[t], tap, s);
  });
  static_cast<T *>(p.dx)[plane * height * width + static_cast<int64_t>(y) * width + x] = from_float<T>(s);
}

// Small planes (H, W <= kSmallPlane): a 32 x 32 tile would leave most threads idle, so a block stages whole planes,
// `planes` consecutive batch entries of one channel, and its threads walk their outputs.
constexpr int kSmallPlane = 16;

__host__ __device__ inline int small_window(int64_t height, int64_t width, int reach) {
  return static_cast<int>((height + 2 * reach) * (width + 2 * reach));
}

constexpr int kSmallOutputs = 8;  // outputs per thread, at most

// Planes per block: as many as fit in the shared memory of one 32 x 32 tile (so the size checks still hold) and
// give each thread at most kSmallOutputs outputs.
inline int small_planes_per_block(const ConvParams &p) {
  const int fit = tile_floats(p.groups) / small_window(p.height, p.width, p.groups.reach);
  const int64_t by_threads = kThreads * kSmallOutputs / (p.height * p.width);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(fit), by_threads, p.batch})));
}

// The staged-window offsets of this thread's outputs (output o = threadIdx.x + k * kThreads), -1 past the end.
__device__ __forceinline__ void small_offsets(int (&offs)[kSmallOutputs], int n_out, int hw, int width, int win, int ww,
                                              int reach) {
#pragma unroll
  for (int k = 0; k < kSmallOutputs; ++k) {
    const int o = threadIdx.x + k * kThreads;
    offs[k] = o < n_out ? (o / hw) * win + ((o % hw) / width + reach) * ww + o % width + reach : -1;
  }
}

template <typename T>
__device__ __forceinline__ void stage_planes(float *wins, const T *x, const ConvParams &p, int64_t b0, int np,
                                             int reach, bool replicate) {
  const int height = static_cast<int>(p.height), width = static_cast<int>(p.width);
  const int ww = width + 2 * reach, win = (height + 2 * reach) * ww;
  const int c = blockIdx.y;
  for (int i = threadIdx.x; i < np * win; i += blockDim.x) {
    const int j = i / win, r = i % win;
    int gy = r / ww - reach, gx = r % ww - reach;
    const bool inside = gy >= 0 && gy < height && gx >= 0 && gx < width;
    if (replicate) {
      gy = clampi(gy, 0, height - 1);
      gx = clampi(gx, 0, width - 1);
    }
    const int64_t plane = ((b0 + j) * p.channels + c) * height * width;
    wins[i] = (inside || replicate) ? to_float(x[plane + static_cast<int64_t>(gy) * width + gx]) : 0.f;
  }
}

template <typename T, typename Taps>
__global__ void __launch_bounds__(kThreads) dw_small_fwd_kernel(const ConvParams p, int planes) {
  extern __shared__ float smem[];
  const TapGroups &g = p.groups;
  const int reach = Taps::reach(g);
  const int height = static_cast<int>(p.height), width = static_cast<int>(p.width);
  const int ww = width + 2 * reach, win = (height + 2 * reach) * ww, hw = height * width;
  const int c = blockIdx.y;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * planes;
  const int np = static_cast<int>(std::min<int64_t>(planes, p.batch - b0));
  float *wins = smem, *wsm = smem + planes * win;
  stage_planes(wins, static_cast<const T *>(p.x), p, b0, np, reach, p.replicate);
  for (int t = threadIdx.x; t < g.taps; t += blockDim.x) wsm[t] = p.weight[static_cast<int64_t>(c) * g.taps + t];
  __syncthreads();
  const float bias = p.bias ? p.bias[c] : 0.f;
  int offs[kSmallOutputs];
  small_offsets(offs, np * hw, hw, width, win, ww, reach);
  float acc[kSmallOutputs];
#pragma unroll
  for (int k = 0; k < kSmallOutputs; ++k) acc[k] = bias;
  Taps::for_each(g, [&](int t, int oy, int ox) {
    const float w = wsm[t];
    const int shift = oy * ww + ox;
#pragma unroll
    for (int k = 0; k < kSmallOutputs; ++k)
      if (offs[k] >= 0) acc[k] = fmaf(w, wins[offs[k] + shift], acc[k]);
  });
#pragma unroll
  for (int k = 0; k < kSmallOutputs; ++k) {
    const int o = threadIdx.x + k * kThreads;
    if (offs[k] >= 0) static_cast<T *>(p.out)[((b0 + o / hw) * p.channels + c) * hw + o % hw] = from_float<T>(acc[k]);
  }
}

template <typename T, typename Taps>
__global__ void __launch_bounds__(kThreads) dw_small_bwd_kernel(const ConvParams p, int planes) {
  extern __shared__ float smem[];
  constexpr int kWarps = kThreads / 32;
  const TapGroups &g = p.groups;
  const int reach = Taps::reach(g);
  const int height = static_cast<int>(p.height), width = static_cast<int>(p.width);
  const int ww = width + 2 * reach, win = (height + 2 * reach) * ww, hw = height * width;
  const int c = blockIdx.y;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * planes;
  const int np = static_cast<int>(std::min<int64_t>(planes, p.batch - b0));
  float *gwin = smem, *xwin = smem + planes * win, *wsm = xwin + planes * win, *red = wsm + g.taps;
  stage_planes(gwin, static_cast<const T *>(p.dout), p, b0, np, reach, false);
  stage_planes(xwin, static_cast<const T *>(p.x), p, b0, np, reach, p.replicate);
  for (int t = threadIdx.x; t < g.taps; t += blockDim.x) wsm[t] = p.weight[static_cast<int64_t>(c) * g.taps + t];
  __syncthreads();
  int offs[kSmallOutputs];
  small_offsets(offs, np * hw, hw, width, win, ww, reach);
  float gv[kSmallOutputs];  // dout at this thread's outputs (0 past the end)
#pragma unroll
  for (int k = 0; k < kSmallOutputs; ++k) gv[k] = offs[k] >= 0 ? gwin[offs[k]] : 0.f;
  // Input gradient (zero-padding adjoint; replicate borders are redone by dw_fold_kernel).
  float acc[kSmallOutputs];
#pragma unroll
  for (int k = 0; k < kSmallOutputs; ++k) acc[k] = 0.f;
  Taps::for_each(g, [&](int t, int oy, int ox) {
    const float w = wsm[t];
    const int shift = oy * ww + ox;
#pragma unroll
    for (int k = 0; k < kSmallOutputs; ++k)
      if (offs[k] >= 0) acc[k] = fmaf(w, gwin[offs[k] - shift], acc[k]);
  });
#pragma unroll
  for (int k = 0; k < kSmallOutputs; ++k) {
    const int o = threadIdx.x + k * kThreads;
    if (offs[k] >= 0) static_cast<T *>(p.dx)[((b0 + o / hw) * p.channels + c) * hw + o % hw] = from_float<T>(acc[k]);
  }
  // Weight (and bias) gradient: per tap, this block's sum of dout * shifted padded input.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  Taps::for_each(g, [&](int t, int oy, int ox) {
    const int shift = oy * ww + ox;
    float v = 0.f;
#pragma unroll
    for (int k = 0; k < kSmallOutputs; ++k)
      if (offs[k] >= 0) v = fmaf(gv[k], xwin[offs[k] + shift], v);
#pragma unroll
    for (int k = 16; k > 0; k /= 2) v += __shfl_xor_sync(kFullMask, v, k);
    if (lane == 0) red[warp * (g.taps + 1) + t] = v;
  });
  if (p.dbias) {
    float v = 0.f;
#pragma unroll
    for (int k = 0; k < kSmallOutputs; ++k) v += gv[k];
#pragma unroll
    for (int k = 16; k > 0; k /= 2) v += __shfl_xor_sync(kFullMask, v, k);
    if (lane == 0) red[warp * (g.taps + 1) + g.taps] = v;
  }
  __syncthreads();
  for (int t = threadIdx.x; t < g.taps + (p.dbias ? 1 : 0); t += blockDim.x) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += red[w * (g.taps + 1) + t];
    atomicAdd(t < g.taps ? p.dweight + static_cast<int64_t>(c) * g.taps + t : p.dbias + c, sum);
  }
}

template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

template <typename T, typename Taps>
void launch_fwd_taps(const ConvParams &p, cudaStream_t stream) {
  const int smem = fwd_smem_bytes(p.groups);
  if (p.height <= kSmallPlane && p.width <= kSmallPlane) {
    const int planes = small_planes_per_block(p);
    set_smem(dw_small_fwd_kernel<T, Taps>, smem);
    const dim3 grid(static_cast<unsigned>((p.batch + planes - 1) / planes), static_cast<unsigned>(p.channels));
    dw_small_fwd_kernel<T, Taps><<<grid, kThreads, smem, stream>>>(p, planes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  set_smem(dw_fwd_kernel<T, Taps>, smem);
  const dim3 grid(p.tiles_x * p.tiles_y, static_cast<unsigned>(p.channels), static_cast<unsigned>(p.batch));
  dw_fwd_kernel<T, Taps><<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Taps>
void launch_bwd_taps(const ConvParams &p, cudaStream_t stream) {
  const int smem = bwd_smem_bytes(p.groups);
  if (p.height <= kSmallPlane && p.width <= kSmallPlane) {
    const int planes = small_planes_per_block(p);
    set_smem(dw_small_bwd_kernel<T, Taps>, smem);
    const dim3 grid(static_cast<unsigned>((p.batch + planes - 1) / planes), static_cast<unsigned>(p.channels));
    dw_small_bwd_kernel<T, Taps><<<grid, kThreads, smem, stream>>>(p, planes);
  } else {
    set_smem(dw_bwd_kernel<T, Taps>, smem);
    const dim3 grid(p.tiles_x * p.tiles_y, static_cast<unsigned>(p.channels), static_cast<unsigned>(p.batch));
    dw_bwd_kernel<T, Taps><<<grid, kThreads, smem, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.replicate) {
    const int64_t n = p.batch * p.channels * border_pixels(p.height, p.width);
    dw_fold_kernel<T, Taps><<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Picks the tap set: the state fusion, a dense undilated K x K with K in {3, 5, 7, 11}, or taps read at run time.
template <typename T, template <typename, typename> class Launch>
void launch_taps(const ConvParams &p, cudaStream_t stream) {
  const TapGroups &g = p.groups;
  const bool dense = g.count == 1 && g.dilation[0] == 1 && !g.skip_center[0];
  if (p.fusion) return Launch<T, FusionTaps>::run(p, stream);
  if (dense && g.ksize[0] == 3) return Launch<T, DenseTaps<3>>::run(p, stream);
  if (dense && g.ksize[0] == 5) return Launch<T, DenseTaps<5>>::run(p, stream);
  if (dense && g.ksize[0] == 7) return Launch<T, DenseTaps<7>>::run(p, stream);
  if (dense && g.ksize[0] == 11) return Launch<T, DenseTaps<11>>::run(p, stream);
  Launch<T, RuntimeTaps>::run(p, stream);
}

template <typename T, typename Taps>
struct FwdLauncher {
  static void run(const ConvParams &p, cudaStream_t stream) { launch_fwd_taps<T, Taps>(p, stream); }
};
template <typename T, typename Taps>
struct BwdLauncher {
  static void run(const ConvParams &p, cudaStream_t stream) { launch_bwd_taps<T, Taps>(p, stream); }
};

template <typename T>
void launch_fwd(const ConvParams &p, cudaStream_t stream) {
  launch_taps<T, FwdLauncher>(p, stream);
}

template <typename T>
void launch_bwd(const ConvParams &p, cudaStream_t stream) {
  launch_taps<T, BwdLauncher>(p, stream);
}

}  // namespace vssm_dwconv
