// channel_pool on CUDA: the mean, max and first argmax over H*W of every channel, and its backward.
#include "common.cuh"

namespace fastnas::cuda {
namespace {

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
  check_channel_pool_backward(grad_avg, grad_max, argmax, H, W, kDev);
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

}  // namespace

TORCH_LIBRARY_IMPL(fastnas, CUDA, m) {
  m.impl("channel_pool", &channel_pool);
  m.impl("channel_pool_backward", &channel_pool_backward);
}

}  // namespace fastnas::cuda
