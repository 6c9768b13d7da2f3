// spatial_pool: the max (with its first argmax) and mean over the channels at every position, and its
// backward.
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

// Positions per task of the NCHW spatial kernels (their per-task buffers stay in L1).
constexpr int64_t kSpatialBlock = 1024;

// Stores the index lanes of id (whole numbers) as int32 at dst; returns the bitmask of the lanes where s is NaN.
template <typename A>
C10_ALWAYS_INLINE int store_index_lanes(const Vectorized<A>& id, const Vectorized<A>& s, int32_t* dst) {
  constexpr int64_t W = Vectorized<A>::size();
  if constexpr (std::is_same_v<A, float>) {
    at::vec::convert_to_int_of_same_size(id).store(dst);
  } else {
    __at_align__ A ib[W];
    id.store(ib);
    for (int64_t l = 0; l < W; ++l) dst[l] = static_cast<int32_t>(ib[l]);
  }
  return ~s.isnan().zero_mask() & ((1 << W) - 1);
}

// The [N, 2, H, W] output of spatial_pool is channels_last: (max, mean) side by side for every position, i.e.
// out[(n * HW + hw) * 2 + {0, 1}]. The 7x7 convolution that follows it in a CBAM gate runs ~3x faster (forward and
// backward) on that layout than on NCHW.

// x [N, C, HW] -> out [N*HW, 2] (max, mean), arg [N, HW]
template <typename T>
void spatial_pool_nchw(const T* x, T* out, int32_t* arg, int64_t N, int64_t C, int64_t HW) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  const int64_t nb = (HW + kSpatialBlock - 1) / kSpatialBlock;
  const A invC = A(1) / A(C);
  at::parallel_for(0, N * nb, std::max<int64_t>(1, kGrain / (C * std::min(HW, kSpatialBlock))), [&](int64_t b,
                                                                                                    int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nb;
      const int64_t lo = (t % nb) * kSpatialBlock;
      const int64_t hi = std::min(HW, lo + kSpatialBlock);
      const T* xn = x + n * C * HW;
      T* on = out + n * 2 * HW;
      int32_t* an = arg + n * HW;
      // U vectors of positions at a time (independent chains hide the compare-blend latency)
      auto positions = [&](auto u_count, int64_t i) {
        constexpr int64_t U = decltype(u_count)::value;
        V m[U], s[U], id[U];
        pool_lanes_strided<T, U>(xn + i, HW, C, s, m, id);
        uint64_t nans = 0;
        for (int64_t u = 0; u < U; ++u) {  // (max, mean) pairs: interleave the two vectors
          auto [p0, p1] = at::vec::interleave2(m[u], s[u] * V(invC));
          VT::store(on + 2 * (i + u * W), p0);
          VT::store(on + 2 * (i + u * W) + W, p1);
          nans |= uint64_t(store_index_lanes(id[u], s[u], an + i + u * W)) << (u * W);
        }
        for (int64_t l = 0; C10_UNLIKELY(nans != 0) && l < U * W; ++l) {
          if ((nans >> l) & 1) {  // a NaN at this position: the exact scan
            A mx = A(xn[i + l]);
            int32_t best = 0;
            for (int64_t c = 1; c < C; ++c) {
              A v = A(xn[c * HW + i + l]);
              if (beats_later(v, mx)) {
                mx = v;
                best = static_cast<int32_t>(c);
              }
            }
            on[2 * (i + l)] = T(mx);
            an[i + l] = best;
          }
        }
      };
      int64_t i = vector_chunks<W>(lo, hi, positions);
      for (; i < hi; ++i) {
        A m = A(xn[i]), s = m;
        int32_t id = 0;
        for (int64_t c = 1; c < C; ++c) {
          A v = A(xn[c * HW + i]);
          s += v;
          if (beats_later(v, m)) {
            m = v;
            id = static_cast<int32_t>(c);
          }
        }
        on[2 * i] = T(m);
        on[2 * i + 1] = T(s * invC);
        an[i] = id;
      }
    }
  });
}

