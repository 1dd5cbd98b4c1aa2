// bwd instantiation for float (one translation unit per direction and dtype, built in parallel).
#include "dwconv2d_kernel.cuh"

namespace vssm_dwconv {
template void launch_bwd<float>(const ConvParams &, cudaStream_t);
}  // namespace vssm_dwconv
