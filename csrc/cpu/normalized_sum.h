// A search-cell node whose first Kn inputs pass through affine-free training-mode batch norms:
//   out = sum_{k < Kn} w_k (z_k - mean_k) invstd_k + sum_{k >= Kn} w_k z_k,
// on channels_last data [M, C], vectorised over channels. The normalised inputs y_k are never written: the forward
// reads every z_k once for its statistics and once for the sum; the backward reads g and every z_k once for the
// per-channel sums and once more for the input gradients, which are per-channel affine in (g, z_k):
//   gz_k = a_k g + b_k z_k + c_k   (a = w invstd, b = -w invstd^2 mean(g y_k), c = -a mean(g) - b mean_k).
// Deterministic: row blocks fixed by the problem size, merged in order.
//
// Included by ops_cpu_impl.h (once per CPU capability).
#pragma once

#include "batch_norm.h"

namespace fastnas::cpu {
inline namespace CPU_CAPABILITY {

// out[r, c] = bias[c] + sum_k coef[k * C + c] z_k[r, c]
template <typename T>
void per_channel_weighted_sum(const std::vector<const T*>& zs, const at::opmath_type<T>* coef,
                              const at::opmath_type<T>* bias, T* out, int64_t M, int64_t C) {
  using A = at::opmath_type<T>;
  using VT = VecT<T>;
  using V = typename VT::V;
  const int64_t K = static_cast<int64_t>(zs.size());
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      bn_channel_loop<T>(
          C,
          [&](int64_t c) {
            V acc = V::loadu(bias + c);
            for (int64_t k = 0; k < K; ++k) acc = at::vec::fmadd(V::loadu(coef + k * C + c), VT::load(zs[k] + r * C + c), acc);
            VT::store(out + r * C + c, acc);
          },
          [&](int64_t c) {
            A acc = bias[c];
            for (int64_t k = 0; k < K; ++k) acc += coef[k * C + c] * static_cast<A>(zs[k][r * C + c]);
            out[r * C + c] = static_cast<T>(acc);
          });
    }
  });
}

// sums[c] = sum_r g[r, c] and sums[(1 + k) C + c] = sum_r g[r, c] z_k[r, c], deterministic
template <typename T>
std::vector<at::opmath_type<T>> grad_dot_sums(const T* g, const std::vector<const T*>& zs, int64_t M, int64_t C) {
  using A = at::opmath_type<T>;
  using VT = VecT<T>;
  using V = typename VT::V;
  const int64_t K = static_cast<int64_t>(zs.size());
  const int64_t width = (K + 1) * C;
  const int64_t R = bn_block_rows(C);
  const int64_t nblocks = (M + R - 1) / R;
  std::vector<A> partial(nblocks * width, A(0));
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * R, r1 = std::min(M, r0 + R);
      A* p = partial.data() + b * width;
      // the block of g stays in L1 while every z_k is read against it
      for (int64_t k = -1; k < K; ++k) {
        A* dst = p + (k + 1) * C;
        bn_channel_loop<T>(
            C,
            [&](int64_t c) {
              V s(A(0));
              if (k < 0) {
                for (int64_t r = r0; r < r1; ++r) s = s + VT::load(g + r * C + c);
              } else {
                for (int64_t r = r0; r < r1; ++r) s = at::vec::fmadd(VT::load(g + r * C + c), VT::load(zs[k] + r * C + c), s);
              }
              s.store(dst + c);
            },
            [&](int64_t c) {
              A s = 0;
              for (int64_t r = r0; r < r1; ++r)
                s += static_cast<A>(g[r * C + c]) * (k < 0 ? A(1) : static_cast<A>(zs[k][r * C + c]));
              dst[c] = s;
            });
      }
    }
  });
  std::vector<A> total(width, A(0));
  for (int64_t b = 0; b < nblocks; ++b)
    for (int64_t i = 0; i < width; ++i) total[i] += partial[b * width + i];
  return total;
}

// gz[r, c] = a[c] g[r, c] + b[c] z[r, c] + cc[c]
template <typename T>
void per_channel_affine_grad(const T* g, const T* z, const at::opmath_type<T>* a, const at::opmath_type<T>* b,
                             const at::opmath_type<T>* cc, T* gz, int64_t M, int64_t C) {
  using A = at::opmath_type<T>;
  using VT = VecT<T>;
  using V = typename VT::V;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      bn_channel_loop<T>(
          C,
          [&](int64_t c) {
            V v = at::vec::fmadd(V::loadu(a + c), VT::load(g + r * C + c), V::loadu(cc + c));
            VT::store(gz + r * C + c, at::vec::fmadd(V::loadu(b + c), VT::load(z + r * C + c), v));
          },
          [&](int64_t c) {
            gz[r * C + c] = static_cast<T>(a[c] * static_cast<A>(g[r * C + c]) + b[c] * static_cast<A>(z[r * C + c]) +
                                           cc[c]);
          });
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
