// CUDA implementations of the fastnas operators. Math in at::opmath_type (float for half types, double for double).
// Every reduction is deterministic: fixed launch shapes that depend on the problem size only, warp-shuffle and
// shared-memory trees in a fixed order, and per-block partial sums added by a second pass (no float atomics).
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

std::vector<int64_t> arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return {__CUDA_ARCH_LIST__};
#else
  return {};
#endif
}

namespace {

using at::Tensor;

constexpr c10::DeviceType kDev = c10::DeviceType::CUDA;
constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kMaxK = 16;  // inputs of mixed_sum per kernel launch (more are processed in groups)

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

// -------------------------------------------------------------------------------------------------- mixed_sum

template <typename T>
struct Ptrs {
  const T* p[kMaxK];
};

template <typename T>
struct MutPtrs {
  T* p[kMaxK];
};

// out = (acc_in ? acc_in : 0) + sum_k w[k] xs[k]
template <typename T, typename A, typename TO>
__global__ void mixed_sum_fwd_kernel(Ptrs<T> xs, const A* __restrict__ w, int K, const A* acc_in, TO* out,
                                     int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    A acc = acc_in ? acc_in[i] : A(0);
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      if (k < K) acc += static_cast<A>(xs.p[k][i]) * w[k];
    }
    out[i] = static_cast<TO>(acc);
  }
}

// One group of up to kMaxK inputs: gx[k] = w[k] g (if want_x), partial[block, k] = this block's sum of g xs[k]
// (if want_w). Fixed grid, fixed per-thread element sets, fixed reduction tree: deterministic.
template <typename T, typename A>
__global__ void mixed_sum_bwd_kernel(const T* __restrict__ g, Ptrs<T> xs, const A* __restrict__ w, MutPtrs<T> gx,
                                     int K, bool want_x, bool want_w, A* partial, int64_t n) {
  A acc[kMaxK];
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) acc[k] = A(0);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const A gi = static_cast<A>(g[i]);
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      if (k < K) {
        if (want_x) gx.p[k][i] = static_cast<T>(gi * w[k]);
        if (want_w) acc[k] += gi * static_cast<A>(xs.p[k][i]);
      }
    }
  }
  if (!want_w) return;
  __shared__ A smem[kThreads / kWarp][kMaxK];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    if (k < K) {
      A v = warp_sum(acc[k]);
      if (lane == 0) smem[warp][k] = v;
    }
  }
  __syncthreads();
  if (threadIdx.x < K) {
    A s = A(0);
    for (int j = 0; j < int(blockDim.x / kWarp); ++j) s += smem[j][threadIdx.x];
    partial[int64_t(blockIdx.x) * K + threadIdx.x] = s;
  }
}

// gw[k] = sum over blocks of partial[b, k], one block per k, fixed order.
template <typename A>
__global__ void sum_partials_kernel(const A* __restrict__ partial, int64_t blocks, int K, A* gw) {
  const int k = blockIdx.x;
  A s = A(0);
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) s += partial[b * K + k];
  __shared__ A smem[kThreads / kWarp];
  s = warp_sum(s);
  if (threadIdx.x % kWarp == 0) smem[threadIdx.x / kWarp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    A t = A(0);
    for (int j = 0; j < int(blockDim.x / kWarp); ++j) t += smem[j];
    gw[k] = t;
  }
}

