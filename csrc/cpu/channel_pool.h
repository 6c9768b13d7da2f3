// channel_pool: the mean, max and first argmax over H*W of every channel, and its backward.
//
// Compiled once per CPU capability (cpu_ops.h), in a namespace named after it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common.h"
#include "vec.h"

namespace fastnas::cpu {
inline namespace CPU_CAPABILITY {

// x [rows, hw] -> avg[rows], max[rows], arg[rows]
template <typename T>
void channel_pool_nchw(const T* x, T* avg, T* mx, int32_t* arg, int64_t rows, int64_t hw) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / hw), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      PoolAcc<A> p = reduce_row(x + r * hw, hw);
      avg[r] = T(p.sum / A(hw));
      mx[r] = T(p.max);
      arg[r] = static_cast<int32_t>(p.arg);
    }
  });
}

// One image xn [HW, C] -> avg[C], max[C], arg[C]; s, m, id: scratch of C elements. Channels in chunks of up to four
// vectors whose running sums, maxima and indices stay in registers over all rows; the last few channels one by one.
template <typename T>
void channel_pool_image_nhwc(const T* xn, int64_t C, int64_t HW, at::opmath_type<T>* s, at::opmath_type<T>* m,
                             at::opmath_type<T>* id, T* avg, T* mx, int32_t* arg) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  auto chunk = [&](auto u_count, int64_t c0) {  // rows are the steps, channels c0 + [0, U W) the lanes
    constexpr int64_t U = decltype(u_count)::value;
    V vs[U], vm[U], vi[U];
    pool_lanes_strided<T, U>(xn + c0, C, HW, vs, vm, vi);
    for (int64_t u = 0; u < U; ++u) {
      vs[u].store(s + c0 + u * W);
      vm[u].store(m + c0 + u * W);
      vi[u].store(id + c0 + u * W);
    }
  };
  const int64_t c0 = vector_chunks<W>(0, C, chunk);
  for (int64_t c = c0; c < C; ++c) {
    s[c] = m[c] = A(xn[c]);
    id[c] = 0;
    for (int64_t h = 1; h < HW; ++h) {
      const A v = A(xn[h * C + c]);
      s[c] += v;
      if (beats_later(v, m[c])) {
        m[c] = v;
        id[c] = static_cast<A>(h);
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    if (C10_UNLIKELY(std::isnan(s[c]))) {  // a NaN in this column: the exact scan
      A mm = A(xn[c]);
      A ii = 0;
      for (int64_t h = 1; h < HW; ++h) {
        A v = A(xn[h * C + c]);
        if (beats_later(v, mm)) {
          mm = v;
          ii = static_cast<A>(h);
        }
      }
      m[c] = mm;
      id[c] = ii;
    }
    avg[c] = T(s[c] / A(HW));
    mx[c] = T(m[c]);
    arg[c] = static_cast<int32_t>(id[c]);
  }
}

// x [N, HW, C] -> avg[N, C], max[N, C], arg[N, C]
template <typename T>
void channel_pool_nhwc(const T* x, T* avg, T* mx, int32_t* arg, int64_t N, int64_t C, int64_t HW) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, N, std::max<int64_t>(1, kGrain / (HW * C)), [&](int64_t b, int64_t e) {
    std::vector<A> s(C), m(C), id(C);
    for (int64_t n = b; n < e; ++n) {
      channel_pool_image_nhwc<T>(x + n * HW * C, C, HW, s.data(), m.data(), id.data(), avg + n * C, mx + n * C,
                                 arg + n * C);
    }
  });
}

// grad x = ga / HW everywhere, plus gm at the argmax. ga, gm, arg: [rows]; out [rows, hw]
template <typename T>
void channel_pool_bwd_nchw(const T* ga, const T* gm, const int32_t* arg, T* out, int64_t rows, int64_t hw) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / hw), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const A a = A(ga[r]) / A(hw);
      T* o = out + r * hw;
      const V va(a);
      int64_t i = 0;
      for (; i + W <= hw; i += W) VT::store(o + i, va);
      for (; i < hw; ++i) o[i] = T(a);
      o[arg[r]] = T(a + A(gm[r]));
    }
  });
}

