// bwd instantiation for __nv_bfloat16 (one translation unit per direction and dtype, built in parallel).
#include "dwconv2d_kernel.cuh"

namespace vssm_dwconv {
template void launch_bwd<__nv_bfloat16>(const ConvParams &, cudaStream_t);
}  // namespace vssm_dwconv
