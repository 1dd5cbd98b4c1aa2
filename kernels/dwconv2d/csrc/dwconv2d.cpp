// Binding of the CUDA depthwise convolution over tap groups (see dwconv2d.h): input checks, dtype dispatch, and
//   torch.ops.vssm_dwconv2d.fwd / .bwd
// registered with TORCH_LIBRARY (fake implementations and autograd live in vssm/ops/dwconv2d.py).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>

#include "vssm_cuda.h"

#include "dwconv2d.h"

namespace vssm_dwconv {
namespace {

using vssm::OptTensor;

void check_tensor(const at::Tensor &t, const char *name, const at::Tensor &x) {
  TORCH_CHECK(t.is_cuda(), "vssm_dwconv2d: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), "vssm_dwconv2d: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.is_contiguous(), "vssm_dwconv2d: ", name,
              " must be contiguous (vssm.ops.dwconv2d makes its inputs contiguous)");
}

TapGroups make_groups(at::IntArrayRef ksizes, at::IntArrayRef dilations, const c10::List<bool> &skip_center) {
  TORCH_CHECK(!ksizes.empty() && ksizes.size() <= kMaxGroups, "vssm_dwconv2d: 1 to ", kMaxGroups,
              " tap groups are supported, got ", ksizes.size());
  TORCH_CHECK(dilations.size() == ksizes.size() && skip_center.size() == ksizes.size(),
              "vssm_dwconv2d: kernel_sizes, dilations and skip_center must have the same length");
  TapGroups g;
  g.count = static_cast<int>(ksizes.size());
  for (int k = 0; k < g.count; ++k) {
    TORCH_CHECK(ksizes[k] >= 1 && ksizes[k] % 2 == 1 && ksizes[k] <= 31, "vssm_dwconv2d: kernel sizes must be odd, 1..31, got ",
                ksizes[k]);
    TORCH_CHECK(dilations[k] >= 1, "vssm_dwconv2d: dilations must be >= 1, got ", dilations[k]);
    g.ksize[k] = static_cast<int>(ksizes[k]);
    g.dilation[k] = static_cast<int>(dilations[k]);
    g.skip_center[k] = skip_center.get(k);
    g.reach = std::max(g.reach, g.dilation[k] * (g.ksize[k] / 2));
    g.taps += g.ksize[k] * g.ksize[k] - (g.skip_center[k] ? 1 : 0);
  }
  return g;
}

ConvParams make_params(const at::Tensor &x, const at::Tensor &weight, const TapGroups &g, bool replicate,
                       int smem_bytes) {
  check_tensor(x, "x", x);
  TORCH_CHECK(x.dim() == 4, "vssm_dwconv2d: x must be (B, C, H, W), got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "vssm_dwconv2d: x must be float32, float16 or bfloat16, got ", dtype);
  check_tensor(weight, "weight", x);
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "vssm_dwconv2d: weight must be float32");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(1) && weight.size(1) == g.taps,
              "vssm_dwconv2d: weight must be (C, taps) = (", x.size(1), ", ", g.taps, "), got ", weight.sizes());
  TORCH_CHECK(x.size(0) <= 65535 && x.size(1) <= 65535, "vssm_dwconv2d: batch and channels must be <= 65535, got ",
              x.sizes());
  int device_limit = 0, sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&device_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, x.get_device()));
  TORCH_CHECK(smem_bytes <= device_limit, "vssm_dwconv2d: a reach of ", g.reach, " pixels needs ", smem_bytes,
              " bytes of shared memory per block, more than this GPU's ", device_limit,
              "; use backend='torch' for such kernels");
  ConvParams p{};
  p.batch = x.size(0);
  p.channels = x.size(1);
  p.height = x.size(2);
  p.width = x.size(3);
  p.tiles_x = static_cast<int>((p.width + kTileW - 1) / kTileW);
  p.tiles_y = static_cast<int>((p.height + kTileH - 1) / kTileH);
  p.groups = g;
  p.replicate = replicate;
  p.fusion = g.count == 3 && g.ksize[0] == 3 && g.ksize[1] == 3 && g.ksize[2] == 3 && g.dilation[0] == 1 &&
             g.dilation[1] == 3 && g.dilation[2] == 5 && !g.skip_center[0] && g.skip_center[1] && g.skip_center[2];
  p.sm_count = sm_count;
  p.x = x.data_ptr();
  p.weight = weight.data_ptr<float>();
  return p;
}

