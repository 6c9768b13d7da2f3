// Build facts of the CUDA kernels: the architectures nvcc compiled them for (read by csrc/fastnas.cpp).
#include <cstdint>
#include <vector>

namespace fastnas::cuda {

std::vector<int64_t> arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return {__CUDA_ARCH_LIST__};
#else
  return {};
#endif
}

}  // namespace fastnas::cuda
