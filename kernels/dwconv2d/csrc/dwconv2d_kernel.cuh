// Depthwise convolution over a set of taps (see dwconv2d.h), forward and backward.
//
// Staging (every kernel): a block copies the windows it reads (its outputs plus a halo of R = reach pixels) into
// shared memory as float32, the padding applied: rows walked without per-element division, the part inside the plane
// read in 16-byte vectors when the rows allow it, 8 loads per thread in flight, then the columns left and right of the
// plane filled from the staged edge column (replicate) or with zeros.
//
// Row kernels (tap sets known at compile time: the state fusion's 25 taps, dense undilated 3/5/7/11). A block stages
// the window of one output tile (the whole plane when it fits) of several planes. Each thread owns kCols = 4 adjacent
// outputs in each of kRows rows: it walks the kRows + 2R staged rows under them once, reads each row segment as
// float4s into registers and adds every tap whose row offset lands on one of its output rows. The weights stay in
// registers and the tap offsets are immediates, so a staged value is read from shared memory once per thread rather
// than once per tap. The host picks the tile, the planes per block and kRows per shape (plan_rows, launch_rows_fwd).
// Backward (fusion, dense 3/5/7; planes larger than kSmallPlane): a block holds batch entries of one channel and
// stages dout (zero outside the plane) and the input. The input gradient is the transposed tap sum over dout; the
// weight gradient per tap is the correlation of the thread's dout values with the staged input, summed over the block
// through shared memory and added to global memory with one atomic per (block, tap).
//
// Tile kernels (tap sets read at run time; the dense 11x11 backward, whose 121 per-tap sums would not fit in
// registers; the backward of planes up to kSmallPlane): a block computes a kTileH x kTileW tile of one plane, or whole
// planes up to kSmallPlane of several batch entries, every thread a column of kPy outputs (a warp covers 32 adjacent
// columns, so its shared-memory reads hit 32 banks); the weight gradient is reduced per warp with shuffles and per
// block in shared memory.
//
// Replicate padding, backward: the transposed tap sum is exact for zero padding and for every pixel off the border;
// border pixels also collect the taps that were clamped onto them, which a fold kernel recomputes afterwards
// (dw_fold_bands_kernel: one block per plane, from running sums of the border bands staged in shared memory;
// dw_fold_kernel, one thread per border pixel reading global memory, where the bands do not fit).
#pragma once

#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "dwconv2d.h"
#include "vssm_cuda.h"

namespace vssm_dwconv {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kFusionReach = 5;

using vssm::from_float;
using vssm::to_float;

__device__ __forceinline__ int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// ------------------------------------------------------------------------------------------------------- tap sets

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

// Tap sets: for_each(groups, fn) calls fn(t, oy, ox) for every tap t in weight order. The static ones also give their
// reach (kReach) and number of taps (kCount) at compile time.
struct FusionTaps {
  static constexpr bool kStatic = true;
  static constexpr int kReach = kFusionReach, kCount = 25;
  template <typename Fn>
  __device__ __forceinline__ static void for_each(const TapGroups &, Fn fn) {
    fusion_branch<1, false, 0>(fn);
    fusion_branch<3, true, 9>(fn);
    fusion_branch<5, true, 17>(fn);
  }
  __device__ __forceinline__ static int reach(const TapGroups &) { return kReach; }
};

// A dense K x K kernel without dilation: every offset is a compile-time constant, so loads shared by several
// taps (the same shared-memory word for different output rows) are issued once.
template <int K>
struct DenseTaps {
  static constexpr bool kStatic = true;
  static constexpr int kReach = K / 2, kCount = K * K;
  template <typename Fn>
  __device__ __forceinline__ static void for_each(const TapGroups &, Fn fn) {
#pragma unroll
    for (int ky = 0; ky < K; ++ky)
#pragma unroll
      for (int kx = 0; kx < K; ++kx) fn(ky * K + kx, ky - K / 2, kx - K / 2);
  }
  __device__ __forceinline__ static int reach(const TapGroups &) { return kReach; }
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

// -------------------------------------------------------------------------------------------------------- staging

// Elements of T in 16 bytes: the width of the vector loads of the staging.
template <typename T>
constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));

// Element e (a compile-time constant once unrolled) of 16 bytes of T values, as float (exact).
__device__ __forceinline__ unsigned word(const uint4 &v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}
template <typename T>
__device__ __forceinline__ float vec_elem(const uint4 &v, int e);
template <>
__device__ __forceinline__ float vec_elem<float>(const uint4 &v, int e) {
  return __uint_as_float(word(v, e));
}
template <>
__device__ __forceinline__ float vec_elem<__half>(const uint4 &v, int e) {
  const unsigned w = word(v, e / 2);
  return __half2float(__ushort_as_half(static_cast<unsigned short>(e % 2 ? w >> 16 : w & 0xffffu)));
}
template <>
__device__ __forceinline__ float vec_elem<__nv_bfloat16>(const uint4 &v, int e) {
  const unsigned w = word(v, e / 2);
  return __uint_as_float(e % 2 ? w & 0xffff0000u : w << 16);  // a bfloat16 is the high half of a float
}

// A window of a plane: rows gy0 .. gy0 + rows - 1 and columns gx0 .. gx0 + cols - 1, which may reach past the plane on
// any side (the padding is applied while staging).
struct Window {
  int gy0, gx0, rows, cols;
};

// The items (plane, row r, item k of the row) of planes x rows x n, visited in steps of blockDim.x starting at
// threadIdx.x, with no division per step (only when a step wraps past a plane).
struct Item {
  int pl, r, k;
};