Tensor mixed_sum(at::TensorList xs, const Tensor& weights) {
  check_mixed_sum(xs, weights);
  check_device_type("mixed_sum", "xs[0]", xs[0], kDev);
  c10::cuda::CUDAGuard guard(xs[0].device());
  Tensor out = at::empty_like(xs[0]);
  const int64_t n = out.numel();
  if (n == 0) return out;
  std::vector<Tensor> xd;
  for (const Tensor& x : xs) xd.push_back(with_strides_of(x, out));
  Tensor w = weights.to(acc_dtype(out.scalar_type())).contiguous();
  const int K = static_cast<int>(xs.size());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fastnas::mixed_sum_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const A* wp = w.const_data_ptr<A>();
    Tensor acc;  // only when K > kMaxK: the running sum between groups
    if (K > kMaxK) acc = at::empty({n}, w.options());
    for (int k0 = 0; k0 < K; k0 += kMaxK) {
      const int kn = std::min(kMaxK, K - k0);
      Ptrs<scalar_t> p{};
      for (int k = 0; k < kn; ++k) p.p[k] = xd[k0 + k].const_data_ptr<scalar_t>();
      const A* acc_in = k0 == 0 ? nullptr : acc.const_data_ptr<A>();
      if (k0 + kn == K) {
        mixed_sum_fwd_kernel<scalar_t, A, scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
            p, wp + k0, kn, acc_in, out.data_ptr<scalar_t>(), n);
      } else {
        mixed_sum_fwd_kernel<scalar_t, A, A><<<grid_for(n), kThreads, 0, stream>>>(p, wp + k0, kn, acc_in,
                                                                                   acc.data_ptr<A>(), n);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

std::tuple<std::vector<Tensor>, Tensor> mixed_sum_bwd_impl(const Tensor& grad, at::TensorList xs,
                                                           const Tensor& weights, bool need_xs_grad) {
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t K = weights.size(0);
  std::vector<Tensor> gxs;
  if (need_xs_grad) {
    for (int64_t k = 0; k < K; ++k) gxs.push_back(at::empty_like(grad));
  }
  Tensor like = !gxs.empty() ? gxs[0] : grad.is_non_overlapping_and_dense() ? grad : at::empty_like(grad);
  const bool want_w = !xs.empty();
  const auto acc = acc_dtype(grad.scalar_type());
  Tensor gw_acc = at::zeros({want_w ? K : 0}, grad.options().dtype(acc));
  const int64_t n = grad.numel();
  if (n > 0 && (need_xs_grad || want_w) && K > 0) {
    Tensor g = with_strides_of(grad, like);
    std::vector<Tensor> xd;
    for (const Tensor& x : xs) xd.push_back(with_strides_of(x, like));
    Tensor w = weights.to(acc).contiguous();
    auto stream = c10::cuda::getCurrentCUDAStream();
    // enough blocks to fill the GPU, few enough that the partials stay small; depends on n only
    const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(divup(n, kThreads * 8), 1024)));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "fastnas::mixed_sum_backward_cuda",
                                    [&] {
      using A = at::opmath_type<scalar_t>;
      Tensor partial = at::empty({int64_t(blocks) * kMaxK}, w.options());
      for (int64_t k0 = 0; k0 < K; k0 += kMaxK) {
        const int kn = static_cast<int>(std::min<int64_t>(kMaxK, K - k0));
        Ptrs<scalar_t> xp{};
        MutPtrs<scalar_t> gp{};
        for (int k = 0; k < kn; ++k) {
          if (want_w) xp.p[k] = xd[k0 + k].const_data_ptr<scalar_t>();
          if (need_xs_grad) gp.p[k] = gxs[k0 + k].data_ptr<scalar_t>();
        }
        mixed_sum_bwd_kernel<scalar_t, A><<<blocks, kThreads, 0, stream>>>(
            g.const_data_ptr<scalar_t>(), xp, w.const_data_ptr<A>() + k0, gp, kn, need_xs_grad, want_w,
            partial.data_ptr<A>(), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (want_w) {
          sum_partials_kernel<A><<<kn, kThreads, 0, stream>>>(partial.const_data_ptr<A>(), blocks, kn,
                                                             gw_acc.data_ptr<A>() + k0);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  }
  Tensor gw = want_w ? at::empty_like(weights) : at::empty({0}, weights.options());
  if (want_w) gw.copy_(gw_acc);
  return {gxs, gw};
}

std::tuple<std::vector<Tensor>, Tensor> mixed_sum_backward(const Tensor& grad, at::TensorList xs,
                                                           const Tensor& weights, bool need_xs_grad) {
  check_mixed_sum_backward(grad, xs, weights, kDev);
  return mixed_sum_bwd_impl(grad, xs, weights, need_xs_grad);
}

std::vector<Tensor> mixed_sum_backward_xs(const Tensor& grad, const Tensor& weights) {
  check_mixed_sum_backward_xs(grad, weights, kDev);
  return std::get<0>(mixed_sum_bwd_impl(grad, {}, weights, true));
}

// -------------------------------------------------------------------------------------------------- channel_pool

// NCHW: one warp per row of HW elements.
template <typename T, typename A>
__global__ void channel_pool_nchw_kernel(const T* __restrict__ x, T* avg, T* mx, int* arg, int64_t rows,
                                         int64_t hw) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp; r < rows; r += warps) {
    const T* p = x + r * hw;
    Pool<A> acc = empty_pool<A>();
    for (int64_t i = lane; i < hw; i += kWarp) update(acc, static_cast<A>(p[i]), static_cast<int>(i));
    acc = warp_reduce(acc);
    if (lane == 0) {
      avg[r] = static_cast<T>(acc.sum / A(hw));
      mx[r] = static_cast<T>(acc.max);
      arg[r] = acc.arg;
    }
  }
}

// NHWC: a block of (32 channels) x (kThreads / 32 position groups) per (n, channel tile).
template <typename T, typename A>
__global__ void channel_pool_nhwc_kernel(const T* __restrict__ x, T* avg, T* mx, int* arg, int64_t N, int64_t C,
                                         int64_t HW) {
  constexpr int kGroups = kThreads / kWarp;
  __shared__ A s_sum[kGroups][kWarp];
  __shared__ A s_max[kGroups][kWarp];
  __shared__ int s_arg[kGroups][kWarp];
  const int64_t tiles = divup(C, kWarp);
  const int lane = threadIdx.x % kWarp, grp = threadIdx.x / kWarp;
  for (int64_t t = blockIdx.x; t < N * tiles; t += gridDim.x) {
    const int64_t n = t / tiles, c = (t % tiles) * kWarp + lane;
    Pool<A> acc = empty_pool<A>();
    if (c < C) {
      for (int64_t h = grp; h < HW; h += kGroups) update(acc, static_cast<A>(x[(n * HW + h) * C + c]), int(h));
    }
    s_sum[grp][lane] = acc.sum;
    s_max[grp][lane] = acc.max;
    s_arg[grp][lane] = acc.arg;
    __syncthreads();
    if (grp == 0 && c < C) {
      for (int j = 1; j < kGroups; ++j) acc = combine(acc, Pool<A>{s_sum[j][lane], s_max[j][lane], s_arg[j][lane]});
      avg[n * C + c] = static_cast<T>(acc.sum / A(HW));
      mx[n * C + c] = static_cast<T>(acc.max);
      arg[n * C + c] = acc.arg;
    }
    __syncthreads();
  }
}

// grad x = ga / HW + (hw == arg) gm, over the elements of the output in its layout
template <typename T, typename A>
__global__ void channel_pool_bwd_kernel(const T* __restrict__ ga, const T* __restrict__ gm,
                                        const int* __restrict__ arg, T* out, int64_t C, int64_t HW, bool nhwc,
                                        int64_t total) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t nc, hw;
    if (nhwc) {
      const int64_t c = i % C, nhw = i / C;
      hw = nhw % HW;
      nc = (nhw / HW) * C + c;
    } else {
      hw = i % HW;
      nc = i / HW;
    }
    A v = static_cast<A>(ga[nc]) / A(HW);
    if (hw == arg[nc]) v += static_cast<A>(gm[nc]);
    out[i] = static_cast<T>(v);
  }
}

