// Binding of the CUDA selective scan: input checks, dtype dispatch, and the operators
//   torch.ops.vssm_selective_scan.fwd / .bwd / .cross_fwd / .cross_bwd
// registered with TORCH_LIBRARY (fake implementations and autograd live in vssm/ops/selective_scan.py).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "vssm_cuda.h"

#include "selective_scan.h"

namespace vssm_scan {
namespace {

using vssm::OptTensor;

void check_tensor(const at::Tensor &t, const char *name, const at::Tensor &u) {
  TORCH_CHECK(t.is_cuda(), "vssm_selective_scan: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == u.device(), "vssm_selective_scan: ", name, " is on ", t.device(), " but u is on ",
              u.device());
  TORCH_CHECK(t.is_contiguous(), "vssm_selective_scan: ", name,
              " must be contiguous (vssm.ops.selective_scan makes its inputs contiguous)");
}

void check_shape(const at::Tensor &t, const char *name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "vssm_selective_scan: ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

using vssm::aligned16;

// A (D, N), D and delta_bias (D,): float32, on u's device; returns N.
int64_t check_channel_params(const at::Tensor &A, const OptTensor &D, const OptTensor &delta_bias, int64_t dim,
                             const at::Tensor &u) {
  check_tensor(A, "A", u);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, "vssm_selective_scan: A must be (D, N) with D = ", dim, ", got ",
              A.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat, "vssm_selective_scan: A must be float32");
  const int64_t nstate = A.size(1);
  TORCH_CHECK(nstate >= 1 && nstate <= vssm_scan::kMaxState, "vssm_selective_scan: the state size N must be in 1..",
              vssm_scan::kMaxState, ", got ", nstate);
  for (const auto &[opt, name] : {std::make_pair(&D, "D"), std::make_pair(&delta_bias, "delta_bias")}) {
    if (opt->has_value()) {
      check_tensor(**opt, name, u);
      check_shape(**opt, name, {dim});
      TORCH_CHECK((*opt)->scalar_type() == at::kFloat, "vssm_selective_scan: ", name, " must be float32");
    }
  }
  return nstate;
}

struct Checked {
  ScanParams p{};
  at::ScalarType dtype;
};

Checked check_inputs(const at::Tensor &u, const at::Tensor &delta, const at::Tensor &A, const at::Tensor &B,
                     const OptTensor &C, const OptTensor &D, const OptTensor &delta_bias, bool delta_softplus) {
  Checked c;
  check_tensor(u, "u", u);
  TORCH_CHECK(u.dim() == 3, "vssm_selective_scan: u must be (Bt, D, L), got ", u.sizes());
  c.dtype = u.scalar_type();
  TORCH_CHECK(c.dtype == at::kFloat || c.dtype == at::kHalf || c.dtype == at::kBFloat16,
              "vssm_selective_scan: u must be float32, float16 or bfloat16, got ", c.dtype);
  const int64_t bt = u.size(0), dim = u.size(1), length = u.size(2);
  check_tensor(delta, "delta", u);
  check_shape(delta, "delta", u.sizes());
  TORCH_CHECK(delta.scalar_type() == c.dtype, "vssm_selective_scan: delta must have u's dtype ", c.dtype);
  const int64_t nstate = check_channel_params(A, D, delta_bias, dim, u);
  check_tensor(B, "B", u);
  TORCH_CHECK(B.dim() == 4 && B.size(0) == bt && B.size(2) == nstate && B.size(3) == length,
              "vssm_selective_scan: B must be (Bt, G, N, L) = (", bt, ", G, ", nstate, ", ", length, "), got ",
              B.sizes());
  TORCH_CHECK(B.scalar_type() == c.dtype, "vssm_selective_scan: B must have u's dtype ", c.dtype);
  const int64_t groups = B.size(1);
  TORCH_CHECK(groups >= 1 && dim % groups == 0, "vssm_selective_scan: D = ", dim,
              " must be divisible by the number of B/C groups ", groups);
  if (C.has_value()) {
    check_tensor(*C, "C", u);
    check_shape(*C, "C", B.sizes());
    TORCH_CHECK(C->scalar_type() == c.dtype, "vssm_selective_scan: C must have u's dtype ", c.dtype);
  }
  TORCH_CHECK(C.has_value() || !D.has_value(), "vssm_selective_scan: D needs C (the output-returning form)");

  ScanParams &p = c.p;
  p.batch = bt;
  p.dim = dim;
  p.length = length;
  p.groups = groups;
  p.dstate = nstate;
  p.n_chunks = (length + kChunk - 1) / kChunk;
  p.has_c = C.has_value();
  p.has_d = D.has_value();
  p.has_bias = delta_bias.has_value();
  p.softplus = delta_softplus;
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.B = B.data_ptr();
  p.C = p.has_c ? C->data_ptr() : nullptr;
  p.A = A.data_ptr<float>();
  p.Ds = p.has_d ? D->data_ptr<float>() : nullptr;
  p.delta_bias = p.has_bias ? delta_bias->data_ptr<float>() : nullptr;
  p.bc_stride = nstate * length;
  p.dbc_stride = nstate * length;
  const int64_t elems_per_16b = 16 / static_cast<int64_t>(u.element_size());
  p.vec = length % elems_per_16b == 0 && length % 4 == 0 && aligned16(u) && aligned16(delta) && aligned16(B) &&
          (!p.has_c || aligned16(*C));
  return c;
}

enum class Pass { kForward, kBackward, kCrossForward, kCrossBackward };

template <typename T, int kN>
void launch(const ScanParams &p, Pass pass, cudaStream_t stream) {
  switch (pass) {
    case Pass::kForward: launch_fwd<T, kN>(p, stream); break;
    case Pass::kBackward: launch_bwd<T, kN>(p, stream); break;
    case Pass::kCrossForward: launch_cross_fwd<T, kN>(p, stream); break;
    default: launch_cross_bwd<T, kN>(p, stream); break;
  }
}

template <typename T>
void dispatch_n(const ScanParams &p, Pass pass, cudaStream_t stream) {
  if (p.dstate == 1) {
    launch<T, 1>(p, pass, stream);
  } else if (p.dstate <= 4) {
    launch<T, 4>(p, pass, stream);
  } else {
    launch<T, kMaxState>(p, pass, stream);
  }
}

void dispatch(const Checked &c, Pass pass) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (c.dtype) {
    case at::kFloat: dispatch_n<float>(c.p, pass, stream); break;
    case at::kHalf: dispatch_n<__half>(c.p, pass, stream); break;
    default: dispatch_n<__nv_bfloat16>(c.p, pass, stream); break;
  }
}

std::tuple<at::Tensor, at::Tensor> scan_fwd(const at::Tensor &u, const at::Tensor &delta, const at::Tensor &A,
                                            const at::Tensor &B, const OptTensor &C, const OptTensor &D,
                                            const OptTensor &delta_bias, bool delta_softplus) {
  Checked c = check_inputs(u, delta, A, B, C, D, delta_bias, delta_softplus);
  const c10::cuda::CUDAGuard guard(u.device());
  const auto f32 = u.options().dtype(at::kFloat);
  ScanParams &p = c.p;
  at::Tensor out = p.has_c ? at::empty({p.batch, p.dim, p.length}, f32)
                           : at::empty({p.batch, p.dim, p.dstate, p.length}, f32);
  at::Tensor chunk_states = at::empty({p.batch, p.dim, p.n_chunks, p.dstate}, f32);
  p.out = out.data_ptr<float>();
  p.chunk_states = chunk_states.data_ptr<float>();
  p.vec = p.vec && aligned16(out);
  if (p.batch * p.dim > 0 && p.length > 0) dispatch(c, Pass::kForward);
  return {out, chunk_states};
}

// The gradients of A, D and delta_bias: the kernels write one per (batch, channel) row, summed over the batch here.
struct RowGradients {
  at::Tensor dA, dD, dbias;
  RowGradients(ScanParams &p, const at::TensorOptions &f32)
      : dA(at::empty({p.batch, p.dim, p.dstate}, f32)),
        dD(p.has_d ? at::empty({p.batch, p.dim}, f32) : at::empty({0}, f32)),
        dbias(p.has_bias ? at::empty({p.batch, p.dim}, f32) : at::empty({0}, f32)) {
    p.dA_rows = dA.data_ptr<float>();
    p.dD_rows = p.has_d ? dD.data_ptr<float>() : nullptr;
    p.dbias_rows = p.has_bias ? dbias.data_ptr<float>() : nullptr;
  }
  // The backward pass over these rows, or zeros where there is nothing to scan (empty rows).
  void run(const Checked &c, Pass pass) {
    const ScanParams &p = c.p;
    if (p.batch * p.dim > 0 && p.length > 0) {
      dispatch(c, pass);
    } else {
      dA.zero_();
      dD.zero_();
      dbias.zero_();
    }
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> sums(const ScanParams &p) const {
    return {dA.sum(0), p.has_d ? dD.sum(0) : dD, p.has_bias ? dbias.sum(0) : dbias};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_bwd(
    const at::Tensor &u, const at::Tensor &delta, const at::Tensor &A, const at::Tensor &B, const OptTensor &C,
    const OptTensor &D, const OptTensor &delta_bias, const at::Tensor &dout, const at::Tensor &chunk_states,
    bool delta_softplus) {
  Checked c = check_inputs(u, delta, A, B, C, D, delta_bias, delta_softplus);
  ScanParams &p = c.p;
  check_tensor(dout, "dout", u);
  TORCH_CHECK(dout.scalar_type() == at::kFloat, "vssm_selective_scan: dout must be float32 (the output's dtype)");
  if (p.has_c) {
    check_shape(dout, "dout", {p.batch, p.dim, p.length});
  } else {
    check_shape(dout, "dout", {p.batch, p.dim, p.dstate, p.length});
  }
  check_tensor(chunk_states, "chunk_states", u);
  check_shape(chunk_states, "chunk_states", {p.batch, p.dim, p.n_chunks, p.dstate});
  const c10::cuda::CUDAGuard guard(u.device());
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor du = at::empty_like(u), ddelta = at::empty_like(delta);
  at::Tensor dB = at::zeros(B.sizes(), f32);
  at::Tensor dC = p.has_c ? at::zeros(B.sizes(), f32) : at::empty({0}, f32);
  RowGradients rows(p, f32);
  p.dout = dout.data_ptr<float>();
  p.chunk_states = const_cast<float *>(chunk_states.data_ptr<float>());
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dB = dB.data_ptr<float>();
  p.dC = p.has_c ? dC.data_ptr<float>() : nullptr;
  p.vec = p.vec && aligned16(dout) && aligned16(du) && aligned16(ddelta);
  rows.run(c, Pass::kBackward);
  const auto [dA, dD, dbias] = rows.sums(p);
  return {du, ddelta, dA, dB, dC, dD, dbias};
}

// The cross form (selective_scan.h): x (Bt, Dx, L); index (Bt or 1, K, L) int64; dt_weight (K * Dx, R) float32; dbl
// (Bt, K, R + 2N, L) in each sequence's step order: the low-rank step inputs, then B and C; A (K * Dx, N).
Checked check_cross_inputs(const at::Tensor &x, const at::Tensor &index, const at::Tensor &dt_weight,
                           const at::Tensor &A, const at::Tensor &dbl, const OptTensor &D, const OptTensor &delta_bias,
                           bool delta_softplus) {
  check_tensor(x, "x", x);
  TORCH_CHECK(x.dim() == 3, "vssm_selective_scan: x must be (Bt, D, L), got ", x.sizes());
  Checked c;
  c.dtype = x.scalar_type();
  TORCH_CHECK(c.dtype == at::kFloat || c.dtype == at::kHalf || c.dtype == at::kBFloat16,
              "vssm_selective_scan: x must be float32, float16 or bfloat16, got ", c.dtype);
  const int64_t bt = x.size(0), dim = x.size(1), length = x.size(2);
  check_tensor(index, "index", x);
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 3 && (index.size(0) == 1 || index.size(0) == bt) &&
              index.size(2) == length, "vssm_selective_scan: index must be int64 (Bt or 1, K, L) with Bt = ", bt,
              ", L = ", length, ", got ", index.scalar_type(), " ", index.sizes());
  TORCH_CHECK(length < (int64_t{1} << 31), "vssm_selective_scan: the cross form takes sequences below 2^31 steps, got ",
              length);
  const int64_t k = index.size(1);
  check_tensor(dt_weight, "dt_weight", x);
  TORCH_CHECK(dt_weight.scalar_type() == at::kFloat && dt_weight.dim() == 2 && dt_weight.size(0) == k * dim,
              "vssm_selective_scan: dt_weight must be float32 (K * D, R) with K * D = ", k * dim, ", got ",
              dt_weight.scalar_type(), " ", dt_weight.sizes());
  const int64_t n_rank = dt_weight.size(1);
  const int64_t nstate = check_channel_params(A, D, delta_bias, k * dim, x);
  check_tensor(dbl, "dbl", x);
  check_shape(dbl, "dbl", {bt, k, n_rank + 2 * nstate, length});
  TORCH_CHECK(dbl.scalar_type() == c.dtype, "vssm_selective_scan: dbl must have x's dtype ", c.dtype);
  ScanParams &p = c.p;
  p.batch = bt;
  p.dim = k * dim;
  p.length = length;
  p.groups = k;
  p.dstate = nstate;
  p.n_chunks = (length + kChunk - 1) / kChunk;
  p.has_c = true;
  p.has_d = D.has_value();
  p.has_bias = delta_bias.has_value();
  p.softplus = delta_softplus;
  // rows 16-byte aligned (float32 maps and 16-bit or float32 inputs): aligned runs of a lane's entries are moved
  // with vector instructions
  p.vec = length % 8 == 0 && aligned16(x) && aligned16(dbl);
  p.u = x.data_ptr();
  p.delta = dbl.data_ptr();
  p.dt_weight = dt_weight.data_ptr<float>();
  p.n_rank = n_rank;
  const int64_t row_bytes = length * static_cast<int64_t>(x.element_size());
  p.B = static_cast<const char *>(dbl.data_ptr()) + n_rank * row_bytes;
  p.C = static_cast<const char *>(dbl.data_ptr()) + (n_rank + nstate) * row_bytes;
  p.bc_stride = (n_rank + 2 * nstate) * length;
  p.A = A.data_ptr<float>();
  p.Ds = p.has_d ? D->data_ptr<float>() : nullptr;
  p.delta_bias = p.has_bias ? delta_bias->data_ptr<float>() : nullptr;
  p.index = index.data_ptr<int64_t>();
  p.index_batch_stride = index.size(0) == 1 ? 0 : k * length;
  return c;
}

// Returns the (Bt, Dx, L) float32 sum of the sequences' outputs and, when keep_states, the chunk states
// (Bt, K * Dx, n_chunks, N) for the backward (else an empty tensor).
std::tuple<at::Tensor, at::Tensor> scan_cross_fwd(const at::Tensor &x, const at::Tensor &index,
                                                  const at::Tensor &dt_weight, const at::Tensor &A,
                                                  const at::Tensor &dbl, const OptTensor &D,
                                                  const OptTensor &delta_bias, bool delta_softplus, bool keep_states) {
  Checked c = check_cross_inputs(x, index, dt_weight, A, dbl, D, delta_bias, delta_softplus);
  const c10::cuda::CUDAGuard guard(x.device());
  ScanParams &p = c.p;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor out = at::zeros(x.sizes(), f32);
  at::Tensor chunk_states = keep_states ? at::empty({p.batch, p.dim, p.n_chunks, p.dstate}, f32) : at::empty({0}, f32);
  p.out = out.data_ptr<float>();
  p.chunk_states = keep_states ? chunk_states.data_ptr<float>() : nullptr;
  if (p.batch * p.dim > 0 && p.length > 0) dispatch(c, Pass::kCrossForward);
  return {out, chunk_states};
}

// The gradients of the cross form for dout (Bt, Dx, L) float32, all float32: dx (Bt, Dx, L), ddelta (Bt, K * Dx, L),
// the raw step sizes' gradient in step order (the caller forms dt_weight's and the low-rank inputs' from it with two
// GEMMs), dA (K * Dx, N), ddbl (Bt, K, R + 2N, L) in step order (dB and dC; its R rows zero), dD and dbias (K * Dx,)
// (empty when D or delta_bias is absent).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_cross_bwd(
    const at::Tensor &x, const at::Tensor &index, const at::Tensor &dt_weight, const at::Tensor &A,
    const at::Tensor &dbl, const OptTensor &D, const OptTensor &delta_bias, const at::Tensor &dout,
    const at::Tensor &chunk_states, bool delta_softplus) {
  Checked c = check_cross_inputs(x, index, dt_weight, A, dbl, D, delta_bias, delta_softplus);
  ScanParams &p = c.p;
  check_tensor(dout, "dout", x);
  TORCH_CHECK(dout.scalar_type() == at::kFloat, "vssm_selective_scan: dout must be float32 (the output's dtype)");
  check_shape(dout, "dout", x.sizes());
  check_tensor(chunk_states, "chunk_states", x);
  check_shape(chunk_states, "chunk_states", {p.batch, p.dim, p.n_chunks, p.dstate});
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  // dx and dB/dC receive atomic adds; every step's ddelta is stored once
  at::Tensor dx = at::zeros(x.sizes(), f32), ddelta = at::empty({p.batch, p.dim, p.length}, f32);
  at::Tensor ddbl = at::zeros(dbl.sizes(), f32);
  RowGradients rows(p, f32);
  p.dout = dout.data_ptr<float>();
  p.chunk_states = const_cast<float *>(chunk_states.data_ptr<float>());
  p.du = dx.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dB = ddbl.data_ptr<float>() + p.n_rank * p.length;
  p.dC = p.dB + p.dstate * p.length;
  p.dbc_stride = p.bc_stride;
  p.vec = p.vec && aligned16(dout);
  rows.run(c, Pass::kCrossBackward);
  const auto [dA, dD, dbias] = rows.sums(p);
  return {dx, ddelta, dA, ddbl, dD, dbias};
}

}  // namespace
}  // namespace vssm_scan