struct ItemWalk {
  Item at;
  int dr, dk;
  __device__ __forceinline__ ItemWalk(int n, int rows)
      : at{0, static_cast<int>(threadIdx.x) / n, static_cast<int>(threadIdx.x) % n},
        dr(static_cast<int>(blockDim.x) / n),
        dk(static_cast<int>(blockDim.x) % n) {
    wrap(rows);
  }
  __device__ __forceinline__ void wrap(int rows) {
    if (at.r >= rows) {
      const int q = at.r / rows;
      at.pl += q;
      at.r -= q * rows;
    }
  }
  __device__ __forceinline__ void next(int n, int rows) {
    at.k += dk;
    at.r += dr;
    if (at.k >= n) {
      at.k -= n;
      ++at.r;
    }
    wrap(rows);
  }
};

constexpr int kStageBatch = 8;  // global loads in flight per thread while staging

// Visit this thread's items of np planes x rows x n: load(item, off) for kStageBatch of them before store(value, off)
// for each, so that every thread keeps up to kStageBatch loads in flight. load also sets the shared-memory offset
// `off` of the item's row in the window.
template <typename V, typename Load, typename Store>
__device__ __forceinline__ void walk_items(int n, int rows, int np, Load load, Store store) {
  if (n <= 0) return;
  ItemWalk it(n, rows);
  while (it.at.pl < np) {
    V vals[kStageBatch];
    int offs[kStageBatch], ks[kStageBatch];
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u) {
      offs[u] = -1;
      if (it.at.pl < np) {
        vals[u] = load(it.at, offs[u]);
        ks[u] = it.at.k;
        it.next(n, rows);
      }
    }
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u)
      if (offs[u] >= 0) store(vals[u], offs[u], ks[u]);
  }
}

// What a staging pass reads: np planes at src + pl * stride, padded by replicating the border or with zeros.
template <typename T>
struct StageSource {
  const T *src;
  int64_t stride;
  bool replicate;
};

// Stage the window w of np planes from each of kSrc (1 or 2) sources in shared memory as float32: source s's plane
// pl goes to
//   dst[s * dst_source + pl * dst_plane + r * dst_row + c] = that plane at (w.gy0 + r, w.gx0 + c),
// which outside the plane is the clamped border pixel (replicate) or zero. The columns inside the plane are read
// from global memory in aligned vectors of V elements (V > 1 needs 16-byte aligned planes and rows of a multiple of 16
// bytes; rows above and below the plane are clamped rows, or zeros), kStageBatch per thread in flight; then, after a
// barrier, the columns past the plane's left and right edges copy the edge column or are zeroed. Every thread of the
// block must call it.
template <typename T, int V, int kSrc>
__device__ __forceinline__ void stage_windows(float *dst, int dst_source, int dst_plane, int dst_row,
                                              const StageSource<T> (&srcs)[kSrc], int np, int height, int width,
                                              const Window &w) {
  static_assert(kSrc == 1 || kSrc == 2, "one or two sources");
  using Raw = std::conditional_t<V == 1, T, uint4>;
  const int xa = max(w.gx0, 0), xb = min(w.gx0 + w.cols, width);  // columns [xa, xb) are inside the plane
  const int va = xa / V, nvec = (xb + V - 1) / V - va;
  // Item plane q is source q % kSrc, plane q / kSrc.
  const auto second = [&](int q) { return kSrc == 2 && (q & 1); };
  const auto window = [&](int q) { return (second(q) ? dst_source : 0) + (q / kSrc) * dst_plane; };
  walk_items<Raw>(
      nvec, w.rows, np * kSrc,
      [&](const Item &it, int &off) {
        const bool s2 = second(it.pl);
        const T *src = s2 ? srcs[kSrc - 1].src : srcs[0].src;
        const int64_t stride = s2 ? srcs[kSrc - 1].stride : srcs[0].stride;
        const bool replicate = s2 ? srcs[kSrc - 1].replicate : srcs[0].replicate;
        const int gy = w.gy0 + it.r;
        off = window(it.pl) + it.r * dst_row;
        Raw v{};
        if (replicate || (gy >= 0 && gy < height)) {
          v = *reinterpret_cast<const Raw *>(src + (it.pl / kSrc) * stride +
                                             static_cast<int64_t>(clampi(gy, 0, height - 1)) * width + (va + it.k) * V);
        }
        return v;
      },
      [&](const Raw &v, int off, int k) {
        const int c0 = (va + k) * V - w.gx0;  // window column of the vector's first element
#pragma unroll
        for (int e = 0; e < V; ++e) {
          if (c0 + e >= 0 && c0 + e < w.cols) {
            if constexpr (V == 1) {
              dst[off + c0] = to_float(v);
            } else {
              dst[off + c0 + e] = vec_elem<T>(v, e);
            }
          }
        }
      });
  __syncthreads();
  const int nl = xa - w.gx0, nb = nl + (w.gx0 + w.cols - xb);  // columns left of the plane, and all outside it
  if (nb <= 0) return;
  for (ItemWalk it(nb, w.rows); it.at.pl < np * kSrc; it.next(nb, w.rows)) {
    const bool replicate = second(it.at.pl) ? srcs[kSrc - 1].replicate : srcs[0].replicate;
    float *row = dst + window(it.at.pl) + it.at.r * dst_row;
    const int c = it.at.k < nl ? it.at.k : xb - w.gx0 + (it.at.k - nl);
    row[c] = replicate ? row[it.at.k < nl ? nl : xb - 1 - w.gx0] : 0.f;
  }
}