std::tuple<Tensor, Tensor, Tensor> channel_pool(const Tensor& x_in) {
  check_channel_pool(x_in);
  check_device_type("channel_pool", "x", x_in, kDev);
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  TORCH_CHECK_VALUE(HW < INT_MAX, "fastnas.channel_pool: H*W must be below 2^31");
  Tensor avg = at::empty({N, C}, x_in.options());
  Tensor mx = at::empty({N, C}, x_in.options());
  Tensor arg = at::empty({N, C}, x_in.options().dtype(at::kInt));
  if (N * C == 0) return {avg, mx, arg};
  const Layout L = layout_of(x_in);
  Tensor x = in_layout(x_in, L);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::channel_pool_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    if (L == Layout::NCHW) {
      channel_pool_nchw_kernel<scalar_t, A><<<grid_for(N * C, kThreads / kWarp), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), avg.data_ptr<scalar_t>(), mx.data_ptr<scalar_t>(), arg.data_ptr<int>(),
          N * C, HW);
    } else {
      channel_pool_nhwc_kernel<scalar_t, A><<<grid_for(N * divup(C, kWarp), 1), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), avg.data_ptr<scalar_t>(), mx.data_ptr<scalar_t>(), arg.data_ptr<int>(), N, C,
          HW);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {avg, mx, arg};
}