// W rows of x [rows, C] starting at row r as W x W blocks transposed to channel-major vectors (lane p = row r + p),
// folded into a running sum, NaN-blind max and its first index per lane; a NaN makes the sum NaN and the caller
// redoes that row exactly.
template <typename T>
C10_ALWAYS_INLINE void spatial_pool_rows_nhwc(const T* x, int64_t r, int64_t C, Vectorized<at::opmath_type<T>>& m,
                                              Vectorized<at::opmath_type<T>>& s, Vectorized<at::opmath_type<T>>& id) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  __at_align__ A rows[W * W];
  __at_align__ A cols[W * W];
  auto fold = [&](const V& v, int64_t c) {
    if (c == 0) {
      m = s = v;
      id = V(A(0));
      return;
    }
    pool_lane_add(s, m, id, v, V(static_cast<A>(c)));
  };
  int64_t c0 = 0;
  for (; c0 + W <= C; c0 += W) {
    for (int64_t p = 0; p < W; ++p) VT::load(x + (r + p) * C + c0).store(rows + p * W);
    at::vec::transpose_mxn<A, W, W>(rows, W, cols, W);
    for (int64_t k = 0; k < W; ++k) fold(V::loadu(cols + k * W), c0 + k);
  }
  for (; c0 < C; ++c0) {  // the channels after the last full block, one gathered vector each
    for (int64_t p = 0; p < W; ++p) rows[p] = A(x[(r + p) * C + c0]);
    fold(V::loadu(rows), c0);
  }
}

// x [N*HW, C] -> out [N*HW, 2] (max, mean), arg [N*HW]: blocks of W positions vectorised across positions (through
// W x W transposes), the rest row by row.
template <typename T>
void spatial_pool_nhwc(const T* x, T* out, int32_t* arg, int64_t rows, int64_t C) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  const A invC = A(1) / A(C);
  auto exact_row = [&](int64_t r) {
    PoolAcc<A> p = reduce_row(x + r * C, C);
    out[2 * r] = T(p.max);
    out[2 * r + 1] = T(p.sum * invC);
    arg[r] = static_cast<int32_t>(p.arg);
  };
  at::parallel_for(0, rows, std::max<int64_t>(W, kGrain / C), [&](int64_t b, int64_t e) {
    int64_t r = b;
    for (; r + W <= e; r += W) {
      V m, s, id;
      spatial_pool_rows_nhwc<T>(x, r, C, m, s, id);
      auto [p0, p1] = at::vec::interleave2(m, s * V(invC));
      VT::store(out + 2 * r, p0);
      VT::store(out + 2 * r + W, p1);
      const int nans = store_index_lanes(id, s, arg + r);
      for (int64_t p = 0; C10_UNLIKELY(nans != 0) && p < W; ++p) {
        if ((nans >> p) & 1) exact_row(r + p);  // a NaN in this row: its exact scan
      }
    }
    for (; r < e; ++r) exact_row(r);
  });
}

// grad x [N, C, HW] = g[:, 1] / C + (c == arg) * g[:, 0]; g[n, k, hw] at g + n * s_n + k * s_c + hw * s_hw
template <typename T>
void spatial_pool_bwd_nchw(const T* g, int64_t s_n, int64_t s_c, int64_t s_hw, const int32_t* arg, T* out, int64_t N, int64_t C,
                           int64_t HW) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  const int64_t nb = (HW + kSpatialBlock - 1) / kSpatialBlock;
  const A invC = A(1) / A(C);
  at::parallel_for(0, N * nb, std::max<int64_t>(1, kGrain / (C * std::min(HW, kSpatialBlock))), [&](int64_t b,
                                                                                                    int64_t e) {
    __at_align__ A mean[kSpatialBlock], gmax[kSpatialBlock], idx[kSpatialBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nb;
      const int64_t lo = (t % nb) * kSpatialBlock;
      const int64_t len = std::min(HW, lo + kSpatialBlock) - lo;
      const T* gp = g + n * s_n + lo * s_hw;
      const int32_t* an = arg + n * HW + lo;
      for (int64_t i = 0; i < len; ++i) {
        gmax[i] = A(gp[i * s_hw]);
        mean[i] = A(gp[i * s_hw + s_c]) * invC;
        idx[i] = static_cast<A>(an[i]);
      }
      for (int64_t c = 0; c < C; ++c) {
        T* o = out + (n * C + c) * HW + lo;
        const V vc(static_cast<A>(c));
        const V zero(A(0));
        int64_t i = 0;
        for (; i + W <= len; i += W) {
          V hit = V::blendv(zero, V::loadu(gmax + i), V::loadu(idx + i) == vc);
          VT::store(o + i, V::loadu(mean + i) + hit);
        }
        for (; i < len; ++i) o[i] = T(an[i] == c ? mean[i] + gmax[i] : mean[i]);
      }
    }
  });
}

