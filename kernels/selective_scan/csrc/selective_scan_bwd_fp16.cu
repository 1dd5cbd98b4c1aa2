// bwd instantiations for __half inputs (one translation unit per direction and dtype, built in parallel).
#include "selective_scan_bwd_kernel.cuh"

namespace vssm_scan {
template void launch_bwd<__half, 1>(const ScanParams &, cudaStream_t);
template void launch_bwd<__half, 4>(const ScanParams &, cudaStream_t);
template void launch_bwd<__half, kMaxState>(const ScanParams &, cudaStream_t);
template void launch_cross_bwd<__half, 1>(const ScanParams &, cudaStream_t);
template void launch_cross_bwd<__half, 4>(const ScanParams &, cudaStream_t);
template void launch_cross_bwd<__half, kMaxState>(const ScanParams &, cudaStream_t);
}  // namespace vssm_scan