Tensor channel_pool_backward(const Tensor& grad_avg, const Tensor& grad_max, const Tensor& argmax, int64_t H,
                             int64_t W, bool channels_last) {
  check_float("channel_pool", "grad_avg", grad_avg);
  check_device_type("channel_pool", "grad_avg", grad_avg, kDev);
  TORCH_CHECK_VALUE(grad_avg.dim() == 2 && grad_max.sizes().equals(grad_avg.sizes()) &&
                        argmax.sizes().equals(grad_avg.sizes()),
                    "fastnas.channel_pool: backward expects grad_avg, grad_max and argmax of one shape [N, C]");
  TORCH_CHECK_TYPE(argmax.scalar_type() == at::kInt, "fastnas.channel_pool: backward expects an int32 argmax");
  c10::cuda::CUDAGuard guard(grad_avg.device());
  const int64_t N = grad_avg.size(0), C = grad_avg.size(1), HW = H * W;
  const Layout L = channels_last ? Layout::NHWC : Layout::NCHW;
  Tensor out = at::empty({N, C, H, W}, grad_avg.options().memory_format(memory_format(L)));
  const int64_t total = out.numel();
  if (total == 0) return out;
  Tensor ga = grad_avg.contiguous(), gm = grad_max.contiguous().to(ga.scalar_type()), arg = argmax.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ga.scalar_type(), "fastnas::channel_pool_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    channel_pool_bwd_kernel<scalar_t, A><<<grid_for(total), kThreads, 0, stream>>>(
        ga.const_data_ptr<scalar_t>(), gm.const_data_ptr<scalar_t>(), arg.const_data_ptr<int>(),
        out.data_ptr<scalar_t>(), C, HW, L == Layout::NHWC, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// -------------------------------------------------------------------------------------------------- spatial_pool

// one thread per (n, position), looping over the channels in order; out is channels_last: (max, mean) per position
template <typename T, typename A>
__global__ void spatial_pool_kernel(const T* __restrict__ x, T* out, int* arg, int64_t N, int64_t C, int64_t HW,
                                    bool nhwc) {
  const A invC = A(1) / A(C);
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < N * HW; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = p / HW, hw = p % HW;
    const T* base = nhwc ? x + p * C : x + n * C * HW + hw;
    const int64_t step = nhwc ? 1 : HW;
    A v = static_cast<A>(base[0]);
    Pool<A> acc{v, v, 0};
    for (int64_t c = 1; c < C; ++c) update(acc, static_cast<A>(base[c * step]), int(c));
    out[2 * p] = static_cast<T>(acc.max);
    out[2 * p + 1] = static_cast<T>(acc.sum * invC);
    arg[p] = acc.arg;
  }
}

