// Depthwise convolution over a set of taps (see dwconv2d.h), forward and backward.
//
// A block computes a kTileH x kTileW tile of one (batch, channel) plane. It stages the input tile with a halo of
// `reach` pixels in shared memory (the padding mode applied while loading), and every thread accumulates kPx
// horizontally adjacent outputs over the taps. The backward block stages both dout and the input: the input
// gradient is the transposed tap sum over dout (for replicate padding, border pixels also collect the taps that
// were clamped onto them), and the weight gradient is a per-tap correlation summed over the block and added to
// global memory with one atomic per tap.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "dwconv2d.h"

namespace vssm_dwconv {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Calls fn(t, oy, ox) for every tap t of the groups, in weight order.
template <typename Fn>
__device__ __forceinline__ void for_each_tap(const TapGroups &g, Fn fn) {
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

template <typename T>
__global__ void __launch_bounds__(kThreads) dw_fwd_kernel(const ConvParams p) {
  extern __shared__ float smem[];
  const TapGroups &g = p.groups;
  const int reach = g.reach, sw = kTileW + 2 * reach;
  float *tile = smem;
  float *wsm = smem + (kTileH + 2 * reach) * sw;
  const int c = blockIdx.y, b = blockIdx.z;
  const int y0 = (blockIdx.x / p.tiles_x) * kTileH, x0 = (blockIdx.x % p.tiles_x) * kTileW;
  const int height = static_cast<int>(p.height), width = static_cast<int>(p.width);
  const int64_t plane_off = (static_cast<int64_t>(b) * p.channels + c) * height * width;
  stage_tile(tile, static_cast<const T *>(p.x) + plane_off, height, width, y0, x0, reach, p.replicate);
  for (int t = threadIdx.x; t < g.taps; t += blockDim.x) wsm[t] = p.weight[static_cast<int64_t>(c) * g.taps + t];
  __syncthreads();

  const int ly = threadIdx.x / (kTileW / kPx), lx = (threadIdx.x % (kTileW / kPx)) * kPx;
  const int y = y0 + ly;
  if (y >= height || x0 + lx >= width) return;
  float acc[kPx];
  const float bias = p.bias ? p.bias[c] : 0.f;
#pragma unroll
  for (int j = 0; j < kPx; ++j) acc[j] = bias;
  for_each_tap(g, [&](int t, int oy, int ox) {
    const float w = wsm[t];
    const float *src = tile + (ly + reach + oy) * sw + lx + reach + ox;
#pragma unroll
    for (int j = 0; j < kPx; ++j) acc[j] = fmaf(w, src[j], acc[j]);
  });
  T *out = static_cast<T *>(p.out) + plane_off + static_cast<int64_t>(y) * width;
#pragma unroll
  for (int j = 0; j < kPx; ++j)
    if (x0 + lx + j < width) out[x0 + lx + j] = from_float<T>(acc[j]);
}

// Range of padded coordinates that replicate padding folds onto pixel v of an axis of size n.
__device__ __forceinline__ void folded_range(int v, int n, int reach, bool replicate, int &lo, int &hi) {
  lo = hi = v;
  if (!replicate) return;
  if (v == 0) lo = -reach;
  if (v == n - 1) hi = n - 1 + reach;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dw_bwd_kernel(const ConvParams p) {
  extern __shared__ float smem[];
  constexpr int kWarps = kThreads / 32;
  const TapGroups &g = p.groups;
  const int reach = g.reach, sh = kTileH + 2 * reach, sw = kTileW + 2 * reach;
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
  const int ly = threadIdx.x / (kTileW / kPx), lx = (threadIdx.x % (kTileW / kPx)) * kPx;
  const int y = y0 + ly;
  const bool row_valid = y < height;
  int nvalid = 0;  // outputs of this thread inside the plane
#pragma unroll
  for (int j = 0; j < kPx; ++j) nvalid += (row_valid && x0 + lx + j < width) ? 1 : 0;

  // Input gradient: dx[y, x] = sum over padded (py, px) folded onto (y, x), sum_t w_t dout[py - oy_t, px - ox_t].
  float dx[kPx];
#pragma unroll
  for (int j = 0; j < kPx; ++j) dx[j] = 0.f;
  int ylo, yhi;
  folded_range(y, height, reach, p.replicate, ylo, yhi);
  const bool x_interior = !p.replicate || (x0 + lx > 0 && x0 + lx + kPx - 1 < width - 1);
  if (nvalid > 0 && ylo == yhi && x_interior) {  // the common case: no folding
    for_each_tap(g, [&](int t, int oy, int ox) {
      const float w = wsm[t];
      const float *src = gtile + (ly + reach - oy) * sw + lx + reach - ox;
#pragma unroll
      for (int j = 0; j < kPx; ++j) dx[j] = fmaf(w, src[j], dx[j]);
    });
  } else if (nvalid > 0) {
#pragma unroll
    for (int j = 0; j < kPx; ++j) {
      const int x = x0 + lx + j;
      if (x >= width) continue;
      int xlo, xhi;
      folded_range(x, width, reach, p.replicate, xlo, xhi);
      float s = 0.f;
      for_each_tap(g, [&](int t, int oy, int ox) {
        float tap = 0.f;
        for (int py = ylo; py <= yhi; ++py) {
          const int gy = py - oy;
          if (gy < 0 || gy >= height) continue;
          for (int px = xlo; px <= xhi; ++px) {
            const int gx = px - ox;
            if (gx < 0 || gx >= width) continue;
            tap += gtile[(gy - y0 + reach) * sw + gx - x0 + reach];
          }
        }
        s = fmaf(wsm[t], tap, s);
      });
      dx[j] = s;
    }
  }
  if (nvalid > 0) {
    T *dxp = static_cast<T *>(p.dx) + plane_off + static_cast<int64_t>(y) * width;
#pragma unroll
    for (int j = 0; j < kPx; ++j)
      if (x0 + lx + j < width) dxp[x0 + lx + j] = from_float<T>(dx[j]);
  }

  // Weight gradient: per tap, sum over this block's outputs of dout * shifted padded input.
  const float *gsrc = gtile + (ly + reach) * sw + lx + reach;  // zero past the plane, so no masks are needed
  for_each_tap(g, [&](int t, int oy, int ox) {
    const float *xsrc = xtile + (ly + reach + oy) * sw + lx + reach + ox;
    float v = 0.f;
#pragma unroll
    for (int j = 0; j < kPx; ++j) v = fmaf(gsrc[j], xsrc[j], v);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
    if (lane == 0) red[warp * (g.taps + 1) + t] = v;
  });
  if (p.dbias) {
    float v = 0.f;
#pragma unroll
    for (int j = 0; j < kPx; ++j) v += gsrc[j];
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

template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

template <typename T>
void launch_fwd(const ConvParams &p, cudaStream_t stream) {
  const int smem = fwd_smem_bytes(p.groups);
  set_smem(dw_fwd_kernel<T>, smem);
  const dim3 grid(p.tiles_x * p.tiles_y, static_cast<unsigned>(p.channels), static_cast<unsigned>(p.batch));
  dw_fwd_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_bwd(const ConvParams &p, cudaStream_t stream) {
  const int smem = bwd_smem_bytes(p.groups);
  set_smem(dw_bwd_kernel<T>, smem);
  const dim3 grid(p.tiles_x * p.tiles_y, static_cast<unsigned>(p.channels), static_cast<unsigned>(p.batch));
  dw_bwd_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace vssm_dwconv