template <typename T, int kSrc>
__device__ __forceinline__ void stage_windows(float *dst, int dst_source, int dst_plane, int dst_row,
                                              const StageSource<T> (&srcs)[kSrc], int np, int height, int width,
                                              const Window &w, bool vec) {
  if (vec) {
    stage_windows<T, kVecElems<T>>(dst, dst_source, dst_plane, dst_row, srcs, np, height, width, w);
  } else {
    stage_windows<T, 1>(dst, dst_source, dst_plane, dst_row, srcs, np, height, width, w);
  }
}

// ---------------------------------------------------------------------------------------------------- row kernels

constexpr int kCols = 4;                  // outputs of a thread along a row: one float4 of the staged window
constexpr int kRowThreads = 256;          // most threads of a row-kernel block
constexpr int kRowSmemBytes = 48 * 1024;  // most shared memory of a row-kernel block: several blocks per SM

// float4 reads per staged row that cover a thread's kCols outputs and the reach on both sides.
__host__ __device__ constexpr int row_vecs(int reach) { return (kCols + 2 * reach + 3) / 4; }

// Geometry of a row-kernel launch (plan_rows). The block's threads are ordered tx fastest, then ty, then plane;
// blockDim.x is a multiple of 32, the threads past planes * tx * ty idle.
struct RowTiling {
  int tx, ty;            // threads of a tile along x (kCols outputs each) and y (kRows outputs each)
  int tiles_x, tiles_y;  // tiles of a plane
  int planes;            // planes per block, at the same tile position: consecutive (batch, channel) planes, or with
                         // one_channel, one channel of consecutive batch entries
  int sw, sh;            // staged window of a plane: row stride (a multiple of 4 floats) and rows
  bool one_channel;      // blocks = tiles * (one_channel ? C * ceil(B / planes) : ceil(B * C / planes)), tiles fastest
};

// Component i of the float4 sequence q (i a compile-time constant once unrolled).
template <int N>
__device__ __forceinline__ float elem(const float4 (&q)[N], int i) {
  const float4 &v = q[i / 4];
  return i % 4 == 0 ? v.x : (i % 4 == 1 ? v.y : (i % 4 == 2 ? v.z : v.w));
}

template <int N>
__device__ __forceinline__ void load_row(float4 (&q)[N], const float *src) {
#pragma unroll
  for (int k = 0; k < N; ++k) q[k] = reinterpret_cast<const float4 *>(src)[k];
}

// acc[r][j] += w[t] * win[r + R + oy_t][j + R + ox_t] over the taps (offsets negated when kTranspose), win being the
// staged window from the thread's first output row and column on (16-byte aligned): each of its kRows + 2R rows is
// read once, for every tap that reaches it from one of the thread's rows.
template <typename Taps, int kRows, bool kTranspose>
__device__ __forceinline__ void row_tap_sum(const TapGroups &g, const float *win, int sw,
                                            const float (&w)[Taps::kCount], float (&acc)[kRows][kCols]) {
  constexpr int R = Taps::kReach;
#pragma unroll
  for (int i = 0; i < kRows + 2 * R; ++i) {
    float4 q[row_vecs(R)];
    load_row(q, win + i * sw);
    Taps::for_each(g, [&](int t, int oy, int ox) {
      if (kTranspose) {
        oy = -oy;
        ox = -ox;
      }
      const int r = i - R - oy;
      if (r < 0 || r >= kRows) return;
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc[r][j] = fmaf(w[t], elem(q, j + R + ox), acc[r][j]);
    });
  }
}

// part[t] += sum over r, j of gv[r][j] * win[r + R + oy_t][j + R + ox_t]: this thread's share of the weight gradient.
template <typename Taps, int kRows>
__device__ __forceinline__ void row_tap_corr(const TapGroups &g, const float *win, int sw,
                                             const float (&gv)[kRows][kCols], float (&part)[Taps::kCount]) {
  constexpr int R = Taps::kReach;
#pragma unroll
  for (int i = 0; i < kRows + 2 * R; ++i) {
    float4 q[row_vecs(R)];
    load_row(q, win + i * sw);
    Taps::for_each(g, [&](int t, int oy, int ox) {
      const int r = i - R - oy;
      if (r < 0 || r >= kRows) return;
#pragma unroll
      for (int j = 0; j < kCols; ++j) part[t] = fmaf(gv[r][j], elem(q, j + R + ox), part[t]);
    });
  }
}

template <typename T2>
struct alignas(2 * sizeof(T2)) Pair {
  T2 a, b;
};

__device__ __forceinline__ void store4(float *dst, const float (&v)[kCols]) {
  *reinterpret_cast<float4 *>(dst) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(__half *dst, const float (&v)[kCols]) {
  *reinterpret_cast<Pair<__half2> *>(dst) = Pair<__half2>{__floats2half2_rn(v[0], v[1]), __floats2half2_rn(v[2], v[3])};
}
__device__ __forceinline__ void store4(__nv_bfloat16 *dst, const float (&v)[kCols]) {
  *reinterpret_cast<Pair<__nv_bfloat162> *>(dst) =
      Pair<__nv_bfloat162>{__floats2bfloat162_rn(v[0], v[1]), __floats2bfloat162_rn(v[2], v[3])};
}

// Write a thread's kRows x kCols outputs, the first at (y, x) of the plane, those inside the plane. With vec the
// row is 16-byte aligned and width % 4 == 0, so x % 4 == 0 makes the four columns one aligned vector inside the plane.
template <typename T, int kRows>
__device__ __forceinline__ void store_rows(T *plane, int y, int x, int height, int width, bool vec,
                                           const float (&v)[kRows][kCols]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (y + r >= height) break;
    T *dst = plane + static_cast<int64_t>(y + r) * width + x;
    if (vec) {
      store4(dst, v[r]);
    } else {
#pragma unroll
      for (int j = 0; j < kCols; ++j)
        if (x + j < width) dst[j] = from_float<T>(v[r][j]);
    }
  }
}

