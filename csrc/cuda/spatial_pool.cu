// spatial_pool on CUDA: the max (with its first argmax) and mean over the channels at every position, and its
// backward.
#include "common.cuh"

namespace fastnas::cuda {
namespace {

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
  check_spatial_pool_backward(grad, argmax, C, kDev);
  const int64_t N = grad.size(0), H = grad.size(2), W = grad.size(3), HW = H * W;
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

}  // namespace

TORCH_LIBRARY_IMPL(fastnas, CUDA, m) {
  m.impl("spatial_pool", &spatial_pool);
  m.impl("spatial_pool_backward", &spatial_pool_backward);
}

}  // namespace fastnas::cuda
