// mixed_sum on CUDA: sum_k w[k] xs[k], and its two backward ops.
#include "common.cuh"

namespace fastnas::cuda {
namespace {

constexpr int kMaxK = 16;  // inputs per kernel launch (more are processed in groups)

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

}  // namespace

TORCH_LIBRARY_IMPL(fastnas, CUDA, m) {
  m.impl("mixed_sum", &mixed_sum);
  m.impl("mixed_sum_backward", &mixed_sum_backward);
  m.impl("mixed_sum_backward_xs", &mixed_sum_backward_xs);
}

}  // namespace fastnas::cuda