// grad x [N*HW, C]; g as above
template <typename T>
void spatial_pool_bwd_nhwc(const T* g, int64_t s_n, int64_t s_c, int64_t s_hw, const int32_t* arg, T* out,
                           int64_t rows, int64_t C, int64_t HW) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  const A invC = A(1) / A(C);
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / C), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* gp = g + (r / HW) * s_n + (r % HW) * s_hw;
      const A mean = A(gp[s_c]) * invC;
      T* o = out + r * C;
      const V vm(mean);
      int64_t c = 0;
      for (; c + W <= C; c += W) VT::store(o + c, vm);
      for (; c < C; ++c) o[c] = T(mean);
      o[arg[r]] = T(mean + A(gp[0]));
    }
  });
}

namespace {

std::tuple<Tensor, Tensor> spatial_pool(const Tensor& x_in) {
  check_spatial_pool(x_in);
  check_device_type("spatial_pool", "x", x_in, at::kCPU);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), HW = H * W;
  check_index_range("spatial_pool", C);
  Tensor out = at::empty({N, 2, H, W}, x_in.options().memory_format(c10::MemoryFormat::ChannelsLast));
  Tensor arg = at::empty({N, H, W}, x_in.options().dtype(at::kInt));
  if (N * HW == 0) return {out, arg};
  const Layout L = prefers_channels_last(x_in) ? Layout::NHWC : Layout::NCHW;
  Tensor x = in_layout(x_in, L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::spatial_pool", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (L == Layout::NCHW) {
      spatial_pool_nchw<scalar_t>(xp, out.data_ptr<scalar_t>(), arg.data_ptr<int32_t>(), N, C, HW);
    } else {
      spatial_pool_nhwc<scalar_t>(xp, out.data_ptr<scalar_t>(), arg.data_ptr<int32_t>(), N * HW, C);
    }
  });
  return {out, arg};
}

Tensor spatial_pool_backward(const Tensor& grad_in, const Tensor& argmax, int64_t C, bool channels_last) {
  check_spatial_pool_backward(grad_in, argmax, C, at::kCPU);
  const int64_t N = grad_in.size(0), H = grad_in.size(2), W = grad_in.size(3), HW = H * W;
  const Layout L = channels_last ? Layout::NHWC : Layout::NCHW;
  Tensor out = at::empty({N, C, H, W}, grad_in.options().memory_format(memory_format(L)));
  if (out.numel() == 0) return out;
  const SpatialPoolGrad g = spatial_pool_grad_view(grad_in);
  Tensor arg = argmax.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.t.scalar_type(), "fastnas::spatial_pool_backward", [&] {
    const scalar_t* gp = g.t.const_data_ptr<scalar_t>();
    const int32_t* ap = arg.const_data_ptr<int32_t>();
    if (L == Layout::NCHW) {
      spatial_pool_bwd_nchw<scalar_t>(gp, g.s_n, g.s_c, g.s_hw, ap, out.data_ptr<scalar_t>(), N, C, HW);
    } else {
      spatial_pool_bwd_nhwc<scalar_t>(gp, g.s_n, g.s_c, g.s_hw, ap, out.data_ptr<scalar_t>(), N * HW, C, HW);
    }
  });
  return out;
}

}  // namespace

// the CPU kernels of spatial_pool
inline void register_spatial_pool(torch::Library& m) {
  m.impl("spatial_pool", &spatial_pool);
  m.impl("spatial_pool_backward", &spatial_pool_backward);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