// Where a row-kernel block and thread sit: planes n0 + j * step (j < np) at the tile whose first output is (y0, x0);
// this thread's plane slot pl and first output (oy, ox) (past the plane, or pl >= np, for idle threads).
struct RowBlock {
  int64_t n0, step;
  int np, y0, x0, pl, ty, tx, oy, ox;
  __device__ __forceinline__ int channel(const ConvParams &p, int slot) const {
    return static_cast<int>((n0 + slot * step) % p.channels);
  }
};

template <int kRows>
__device__ __forceinline__ RowBlock row_block(const ConvParams &p, const RowTiling &tl) {
  RowBlock b;
  const int ntiles = tl.tiles_x * tl.tiles_y;
  const int tile = static_cast<int>(blockIdx.x % ntiles);
  const int64_t group = blockIdx.x / ntiles;
  int64_t left;
  if (tl.one_channel) {  // batch entries b0 .. of channel c
    const int64_t c = group % p.channels, b0 = group / p.channels * tl.planes;
    b.n0 = b0 * p.channels + c;
    b.step = p.channels;
    left = p.batch - b0;
  } else {
    b.n0 = group * tl.planes;
    b.step = 1;
    left = p.batch * p.channels - b.n0;
  }
  b.np = left < tl.planes ? static_cast<int>(left) : tl.planes;
  b.y0 = (tile / tl.tiles_x) * tl.ty * kRows;
  b.x0 = (tile % tl.tiles_x) * tl.tx * kCols;
  const int tpp = tl.tx * tl.ty;
  b.pl = static_cast<int>(threadIdx.x) / tpp;
  const int k = static_cast<int>(threadIdx.x) - b.pl * tpp;
  b.ty = k / tl.tx;
  b.tx = k - b.ty * tl.tx;
  b.oy = b.y0 + b.ty * kRows;
  b.ox = b.x0 + b.tx * kCols;
  return b;
}

template <int kCount>
__device__ __forceinline__ void load_weights(float (&w)[kCount], const float *weight, int c) {
  const float *src = weight + static_cast<int64_t>(c) * kCount;
#pragma unroll
  for (int t = 0; t < kCount; ++t) w[t] = __ldg(src + t);
}

template <typename T, typename Taps, int kRows>
__global__ void __launch_bounds__(kRowThreads) dw_rows_fwd_kernel(const ConvParams p, const RowTiling tl) {
  extern __shared__ float4 row_smem[];
  constexpr int R = Taps::kReach;
  float *win = reinterpret_cast<float *>(row_smem);
  const int height = static_cast<int>(p.height), width = static_cast<int>(p.width);
  const int64_t hw = static_cast<int64_t>(height) * width;
  const RowBlock b = row_block<kRows>(p, tl);
  // Only the rows and columns that outputs inside the plane read: the rest of the window is read only for outputs
  // past the plane, which are not stored.
  const Window w{b.y0 - R, b.x0 - R, min(tl.ty * kRows, height - b.y0) + 2 * R,
                 min(tl.tx * kCols, width - b.x0) + 2 * R};
  const StageSource<T> src[1] = {{static_cast<const T *>(p.x) + b.n0 * hw, b.step * hw, p.replicate}};
  stage_windows(win, 0, tl.sh * tl.sw, tl.sw, src, b.np, height, width, w, p.vec);
  __syncthreads();
  if (b.pl >= b.np || b.oy >= height || b.ox >= width) return;
  const int64_t n = b.n0 + b.pl * b.step;
  const int c = b.channel(p, b.pl);
  float wr[Taps::kCount];
  load_weights(wr, p.weight, c);
  const float bias = p.bias ? __ldg(p.bias + c) : 0.f;
  float acc[kRows][kCols];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int j = 0; j < kCols; ++j) acc[r][j] = bias;
  row_tap_sum<Taps, kRows, false>(p.groups, win + (b.pl * tl.sh + b.ty * kRows) * tl.sw + b.tx * kCols, tl.sw, wr,
                                  acc);
  store_rows<T, kRows>(static_cast<T *>(p.out) + n * hw, b.oy, b.ox, height, width, p.vec, acc);
}

