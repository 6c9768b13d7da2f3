// Registers the CPU kernels of the best capability this machine supports (FASTNAS_CPU_CAPABILITY=default forces the
// portable ones).
#include <torch/library.h>

#include "capability.h"

#include <cstdlib>
#include <cstring>

namespace fastnas::cpu {
namespace DEFAULT {
void register_impls(torch::Library& m);  // cpu_ops.h, compiled by ops_cpu_default.cpp
}
#if FASTNAS_HAVE_AVX2_KERNELS
namespace AVX2 {
void register_impls(torch::Library& m);  // cpu_ops.h, compiled by ops_cpu_avx2.cpp
}
#endif

const char* capability() {
  const char* forced = std::getenv("FASTNAS_CPU_CAPABILITY");
  if (forced != nullptr && std::strcmp(forced, "default") == 0) return "default";
#if FASTNAS_HAVE_AVX2_KERNELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return "avx2";
  }
#endif
  return "default";
}

}  // namespace fastnas::cpu

namespace {
std::string cpu_capability() { return fastnas::cpu::capability(); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(fastnas, m) {
  // build facts: which CPU kernels are in use ("avx2" or "default")
  m.def("cpu_capability() -> str", &cpu_capability);
}

TORCH_LIBRARY_IMPL(fastnas, CPU, m) {
#if FASTNAS_HAVE_AVX2_KERNELS
  if (std::strcmp(fastnas::cpu::capability(), "avx2") == 0) {
    fastnas::cpu::AVX2::register_impls(m);
    return;
  }
#endif
  fastnas::cpu::DEFAULT::register_impls(m);
}