TORCH_LIBRARY(vssm_selective_scan, m) {
  m.def("fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor? C, Tensor? D, Tensor? delta_bias, "
        "bool delta_softplus) -> (Tensor, Tensor)");
  m.def("bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor? C, Tensor? D, Tensor? delta_bias, Tensor dout, "
        "Tensor chunk_states, bool delta_softplus) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cross_fwd(Tensor x, Tensor index, Tensor dt_weight, Tensor A, Tensor dbl, Tensor? D, Tensor? delta_bias, "
        "bool delta_softplus, bool keep_states) -> (Tensor, Tensor)");
  m.def("cross_bwd(Tensor x, Tensor index, Tensor dt_weight, Tensor A, Tensor dbl, Tensor? D, Tensor? delta_bias, "
        "Tensor dout, Tensor chunk_states, bool delta_softplus) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vssm_selective_scan, CUDA, m) {
  m.impl("fwd", &vssm_scan::scan_fwd);
  m.impl("bwd", &vssm_scan::scan_bwd);
  m.impl("cross_fwd", &vssm_scan::scan_cross_fwd);
  m.impl("cross_bwd", &vssm_scan::scan_cross_bwd);
}

VSSM_PYTHON_MODULE(vssm_selective_scan, "CUDA selective scan; operators in torch.ops.vssm_selective_scan")
