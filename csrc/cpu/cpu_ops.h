// The CPU operators, one header per op (kernel, host wrapper, registration). Included once per CPU capability
// (ops_cpu_default.cpp, ops_cpu_avx2.cpp), each copy in its own namespace; register_cpu.cpp registers the copy of the
// best capability the machine supports. A new op adds its header and its register_<op> call here.
#pragma once

#include <torch/library.h>

#include "batch_norm.h"
#include "channel_attention.h"
#include "channel_pool.h"
#include "depthwise_conv2d.h"
#include "depthwise_stack.h"
#include "edge_sums.h"
#include "mixed_sum.h"
#include "normalized_mixed_sum.h"
#include "pool2d.h"
#include "scale.h"
#include "scale_stack.h"
#include "single_channel_conv2d.h"
#include "spatial_pool.h"

namespace fastnas::cpu {
inline namespace CPU_CAPABILITY {

// the CPU kernels of this capability
void register_impls(torch::Library& m) {
  register_batch_norm(m);
  register_channel_attention(m);
  register_channel_pool(m);
  register_depthwise_conv2d(m);
  register_depthwise_stack(m);
  register_edge_sums(m);
  register_mixed_sum(m);
  register_normalized_mixed_sum(m);
  register_pool2d(m);
  register_scale(m);
  register_scale_stack(m);
  register_single_channel_conv2d(m);
  register_spatial_pool(m);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
