// The build facts of the operator library. The kernels' schemas are not written here: Python defines them once, from
// each op's module (fastnas/ops/defs/<op>.py, the Kernel(schema) of each kernel), before it loads this library,
// which registers implementations only (TORCH_LIBRARY_IMPL in cpu/<op>.h, listed in cpu/cpu_ops.h, and
// cuda/<op>.cu). Fakes and autograd are registered from Python as well (fastnas/ops/backends/cpp.py).
#include <torch/library.h>

#include <cstdint>
#include <vector>

#ifdef FASTNAS_WITH_CUDA
namespace fastnas::cuda {
std::vector<int64_t> arch_list();  // cuda/arch_list.cu
}
#endif

namespace {
std::vector<int64_t> cuda_arch_list() {
#ifdef FASTNAS_WITH_CUDA
  return fastnas::cuda::arch_list();
#else
  return {};
#endif
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(fastnas, m) {
  // build facts: the CUDA architectures compiled in (empty without CUDA)
  m.def("cuda_arch_list() -> int[]", &cuda_arch_list);
}