// Whether the kernels may read and write rows of these (B, C, H, W) tensors in 16-byte vectors.
bool vector_rows(std::initializer_list<const at::Tensor *> tensors) {
  bool ok = true;
  for (const at::Tensor *t : tensors) ok = ok && vssm::aligned16(*t) && (t->size(3) * t->element_size()) % 16 == 0;
  return ok;
}

template <bool kForward>
void dispatch(const ConvParams &p, at::ScalarType dtype) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (dtype) {
    case at::kFloat: kForward ? launch_fwd<float>(p, stream) : launch_bwd<float>(p, stream); break;
    case at::kHalf: kForward ? launch_fwd<__half>(p, stream) : launch_bwd<__half>(p, stream); break;
    default: kForward ? launch_fwd<__nv_bfloat16>(p, stream) : launch_bwd<__nv_bfloat16>(p, stream); break;
  }
}

at::Tensor dw_fwd(const at::Tensor &x, const at::Tensor &weight, const OptTensor &bias, at::IntArrayRef kernel_sizes,
                  at::IntArrayRef dilations, const c10::List<bool> &skip_center, bool replicate) {
  const TapGroups g = make_groups(kernel_sizes, dilations, skip_center);
  ConvParams p = make_params(x, weight, g, replicate, fwd_smem_bytes(g));
  if (bias.has_value()) {
    check_tensor(*bias, "bias", x);
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->sizes() == at::IntArrayRef{x.size(1)},
                "vssm_dwconv2d: bias must be float32 of shape (C,)");
    p.bias = bias->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  p.out = out.data_ptr();
  p.vec = vector_rows({&x, &out});
  if (x.numel() > 0) dispatch<true>(p, x.scalar_type());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_bwd(const at::Tensor &dout, const at::Tensor &x,
                                                      const at::Tensor &weight, at::IntArrayRef kernel_sizes,
                                                      at::IntArrayRef dilations, const c10::List<bool> &skip_center,
                                                      bool replicate, bool need_bias_grad) {
  const TapGroups g = make_groups(kernel_sizes, dilations, skip_center);
  ConvParams p = make_params(x, weight, g, replicate, bwd_smem_bytes(g));
  check_tensor(dout, "dout", x);
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type(),
              "vssm_dwconv2d: dout must match x in shape and dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dweight = at::zeros_like(weight);
  at::Tensor dbias = need_bias_grad ? at::zeros({x.size(1)}, weight.options()) : at::empty({0}, weight.options());
  p.dout = dout.data_ptr();
  p.dx = dx.data_ptr();
  p.dweight = dweight.data_ptr<float>();
  p.dbias = need_bias_grad ? dbias.data_ptr<float>() : nullptr;
  p.vec = vector_rows({&dout, &x, &dx});
  if (x.numel() > 0) dispatch<false>(p, x.scalar_type());
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace vssm_dwconv

TORCH_LIBRARY(vssm_dwconv2d, m) {
  m.def("fwd(Tensor x, Tensor weight, Tensor? bias, int[] kernel_sizes, int[] dilations, bool[] skip_center, "
        "bool replicate) -> Tensor");
  m.def("bwd(Tensor dout, Tensor x, Tensor weight, int[] kernel_sizes, int[] dilations, bool[] skip_center, "
        "bool replicate, bool need_bias_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vssm_dwconv2d, CUDA, m) {
  m.impl("fwd", &vssm_dwconv::dw_fwd);
  m.impl("bwd", &vssm_dwconv::dw_bwd);
}

VSSM_PYTHON_MODULE(vssm_dwconv2d, "CUDA depthwise conv and state fusion; operators in torch.ops.vssm_dwconv2d")