// Needs tl.one_channel: the block's weight gradient is one channel's.
template <typename T, typename Taps, int kRows>
__global__ void __launch_bounds__(kRowThreads) dw_rows_bwd_kernel(const ConvParams p, const RowTiling tl) {
  extern __shared__ float4 row_smem[];
  constexpr int R = Taps::kReach, kTaps = Taps::kCount;
  const int height = static_cast<int>(p.height), width = static_cast<int>(p.width);
  const int64_t hw = static_cast<int64_t>(height) * width;
  const RowBlock b = row_block<kRows>(p, tl);
  const int plane_floats = tl.sh * tl.sw;
  float *gwin = reinterpret_cast<float *>(row_smem);  // dout, zero outside the plane
  float *xwin = gwin + tl.planes * plane_floats;      // x, padded as in the forward pass
  // The whole window: outputs past the plane see dout = 0 and a finite x, so they add nothing to the weight gradient.
  const Window w{b.y0 - R, b.x0 - R, tl.sh, tl.tx * kCols + 2 * R};
  const StageSource<T> src[2] = {{static_cast<const T *>(p.dout) + b.n0 * hw, b.step * hw, false},
                                 {static_cast<const T *>(p.x) + b.n0 * hw, b.step * hw, p.replicate}};
  stage_windows(gwin, static_cast<int>(xwin - gwin), plane_floats, tl.sw, src, b.np, height, width, w, p.vec);
  __syncthreads();

  float part[kTaps];  // this thread's share of the weight and bias gradients
  float part_bias = 0.f;
#pragma unroll
  for (int t = 0; t < kTaps; ++t) part[t] = 0.f;
  if (b.pl < b.np && b.oy < height && b.ox < width) {
    const int64_t n = b.n0 + b.pl * b.step;
    const int off = (b.pl * tl.sh + b.ty * kRows) * tl.sw + b.tx * kCols;
    // Input gradient (the zero-padding adjoint; replicate borders are redone by a fold kernel).
    {
      float wr[kTaps];
      load_weights(wr, p.weight, b.channel(p, b.pl));
      float acc[kRows][kCols];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int j = 0; j < kCols; ++j) acc[r][j] = 0.f;
      row_tap_sum<Taps, kRows, true>(p.groups, gwin + off, tl.sw, wr, acc);
      store_rows<T, kRows>(static_cast<T *>(p.dx) + n * hw, b.oy, b.ox, height, width, p.vec, acc);
    }
    // Weight gradient: dout at this thread's outputs against the shifted padded input.
    float gv[kRows][kCols];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float4 q[row_vecs(R)];
      load_row(q, gwin + off + (r + R) * tl.sw);
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        gv[r][j] = elem(q, j + R);
        part_bias += gv[r][j];
      }
    }
    row_tap_corr<Taps, kRows>(p.groups, xwin + off, tl.sw, gv, part);
  }

  // Block sum per tap through shared memory (the block's planes share a channel): the windows are read, their memory
  // now holds red[t][thread], t = kTaps for the bias.
  __syncthreads();
  float *red = gwin;
  const int nthreads = static_cast<int>(blockDim.x);
#pragma unroll
  for (int t = 0; t < kTaps; ++t) red[t * nthreads + threadIdx.x] = part[t];
  red[kTaps * nthreads + threadIdx.x] = part_bias;
  __syncthreads();
  const int nt = kTaps + (p.dbias ? 1 : 0), used = b.np * tl.tx * tl.ty;
  const int lane = threadIdx.x % 32, nwarps = nthreads / 32;
  const int c = b.channel(p, 0);
  for (int t = static_cast<int>(threadIdx.x) / 32; t < nt; t += nwarps) {  // one warp per tap
    float s = 0.f;
    for (int k = lane; k < used; k += 32) s += red[t * nthreads + k];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(kFullMask, s, off);
    if (lane == 0) atomicAdd(t < kTaps ? p.dweight + static_cast<int64_t>(c) * kTaps + t : p.dbias + c, s);
  }
}

// ---------------------------------------------------------------------------------------------------- tile kernels

// Stage the (kTileH + 2R) x (kTileW + 2R) window, starting at (y0 - R, x0 - R), of each source's plane in shared
// memory, one after the other. Outside the plane: the clamped border pixel (replicate) or zero.
template <typename T, int kSrc>
__device__ __forceinline__ void stage_tile(float *tile, const StageSource<T> (&srcs)[kSrc], int height, int width,
                                           int y0, int x0, int reach, bool vec) {
  const int sh = kTileH + 2 * reach, sw = kTileW + 2 * reach;
  stage_windows(tile, sh * sw, 0, sw, srcs, 1, height, width, Window{y0 - reach, x0 - reach, sh, sw}, vec);
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

// Sum the per-warp partials red[warp][t] (row stride taps + 1, t = taps for the bias) of a block and add them to the
// channel's weight (and bias) gradient.
__device__ __forceinline__ void add_block_grads(const ConvParams &p, const float *red, int c) {
  constexpr int kWarps = kThreads / 32;
  const TapGroups &g = p.groups;
  for (int t = threadIdx.x; t < g.taps + (p.dbias ? 1 : 0); t += blockDim.x) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[w * (g.taps + 1) + t];
    atomicAdd(t < g.taps ? p.dweight + static_cast<int64_t>(c) * g.taps + t : p.dbias + c, s);
  }
}

template <typename T, typename Taps>
__global__ void __launch_bounds__(kThreads) dw_fwd_kernel(const ConvParams p) {
  extern __shared__ float smem[];
  const TapGroups &g = p.groups;
  const int reach = Taps::reach(g);
  const int sw = kTileW + 2 * reach;
  float *tile = smem;
  float *wsm = smem + (kTileH + 2 * reach) * sw;
  const int c = blockIdx.y, b = blockIdx.z;
  const int y0 = (blockIdx.x / p.tiles_x) * kTileH, x0 = (blockIdx.x % p.tiles_x) * kTileW;
  const int height = static_cast<int>(p.height), width = static_cast<int>(p.width);
  const int64_t plane_off = (static_cast<int64_t>(b) * p.channels + c) * height * width;
  const StageSource<T> src[1] = {{static_cast<const T *>(p.x) + plane_off, 0, p.replicate}};
  stage_tile(tile, src, height, width, y0, x0, reach, p.vec);
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
  const TapGroups &g = p.groups;
  const int reach = Taps::reach(g);
  const int sh = kTileH + 2 * reach, sw = kTileW + 2 * reach;
  float *gtile = smem;                    // dout, zero outside the plane
  float *xtile = gtile + sh * sw;         // x, padded as in the forward pass
  float *wsm = xtile + sh * sw;           // weights of this channel
  float *red = wsm + g.taps;              // [kWarps][taps + 1] per-warp partial weight gradients (+ bias)
  const int c = blockIdx.y, b = blockIdx.z;
  const int y0 = (blockIdx.x / p.tiles_x) * kTileH, x0 = (blockIdx.x % p.tiles_x) * kTileW;
  const int height = static_cast<int>(p.height), width = static_cast<int>(p.width);
  const int64_t plane_off = (static_cast<int64_t>(b) * p.channels + c) * height * width;
  const StageSource<T> src[2] = {{static_cast<const T *>(p.dout) + plane_off, 0, false},
                                 {static_cast<const T *>(p.x) + plane_off, 0, p.replicate}};
  stage_tile(gtile, src, height, width, y0, x0, reach, p.vec);  // gtile, then xtile
  for (int t = threadIdx.x; t < g.taps; t += blockDim.x) wsm[t] = p.weight[static_cast<int64_t>(c) * g.taps + t];
  __syncthreads();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int ly = (threadIdx.x / kTileW) * kPy, lx = threadIdx.x % kTileW;

  // Input gradient (the zero-padding adjoint; replicate borders are redone by a fold kernel).
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
  add_block_grads(p, red, c);
}

