// channel_scale and spatial_scale on CUDA: x times the sigmoid of per-channel or per-position gate logits, and
// their backward ops.
#include "common.cuh"

namespace fastnas::cuda {
namespace {

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
  m.impl("channel_scale", &channel_scale);
  m.impl("channel_scale_backward", &channel_scale_backward);
  m.impl("spatial_scale", &spatial_scale);
  m.impl("spatial_scale_backward", &spatial_scale_backward);
}

}  // namespace fastnas::cuda