// grad x = g[:, 1] / C + (c == arg) g[:, 0], over the elements of the output in its layout;
// g[n, k, hw] = g[n * s_n + k * s_c + hw * s_hw]
template <typename T, typename A>
__global__ void spatial_pool_bwd_kernel(const T* __restrict__ g, int64_t s_n, int64_t s_c, int64_t s_hw,
                                        const int* __restrict__ arg, T* out, int64_t C, int64_t HW, bool nhwc,
                                        int64_t total) {
  const A invC = A(1) / A(C);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t c, p;  // p = n * HW + hw
    if (nhwc) {
      c = i % C;
      p = i / C;
    } else {
      const int64_t hw = i % HW, nc = i / HW;
      c = nc % C;
      p = (nc / C) * HW + hw;
    }
    const T* gp = g + (p / HW) * s_n + (p % HW) * s_hw;
    A v = static_cast<A>(gp[s_c]) * invC;
    if (c == arg[p]) v += static_cast<A>(gp[0]);
    out[i] = static_cast<T>(v);
  }
}

std::tuple<Tensor, Tensor> spatial_pool(const Tensor& x_in) {
  check_spatial_pool(x_in);
  check_device_type("spatial_pool", "x", x_in, kDev);
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), HW = H * W;
  TORCH_CHECK_VALUE(C < INT_MAX, "fastnas.spatial_pool: C must be below 2^31");
  Tensor out = at::empty({N, 2, H, W}, x_in.options().memory_format(c10::MemoryFormat::ChannelsLast));
  Tensor arg = at::empty({N, H, W}, x_in.options().dtype(at::kInt));
  if (N * HW == 0) return {out, arg};
  const Layout L = prefers_channels_last(x_in) ? Layout::NHWC : Layout::NCHW;
  Tensor x = in_layout(x_in, L);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::spatial_pool_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    spatial_pool_kernel<scalar_t, A><<<grid_for(N * HW), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), arg.data_ptr<int>(), N, C, HW, L == Layout::NHWC);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, arg};
}

Tensor spatial_pool_backward(const Tensor& grad, const Tensor& argmax, int64_t C, bool channels_last) {
  check_4d("spatial_pool", "grad", grad);
  check_device_type("spatial_pool", "grad", grad, kDev);
  const int64_t N = grad.size(0), H = grad.size(2), W = grad.size(3), HW = H * W;
  TORCH_CHECK_VALUE(grad.size(1) == 2 && argmax.dim() == 3 && argmax.size(0) == N && argmax.size(1) == H &&
                        argmax.size(2) == W,
                    "fastnas.spatial_pool: backward expects grad [N, 2, H, W] and argmax [N, H, W]");
  TORCH_CHECK_TYPE(argmax.scalar_type() == at::kInt, "fastnas.spatial_pool: backward expects an int32 argmax");
  c10::cuda::CUDAGuard guard(grad.device());
  const Layout L = channels_last ? Layout::NHWC : Layout::NCHW;
  Tensor out = at::empty({N, C, H, W}, grad.options().memory_format(memory_format(L)));
  const int64_t total = out.numel();
  if (total == 0) return out;
  const SpatialPoolGrad g = spatial_pool_grad_view(grad);
  Tensor arg = argmax.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.t.scalar_type(), "fastnas::spatial_pool_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    spatial_pool_bwd_kernel<scalar_t, A><<<grid_for(total), kThreads, 0, stream>>>(
        g.t.const_data_ptr<scalar_t>(), g.s_n, g.s_c, g.s_hw, arg.const_data_ptr<int>(), out.data_ptr<scalar_t>(), C, HW,
        L == Layout::NHWC, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// -------------------------------------------------------------------------------------------------- scales

// Index of the gate value of element i: channel gate -> n * C + c, spatial gate -> n * HW + hw.
__device__ __forceinline__ int64_t gate_index(int64_t i, int64_t C, int64_t HW, bool nhwc, bool channel) {
  int64_t n, c, hw;
  if (nhwc) {
    c = i % C;
    const int64_t p = i / C;
    hw = p % HW;
    n = p / HW;
  } else {
    hw = i % HW;
    const int64_t nc = i / HW;
    c = nc % C;
    n = nc / C;
  }
  return channel ? n * C + c : n * HW + hw;
}

template <typename T, typename A>
__global__ void scale_fwd_kernel(const T* __restrict__ x, const A* __restrict__ logits, T* out, int64_t C,
                                 int64_t HW, bool nhwc, bool channel, int64_t total) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const A s = sigmoid(logits[gate_index(i, C, HW, nhwc, channel)]);
    out[i] = static_cast<T>(static_cast<A>(x[i]) * s);
  }
}