// out [N, HW, C]
template <typename T>
void channel_pool_bwd_nhwc(const T* ga, const T* gm, const int32_t* arg, T* out, int64_t N, int64_t C, int64_t HW) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  at::parallel_for(0, N, std::max<int64_t>(1, kGrain / (HW * C)), [&](int64_t b, int64_t e) {
    std::vector<A> a(C);
    for (int64_t n = b; n < e; ++n) {
      for (int64_t c = 0; c < C; ++c) a[c] = A(ga[n * C + c]) / A(HW);
      T* on = out + n * HW * C;
      for (int64_t h = 0; h < HW; ++h) {
        T* row = on + h * C;
        int64_t c = 0;
        for (; c + W <= C; c += W) VT::store(row + c, V::loadu(a.data() + c));
        for (; c < C; ++c) row[c] = T(a[c]);
      }
      for (int64_t c = 0; c < C; ++c) on[int64_t(arg[n * C + c]) * C + c] = T(a[c] + A(gm[n * C + c]));
    }
  });
}

namespace {

std::tuple<Tensor, Tensor, Tensor> channel_pool(const Tensor& x_in) {
  check_channel_pool(x_in);
  check_device_type("channel_pool", "x", x_in, at::kCPU);
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  check_index_range("channel_pool", HW);
  Tensor avg = at::empty({N, C}, x_in.options());
  Tensor mx = at::empty({N, C}, x_in.options());
  Tensor arg = at::empty({N, C}, x_in.options().dtype(at::kInt));
  if (N * C == 0) return {avg, mx, arg};
  const Layout L = layout_of(x_in);
  Tensor x = in_layout(x_in, L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::channel_pool", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (L == Layout::NCHW) {
      channel_pool_nchw<scalar_t>(xp, avg.data_ptr<scalar_t>(), mx.data_ptr<scalar_t>(), arg.data_ptr<int32_t>(),
                                  N * C, HW);
    } else {
      channel_pool_nhwc<scalar_t>(xp, avg.data_ptr<scalar_t>(), mx.data_ptr<scalar_t>(), arg.data_ptr<int32_t>(), N,
                                  C, HW);
    }
  });
  return {avg, mx, arg};
}

Tensor channel_pool_backward(const Tensor& grad_avg, const Tensor& grad_max, const Tensor& argmax, int64_t H,
                             int64_t W, bool channels_last) {
  check_channel_pool_backward(grad_avg, grad_max, argmax, H, W, at::kCPU);
  const int64_t N = grad_avg.size(0), C = grad_avg.size(1), HW = H * W;
  const Layout L = channels_last ? Layout::NHWC : Layout::NCHW;
  Tensor out = at::empty({N, C, H, W}, grad_avg.options().memory_format(memory_format(L)));
  if (out.numel() == 0) return out;
  Tensor ga = grad_avg.contiguous(), gm = grad_max.contiguous().to(ga.scalar_type()), arg = argmax.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ga.scalar_type(), "fastnas::channel_pool_backward", [&] {
    const scalar_t* gap = ga.const_data_ptr<scalar_t>();
    const scalar_t* gmp = gm.const_data_ptr<scalar_t>();
    const int32_t* ap = arg.const_data_ptr<int32_t>();
    if (L == Layout::NCHW) {
      channel_pool_bwd_nchw<scalar_t>(gap, gmp, ap, out.data_ptr<scalar_t>(), N * C, HW);
    } else {
      channel_pool_bwd_nhwc<scalar_t>(gap, gmp, ap, out.data_ptr<scalar_t>(), N, C, HW);
    }
  });
  return out;
}

}  // namespace

// the CPU kernels of channel_pool
inline void register_channel_pool(torch::Library& m) {
  m.impl("channel_pool", &channel_pool);
  m.impl("channel_pool_backward", &channel_pool_backward);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
