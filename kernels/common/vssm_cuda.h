// Pieces shared by the vssm CUDA extensions (each kernels/<op> folder adds kernels/common to its include path).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef __CUDACC_RTC__
#include <optional>

#include <ATen/core/Tensor.h>

namespace vssm {

// Optional tensor arguments of the operators (torch >= 2.4 takes std::optional).
using OptTensor = std::optional<at::Tensor>;

inline bool aligned16(const at::Tensor &t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

}  // namespace vssm
#endif

#ifdef __CUDACC__
namespace vssm {

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

}  // namespace vssm
#endif

// `import <name>` loads the extension library, whose TORCH_LIBRARY blocks register its operators.
#define VSSM_PYTHON_MODULE(name, doc)                                                                     \
  extern "C" PyObject *PyInit_##name(void) {                                                            \
    static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, #name, doc, -1, nullptr};                  \
    return PyModule_Create(&module_def);                                                                 \
  }
