// bwd instantiations for __nv_bfloat16 inputs (one translation unit per direction and dtype, built in parallel).
#include "selective_scan_bwd_kernel.cuh"

namespace vssm_scan {
template void launch_bwd<__nv_bfloat16, 1>(const ScanParams &, cudaStream_t);
template void launch_bwd<__nv_bfloat16, 4>(const ScanParams &, cudaStream_t);
template void launch_bwd<__nv_bfloat16, kMaxState>(const ScanParams &, cudaStream_t);
template void launch_cross_bwd<__nv_bfloat16, 1>(const ScanParams &, cudaStream_t);
template void launch_cross_bwd<__nv_bfloat16, 4>(const ScanParams &, cudaStream_t);
template void launch_cross_bwd<__nv_bfloat16, kMaxState>(const ScanParams &, cudaStream_t);
}  // namespace vssm_scan
