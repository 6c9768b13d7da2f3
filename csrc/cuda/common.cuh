// Shared by the CUDA kernels of the fastnas ops (csrc/cuda/<op>.cu): launch shapes and the warp-level (sum, max,
// first argmax) reduction. Math in at::opmath_type (float for half types, double for double). Every reduction is
// deterministic: fixed launch shapes that depend on the problem size only, warp-shuffle and shared-memory trees in a
// fixed order, and per-block partial sums added by a second pass (no float atomics).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <limits>
#include <vector>

#include "../common.h"

namespace fastnas::cuda {
namespace {

using at::Tensor;

constexpr c10::DeviceType kDev = c10::DeviceType::CUDA;
constexpr int kThreads = 256;
constexpr int kWarp = 32;

__host__ __device__ inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// blocks for a grid-stride loop over n elements
inline unsigned grid_for(int64_t n, int64_t per_block = kThreads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(divup(n, per_block), 65536)));
}

template <typename A>
__device__ __forceinline__ A sigmoid(A v) {
  return A(1) / (A(1) + ::exp(-v));
}

template <typename A>
__device__ __forceinline__ bool is_nan(A v) {
  return v != v;
}

// (sum, max, index of the first max). combine() is associative and independent of the order of the indices seen,
// so any fixed reduction tree gives the same result.
template <typename A>
struct Pool {
  A sum;
  A max;
  int arg;
};

template <typename A>
__device__ __forceinline__ Pool<A> combine(const Pool<A>& a, const Pool<A>& b) {
  Pool<A> r;
  r.sum = a.sum + b.sum;
  const bool an = is_nan(a.max), bn = is_nan(b.max);
  bool take_b;
  if (an || bn) {
    take_b = bn && (!an || b.arg < a.arg);
  } else {
    take_b = b.max > a.max || (b.max == a.max && b.arg < a.arg);
  }
  r.max = take_b ? b.max : a.max;
  r.arg = take_b ? b.arg : a.arg;
  return r;
}

// running update with element v at index i, larger than every index seen so far
template <typename A>
__device__ __forceinline__ void update(Pool<A>& p, A v, int i) {
  p.sum += v;
  if (p.arg == INT_MAX || (!is_nan(p.max) && (is_nan(v) || v > p.max))) {
    p.max = v;
    p.arg = i;
  }
}

template <typename A>
__device__ __forceinline__ Pool<A> empty_pool() {
  Pool<A> p;
  p.sum = A(0);
  p.max = -std::numeric_limits<A>::infinity();
  p.arg = INT_MAX;
  return p;
}

template <typename A>
__device__ __forceinline__ Pool<A> warp_reduce(Pool<A> p) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    Pool<A> o;
    o.sum = __shfl_down_sync(0xffffffffu, p.sum, off);
    o.max = __shfl_down_sync(0xffffffffu, p.max, off);
    o.arg = __shfl_down_sync(0xffffffffu, p.arg, off);
    p = combine(p, o);
  }
  return p;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace
}  // namespace fastnas::cuda