// Channel gate, NCHW: one warp per (n, c) row: gx = g s, gl = s (1 - s) sum g x.
template <typename T, typename A>
__global__ void channel_scale_bwd_nchw_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                              const A* __restrict__ logits, T* gx, A* gl, int64_t rows, int64_t hw) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp; r < rows; r += warps) {
    const A s = sigmoid(logits[r]);
    A acc = A(0);
    for (int64_t i = lane; i < hw; i += kWarp) {
      const A gi = static_cast<A>(g[r * hw + i]);
      if (gx) gx[r * hw + i] = static_cast<T>(gi * s);
      acc += gi * static_cast<A>(x[r * hw + i]);
    }
    acc = warp_sum(acc);
    if (lane == 0) gl[r] = s * (A(1) - s) * acc;
  }
}

// Channel gate, NHWC: a block of (32 channels) x (position groups) per (n, channel tile).
template <typename T, typename A>
__global__ void channel_scale_bwd_nhwc_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                              const A* __restrict__ logits, T* gx, A* gl, int64_t N, int64_t C,
                                              int64_t HW) {
  constexpr int kGroups = kThreads / kWarp;
  __shared__ A s_acc[kGroups][kWarp];
  const int64_t tiles = divup(C, kWarp);
  const int lane = threadIdx.x % kWarp, grp = threadIdx.x / kWarp;
  for (int64_t t = blockIdx.x; t < N * tiles; t += gridDim.x) {
    const int64_t n = t / tiles, c = (t % tiles) * kWarp + lane;
    A acc = A(0);
    A s = A(0);
    if (c < C) {
      s = sigmoid(logits[n * C + c]);
      for (int64_t h = grp; h < HW; h += kGroups) {
        const int64_t i = (n * HW + h) * C + c;
        const A gi = static_cast<A>(g[i]);
        if (gx) gx[i] = static_cast<T>(gi * s);
        acc += gi * static_cast<A>(x[i]);
      }
    }
    s_acc[grp][lane] = acc;
    __syncthreads();
    if (grp == 0 && c < C) {
      for (int j = 1; j < kGroups; ++j) acc += s_acc[j][lane];
      gl[n * C + c] = s * (A(1) - s) * acc;
    }
    __syncthreads();
  }
}

// Spatial gate: one thread per (n, position), looping over the channels in order.
template <typename T, typename A>
__global__ void spatial_scale_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                         const A* __restrict__ logits, T* gx, A* gl, int64_t N, int64_t C, int64_t HW,
                                         bool nhwc) {
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < N * HW; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = p / HW, hw = p % HW;
    const int64_t base = nhwc ? p * C : n * C * HW + hw;
    const int64_t step = nhwc ? 1 : HW;
    const A s = sigmoid(logits[p]);
    A acc = A(0);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = base + c * step;
      const A gi = static_cast<A>(g[i]);
      if (gx) gx[i] = static_cast<T>(gi * s);
      acc += gi * static_cast<A>(x[i]);
    }
    gl[p] = s * (A(1) - s) * acc;
  }
}

Tensor scale_forward(bool channel, const Tensor& x_in, const Tensor& logits) {
  c10::cuda::CUDAGuard guard(x_in.device());
  Output o = make_output(x_in);
  const int64_t total = x_in.numel();
  if (total == 0) return o.out;
  const int64_t C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  Tensor x = in_layout(x_in, o.layout);
  Tensor l = logits.to(acc_dtype(x.scalar_type())).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::scale_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    scale_fwd_kernel<scalar_t, A><<<grid_for(total), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), l.const_data_ptr<A>(), o.buffer.data_ptr<scalar_t>(), C, HW,
        o.layout == Layout::NHWC, channel, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  o.finish();
  return o.out;
}