// Number of border pixels of an H x W plane (every pixel when H or W is at most 2).
__host__ __device__ inline int64_t border_pixels(int64_t height, int64_t width) {
  return (height <= 2 || width <= 2) ? height * width : 2 * width + 2 * (height - 2);
}

// Border pixel k (0 <= k < border_pixels) of an H x W plane: the top row, the bottom row, then the left and right
// pixels of each row in between (row-major over the whole plane when H or W is at most 2).
__device__ __forceinline__ void border_pixel(int k, int height, int width, int &y, int &x) {
  if (height <= 2 || width <= 2) {
    y = k / width;
    x = k % width;
  } else if (k < width) {
    y = 0;
    x = k;
  } else if (k < 2 * width) {
    y = height - 1;
    x = k - width;
  } else {
    y = 1 + (k - 2 * width) / 2;
    x = ((k - 2 * width) % 2) ? width - 1 : 0;
  }
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
  const int height = static_cast<int>(p.height), width = static_cast<int>(p.width);
  int y, x;
  border_pixel(static_cast<int>(idx % nb), height, width, y, x);
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

// Replicate padding, backward, the same fold from partial sums: for an H x W plane with H, W >= max(reach + 1, 3),
// every rectangle of dout that the fold sums for one tap is a run of up to reach + 1 pixels starting at the plane's
// edge, in a row (left / right columns of the plane, corners included: one run per row of the rectangle) or in a
// column (top / bottom rows). A block takes one plane: it stages the running sums of the first reach + 1 pixels of
// every row from both ends and of every column from both ends, 2 (reach + 1) (H + W) floats, then each border pixel is
// one lookup per tap (at most reach + 1 at the corners) instead of up to (reach + 1)^2 global loads.
inline int fold_bands_floats(int64_t height, int64_t width, int reach) {
  return static_cast<int>(2 * (reach + 1) * (height + width));
}
constexpr int kFoldBandsMaxBytes = 48 * 1024;  // dynamic shared memory without an opt-in

inline bool fold_bands_fits(const ConvParams &p) {
  const int reach = p.groups.reach;
  const int64_t low = std::max(reach + 1, 3);
  return p.height >= low && p.width >= low &&
         fold_bands_floats(p.height, p.width, reach) * static_cast<int64_t>(sizeof(float)) <= kFoldBandsMaxBytes;
}

template <typename T, typename Taps>
__global__ void dw_fold_bands_kernel(const ConvParams p) {
  extern __shared__ float bands[];
  const TapGroups &g = p.groups;
  const int reach = Taps::reach(g), run = reach + 1;
  const int height = static_cast<int>(p.height), width = static_cast<int>(p.width);
  const int64_t plane = blockIdx.x;
  const T *dout = static_cast<const T *>(p.dout) + plane * height * width;
  // rows[side][r][k]: sum of the first k + 1 pixels of row r from the left (side 0) or the right (1);
  // cols[side][k][c]: sum of the first k + 1 pixels of column c from the top (0) or the bottom (1).
  float *rows = bands, *cols = bands + 2 * height * run;
  for (int i = threadIdx.x; i < 2 * (height + width); i += blockDim.x) {
    float s = 0.f;
    if (i < 2 * height) {
      const int side = i / height, r = i % height;
      const T *src = dout + static_cast<int64_t>(r) * width + (side ? width - 1 : 0);
      const int step = side ? -1 : 1;
      float *dst = rows + (side * height + r) * run;
      for (int k = 0; k < run; ++k) {
        s += to_float(src[k * step]);
        dst[k] = s;
      }
    } else {
      const int j = i - 2 * height, side = j / width, c = j % width;
      const T *src = dout + (side ? static_cast<int64_t>(height - 1) * width : 0) + c;
      const int64_t step = side ? -static_cast<int64_t>(width) : width;
      float *dst = cols + side * run * width + c;
      for (int k = 0; k < run; ++k) {
        s += to_float(src[k * step]);
        dst[k * width] = s;
      }
    }
  }
  __syncthreads();
  const int c = static_cast<int>(plane % p.channels);
  const float *w = p.weight + static_cast<int64_t>(c) * g.taps;
  T *dx = static_cast<T *>(p.dx) + plane * height * width;
  const int nb = static_cast<int>(border_pixels(height, width));
  for (int k = threadIdx.x; k < nb; k += blockDim.x) {
    int y, x;
    border_pixel(k, height, width, y, x);
    const bool xedge = x == 0 || x == width - 1;
    float s = 0.f;
    Taps::for_each(g, [&](int t, int oy, int ox) {
      // Along an axis where (y, x) is on the border, the padded positions folded onto it are the edge pixel and the
      // reach outside it; shifted back by the tap's offset o they cover the first -o + 1 pixels from the top / left
      // edge (o + 1 from the bottom / right), none when that is below 1: one running sum (len = -o or o).
      float tap = 0.f;
      if (xedge) {
        const int len = x == 0 ? -ox : ox;  // run length - 1 along the row
        if (len < 0) return;
        const float *side = rows + (x == 0 ? 0 : height * run) + len;
        if (y == 0 || y == height - 1) {
          const int ylen = y == 0 ? -oy : oy;
          if (ylen < 0) return;
          const int r0 = y == 0 ? 0 : height - 1 - ylen;
          for (int r = r0; r <= r0 + ylen; ++r) tap += side[r * run];
        } else {
          const int r = y - oy;
          if (r < 0 || r >= height) return;
          tap = side[r * run];
        }
      } else {
        const int ylen = y == 0 ? -oy : oy;
        const int cc = x - ox;
        if (ylen < 0 || cc < 0 || cc >= width) return;
        tap = cols[((y == 0 ? 0 : run) + ylen) * width + cc];
      }
      s = fmaf(w[t], tap, s);
    });
    dx[static_cast<int64_t>(y) * width + x] = from_float<T>(s);
  }
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

// Stage the windows (plane + halo) of batch entries b0 .. b0 + np - 1 of this block's channel, one after the other,
// for each source (the next source's windows start `planes` windows later). The sources point at channel 0 of b0.
template <typename T, int kSrc>
__device__ __forceinline__ void stage_planes(float *wins, const StageSource<T> (&srcs)[kSrc], const ConvParams &p,
                                             int planes, int np, int reach) {
  const int height = static_cast<int>(p.height), width = static_cast<int>(p.width);
  const int ww = width + 2 * reach, win = (height + 2 * reach) * ww;
  const int64_t hw = static_cast<int64_t>(height) * width;
  StageSource<T> at[kSrc];
#pragma unroll
  for (int s = 0; s < kSrc; ++s) at[s] = {srcs[s].src + blockIdx.y * hw, p.channels * hw, srcs[s].replicate};
  stage_windows(wins, planes * win, win, ww, at, np, height, width, Window{-reach, -reach, height + 2 * reach, ww},
                p.vec);
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
  const StageSource<T> src[1] = {{static_cast<const T *>(p.x) + b0 * p.channels * hw, 0, p.replicate}};
  stage_planes(wins, src, p, planes, np, reach);
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
  const TapGroups &g = p.groups;
  const int reach = Taps::reach(g);
  const int height = static_cast<int>(p.height), width = static_cast<int>(p.width);
  const int ww = width + 2 * reach, win = (height + 2 * reach) * ww, hw = height * width;
  const int c = blockIdx.y;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * planes;
  const int np = static_cast<int>(std::min<int64_t>(planes, p.batch - b0));
  float *gwin = smem, *xwin = smem + planes * win, *wsm = xwin + planes * win, *red = wsm + g.taps;
  const StageSource<T> src[2] = {{static_cast<const T *>(p.dout) + b0 * p.channels * hw, 0, false},
                                 {static_cast<const T *>(p.x) + b0 * p.channels * hw, 0, p.replicate}};
  stage_planes(gwin, src, p, planes, np, reach);  // gwin, then xwin
  for (int t = threadIdx.x; t < g.taps; t += blockDim.x) wsm[t] = p.weight[static_cast<int64_t>(c) * g.taps + t];
  __syncthreads();
  int offs[kSmallOutputs];
  small_offsets(offs, np * hw, hw, width, win, ww, reach);
  float gv[kSmallOutputs];  // dout at this thread's outputs (0 past the end)
#pragma unroll
  for (int k = 0; k < kSmallOutputs; ++k) gv[k] = offs[k] >= 0 ? gwin[offs[k]] : 0.f;
  // Input gradient (zero-padding adjoint; replicate borders are redone by a fold kernel).
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
  add_block_grads(p, red, c);
}

// ------------------------------------------------------------------------------------------------------ launchers

template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

// A row-kernel launch: its tiling, threads per block and shared memory.
struct RowPlan {
  RowTiling tl{};
  int threads = 0, smem = 0;
};

// Row tiling for kRows = rows and `windows` staged windows per plane (1 forward; 2 backward: dout and x, and the
// backward's blocks hold one channel). Tiles are at most 64 columns wide and as tall as kRowThreads threads and
// kRowSmemBytes allow (the whole plane when it fits), both split evenly: staging is the costly part, so halos are
// kept few. Then the planes per block: of the counts that fit in those limits and keep 4 blocks per multiprocessor,
// the one whose last warp is fullest (the larger on ties).
inline RowPlan plan_rows(const ConvParams &p, int reach, int taps, int rows, int windows) {
  const int max_threads = kRowThreads, smem_cap = kRowSmemBytes;
  RowPlan plan;
  RowTiling &tl = plan.tl;
  tl.one_channel = windows > 1;
  const int64_t ncols = (p.width + kCols - 1) / kCols, nrows = (p.height + rows - 1) / rows;
  tl.tiles_x = static_cast<int>((ncols + 15) / 16);
  tl.tx = static_cast<int>((ncols + tl.tiles_x - 1) / tl.tiles_x);
  tl.sw = 4 * (tl.tx + row_vecs(reach) - 1);
  const int64_t fit_rows = smem_cap / (4 * windows * tl.sw) - 2 * reach;  // >= 16 rows: sw <= 76, reach <= 5
  const int64_t ty_max = std::max<int64_t>(1, std::min<int64_t>(max_threads / tl.tx, fit_rows / rows));
  tl.tiles_y = static_cast<int>((nrows + ty_max - 1) / ty_max);
  tl.ty = static_cast<int>((nrows + tl.tiles_y - 1) / tl.tiles_y);
  tl.sh = tl.ty * rows + 2 * reach;
  const int tpp = tl.tx * tl.ty;
  const int64_t plane_floats = static_cast<int64_t>(windows) * tl.sh * tl.sw;
  const int64_t tiles = static_cast<int64_t>(tl.tiles_x) * tl.tiles_y;
  const int64_t per_group = tl.one_channel ? p.batch : p.batch * p.channels, groups_of_one = p.batch * p.channels;
  const int64_t min_blocks = 4 * static_cast<int64_t>(p.sm_count);
  // Backward: the windows' memory then holds the per-thread partial sums of the taps and the bias.
  const auto smem_floats = [&](int planes, int threads) {
    return std::max<int64_t>(planes * plane_floats, windows > 1 ? static_cast<int64_t>(taps + 1) * threads : 0);
  };
  int best = 1;
  double best_fill = 0;
  for (int planes = 1; planes * tpp <= max_threads && planes <= per_group; ++planes) {
    const int threads = (planes * tpp + 31) / 32 * 32;
    const int64_t floats = smem_floats(planes, threads);
    const int64_t blocks = tiles * (groups_of_one / per_group) * ((per_group + planes - 1) / planes);
    if (planes > 1 && (floats * 4 > smem_cap || blocks < min_blocks)) break;
    const double fill = static_cast<double>(planes * tpp) / threads;
    if (fill >= best_fill) {
      best = planes;
      best_fill = fill;
    }
  }
  tl.planes = best;
  plan.threads = (best * tpp + 31) / 32 * 32;
  plan.smem = static_cast<int>(4 * smem_floats(best, plan.threads));
  return plan;
}

template <typename Kernel>
void launch_rows(Kernel kernel, const RowPlan &plan, const ConvParams &p, cudaStream_t stream) {
  const int64_t per_group = plan.tl.one_channel ? p.batch : p.batch * p.channels;
  const int64_t groups = (p.batch * p.channels / per_group) * ((per_group + plan.tl.planes - 1) / plan.tl.planes);
  const int64_t blocks = static_cast<int64_t>(plan.tl.tiles_x) * plan.tl.tiles_y * groups;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "vssm_dwconv2d: ", blocks,
              " blocks are too many for one launch; split the batch");
  set_smem(kernel, plan.smem);
  kernel<<<static_cast<unsigned>(blocks), plan.threads, plan.smem, stream>>>(p, plan.tl);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Row-kernel forward. With up to 25 taps (64 accumulators and the weights fit in registers) planes taller than
// kSmallPlane take 16 rows per thread: fewer staged rows per output, which makes the state fusion 10-20% faster than
// 8 rows on an H200 at 28x28, 56x56 and 200x336. Smaller planes, and more taps, take 8: on small planes more threads
// then share the staging (30% faster at 14x14).
template <typename T, typename Taps>
void launch_rows_fwd(const ConvParams &p, cudaStream_t stream) {
  if constexpr (Taps::kCount <= 25) {
    if (p.height > kSmallPlane) {
      return launch_rows(dw_rows_fwd_kernel<T, Taps, 16>, plan_rows(p, Taps::kReach, Taps::kCount, 16, 1), p, stream);
    }
  }
  launch_rows(dw_rows_fwd_kernel<T, Taps, 8>, plan_rows(p, Taps::kReach, Taps::kCount, 8, 1), p, stream);
}

template <typename T, typename Taps>
void launch_tile_fwd(const ConvParams &p, cudaStream_t stream) {
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
void launch_tile_bwd(const ConvParams &p, cudaStream_t stream) {
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
}

// Backward row kernels take static tap sets of up to 49 taps: the per-tap sums, the weights and 8 x 4 accumulators
// stay in registers.
template <typename Taps>
constexpr bool rows_bwd() {
  if constexpr (Taps::kStatic) {
    return Taps::kCount <= 49;
  } else {
    return false;
  }
}

template <typename T, typename Taps>
void launch_fwd_taps(const ConvParams &p, cudaStream_t stream) {
  if constexpr (Taps::kStatic) {
    launch_rows_fwd<T, Taps>(p, stream);
  } else {
    launch_tile_fwd<T, Taps>(p, stream);
  }
}

template <typename T, typename Taps>
void launch_bwd_taps(const ConvParams &p, cudaStream_t stream) {
  if constexpr (rows_bwd<Taps>()) {
    if (p.height <= kSmallPlane && p.width <= kSmallPlane) {
      launch_tile_bwd<T, Taps>(p, stream);
    } else {
      launch_rows(dw_rows_bwd_kernel<T, Taps, 8>, plan_rows(p, Taps::kReach, Taps::kCount, 8, 2), p, stream);
    }
  } else {
    launch_tile_bwd<T, Taps>(p, stream);
  }
  if (p.replicate && fold_bands_fits(p)) {
    const int64_t work = std::max<int64_t>(2 * (p.height + p.width), border_pixels(p.height, p.width));
    const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(64, (work + 31) / 32 * 32)));
    const int bytes = fold_bands_floats(p.height, p.width, p.groups.reach) * static_cast<int>(sizeof(float));
    dw_fold_bands_kernel<T, Taps><<<static_cast<unsigned>(p.batch * p.channels), threads, bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (p.replicate) {
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