std::tuple<Tensor, Tensor> scale_backward(bool channel, const char* op, const Tensor& grad, const Tensor& x_in,
                                          const Tensor& logits, bool need_x_grad) {
  check_grad(op, grad, x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  Output o = make_output(grad);
  Tensor gx = need_x_grad ? o.out : at::empty({0}, grad.options());
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  Tensor l = logits.to(acc_dtype(x_in.scalar_type())).contiguous();
  Tensor gl = at::zeros(l.sizes(), l.options());
  if (x_in.numel() > 0) {
    Tensor g = in_layout(grad, o.layout), x = in_layout(x_in, o.layout);
    const bool nhwc = o.layout == Layout::NHWC;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::scale_backward_cuda", [&] {
      using A = at::opmath_type<scalar_t>;
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const A* lp = l.const_data_ptr<A>();
      scalar_t* gxp = need_x_grad ? o.buffer.data_ptr<scalar_t>() : nullptr;
      A* glp = gl.data_ptr<A>();
      if (channel && !nhwc) {
        channel_scale_bwd_nchw_kernel<scalar_t, A><<<grid_for(N * C, kThreads / kWarp), kThreads, 0, stream>>>(
            gp, xp, lp, gxp, glp, N * C, HW);
      } else if (channel) {
        channel_scale_bwd_nhwc_kernel<scalar_t, A><<<grid_for(N * divup(C, kWarp), 1), kThreads, 0, stream>>>(
            gp, xp, lp, gxp, glp, N, C, HW);
      } else {
        spatial_scale_bwd_kernel<scalar_t, A><<<grid_for(N * HW), kThreads, 0, stream>>>(gp, xp, lp, gxp, glp, N, C,
                                                                                         HW, nhwc);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (need_x_grad) o.finish();
  }
  Tensor glog = at::empty_like(logits);
  glog.copy_(gl);
  return {gx, glog};
}

Tensor channel_scale(const Tensor& x, const Tensor& logits) {
  check_channel_scale(x, logits);
  check_device_type("channel_scale", "x", x, kDev);
  return scale_forward(true, x, logits);
}

std::tuple<Tensor, Tensor> channel_scale_backward(const Tensor& grad, const Tensor& x, const Tensor& logits,
                                                  bool need_x_grad) {
  check_channel_scale(x, logits);
  check_device_type("channel_scale", "x", x, kDev);
  return scale_backward(true, "channel_scale", grad, x, logits, need_x_grad);
}

Tensor spatial_scale(const Tensor& x, const Tensor& logits) {
  check_spatial_scale(x, logits);
  check_device_type("spatial_scale", "x", x, kDev);
  return scale_forward(false, x, logits);
}

std::tuple<Tensor, Tensor> spatial_scale_backward(const Tensor& grad, const Tensor& x, const Tensor& logits,
                                                  bool need_x_grad) {
  check_spatial_scale(x, logits);
  check_device_type("spatial_scale", "x", x, kDev);
  return scale_backward(false, "spatial_scale", grad, x, logits, need_x_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnas, CUDA, m) {
  m.impl("mixed_sum", &mixed_sum);
  m.impl("mixed_sum_backward", &mixed_sum_backward);
  m.impl("mixed_sum_backward_xs", &mixed_sum_backward_xs);
  m.impl("channel_pool", &channel_pool);
  m.impl("channel_pool_backward", &channel_pool_backward);
  m.impl("spatial_pool", &spatial_pool);
  m.impl("spatial_pool_backward", &spatial_pool_backward);
  m.impl("channel_scale", &channel_scale);
  m.impl("channel_scale_backward", &channel_scale_backward);
  m.impl("spatial_scale", &spatial_scale);
  m.impl("spatial_scale_backward", &spatial_scale_backward);
}

}  // namespace fastnas::cuda
