// Per-channel kernels on channels_last data [M, C] (M = N*H*W rows), vectorised over the channels, for the
// training-mode batch norms (affine-free and affine) and for the search-cell node sum that applies its candidates'
// batch norms:
//   bn_stats:                 per-channel mean and biased variance in one pass over x (each block of rows is summed
//                             twice while it is in L1, then the blocks are merged with Chan's formula);
//   per_channel_weighted_sum: out = bias + sum_k coef_k * (z_k - shift_k) (the batch norm's y = invstd (x - mean) is
//                             K = 1);
//   grad_dot_sums:            sum_r g and sum_r g * (z_k - shift_k), in one pass over g and every z_k;
//   per_channel_affine_grad:  gz = a g + b (z - shift) + c (the batch norm's input gradient, and the fused node sum's
//                             input gradients, are per-channel affine in the gradient and one tensor).
// The shifts are per channel (a batch norm's mean; none where not given): sums and products taken about the mean
// lose no precision to cancellation when |mean| >> std.
// Deterministic: row blocks depend on M and C only and are merged in order.
//
// Included by ops_cpu_impl.h (once per CPU capability).
#pragma once

#include "kernels.h"

namespace fastnas::cpu {
inline namespace CPU_CAPABILITY {

// rows per block: about 4096 elements (16 KiB of fp32), at least one row
inline int64_t bn_block_rows(int64_t C) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C)); }

// Per-channel sums over rows [r0, r1) of a [M, C] matrix: s[c] = sum f(row values); vectorised over c.
template <typename T, typename Body, typename Tail>
C10_ALWAYS_INLINE void bn_channel_loop(int64_t C, Body body, Tail tail) {
  constexpr int64_t Wv = VecT<T>::W;
  int64_t c = 0;
  for (; c + Wv <= C; c += Wv) body(c);
  for (; c < C; ++c) tail(c);
}

// The channels in chunks of vectors (vector_chunks: independent add chains for the row reductions, which are
// otherwise bound by the latency of one chain), then one by one: body(std::integral_constant<int64_t, U>, c), tail(c).
template <typename T, typename Body, typename Tail>
C10_ALWAYS_INLINE void bn_channel_chunks(int64_t C, Body body, Tail tail) {
  for (int64_t c = vector_chunks<VecT<T>::W>(0, C, body); c < C; ++c) tail(c);
}

// mean and biased variance of every channel; writes mean[C], var[C] (accumulation type)
template <typename T>
void bn_stats(const T* x, int64_t M, int64_t C, at::opmath_type<T>* mean, at::opmath_type<T>* var) {
  using A = at::opmath_type<T>;
  using VT = VecT<T>;
  using V = typename VT::V;
  const int64_t R = bn_block_rows(C);
  const int64_t nblocks = (M + R - 1) / R;
  std::vector<A> bmean(nblocks * C), bm2(nblocks * C);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * R, r1 = std::min(M, r0 + R);
      const A n_rows = static_cast<A>(r1 - r0);
      A* mu = bmean.data() + b * C;
      A* m2 = bm2.data() + b * C;
      bn_channel_chunks<T>(
          C,
          [&](auto u_count, int64_t c) {
            constexpr int64_t U = decltype(u_count)::value;
            constexpr int64_t Wv = VT::W;
            // the sum is taken about the block's first row (exact differences when the spread is small against
            // the mean), so the mean keeps its precision when |mean| >> std
            V s[U], m[U], q[U], first[U];
            for (int64_t u = 0; u < U; ++u) {
              s[u] = q[u] = V(A(0));
              first[u] = VT::load(x + r0 * C + c + u * Wv);
            }
            for (int64_t r = r0; r < r1; ++r) {
              for (int64_t u = 0; u < U; ++u) s[u] = s[u] + (VT::load(x + r * C + c + u * Wv) - first[u]);
            }
            for (int64_t u = 0; u < U; ++u) m[u] = first[u] + s[u] / V(n_rows);
            for (int64_t r = r0; r < r1; ++r) {
              for (int64_t u = 0; u < U; ++u) {
                const V d = VT::load(x + r * C + c + u * Wv) - m[u];
                q[u] = at::vec::fmadd(d, d, q[u]);
              }
            }
            for (int64_t u = 0; u < U; ++u) {
              m[u].store(mu + c + u * Wv);
              q[u].store(m2 + c + u * Wv);
            }
          },
          [&](int64_t c) {
            A s = 0;
            const A first = static_cast<A>(x[r0 * C + c]);
            for (int64_t r = r0; r < r1; ++r) s += static_cast<A>(x[r * C + c]) - first;
            const A m = first + s / n_rows;
            A q = 0;
            for (int64_t r = r0; r < r1; ++r) {
              const A d = static_cast<A>(x[r * C + c]) - m;
              q += d * d;
            }
            mu[c] = m;
            m2[c] = q;
          });
    }
  });
  // merge the blocks in order (Chan et al.): n = na + nb, delta = mb - ma, m = ma + delta nb / n,
  // M2 = M2a + M2b + delta^2 na nb / n
  for (int64_t c = 0; c < C; ++c) {
    A m = bmean[c], q = bm2[c], n = static_cast<A>(std::min(M, R));
    for (int64_t b = 1; b < nblocks; ++b) {
      const A nb = static_cast<A>(std::min(M, (b + 1) * R) - b * R);
      const A delta = bmean[b * C + c] - m;
      const A tot = n + nb;
      m += delta * nb / tot;
      q += bm2[b * C + c] + delta * delta * n * nb / tot;
      n = tot;
    }
    mean[c] = m;
    var[c] = q / static_cast<A>(M);
  }
}

// out[r, c] = bias[c] + sum_k coef[k * C + c] (z_k[r, c] - shifts[k * C + c]) (shifts 0 when not given)
template <typename T>
void per_channel_weighted_sum(const std::vector<const T*>& zs, const at::opmath_type<T>* coef,
                              const at::opmath_type<T>* bias, T* out, int64_t M, int64_t C,
                              const at::opmath_type<T>* shifts = nullptr) {
  using A = at::opmath_type<T>;
  using VT = VecT<T>;
  using V = typename VT::V;
  const int64_t K = static_cast<int64_t>(zs.size());
  const T* const* zp = zs.data();
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    if (K == 1) {  // a batch norm's normalisation: one input, no loop over inputs in the hot loop
      const T* z = zp[0];
      for (int64_t r = r0; r < r1; ++r) {
        bn_channel_loop<T>(
            C,
            [&](int64_t c) {
              V zv = VT::load(z + r * C + c);
              if (shifts) zv = zv - V::loadu(shifts + c);
              VT::store(out + r * C + c, at::vec::fmadd(V::loadu(coef + c), zv, V::loadu(bias + c)));
            },
            [&](int64_t c) {
              const A zv = static_cast<A>(z[r * C + c]) - (shifts ? shifts[c] : A(0));
              out[r * C + c] = static_cast<T>(bias[c] + coef[c] * zv);
            });
      }
      return;
    }
    for (int64_t r = r0; r < r1; ++r) {
      bn_channel_loop<T>(
          C,
          [&](int64_t c) {
            V acc = V::loadu(bias + c);
            for (int64_t k = 0; k < K; ++k) {
              V zv = VT::load(zp[k] + r * C + c);
              if (shifts) zv = zv - V::loadu(shifts + k * C + c);
              acc = at::vec::fmadd(V::loadu(coef + k * C + c), zv, acc);
            }
            VT::store(out + r * C + c, acc);
          },
          [&](int64_t c) {
            A acc = bias[c];
            for (int64_t k = 0; k < K; ++k) {
              acc += coef[k * C + c] * (static_cast<A>(zp[k][r * C + c]) - (shifts ? shifts[k * C + c] : A(0)));
            }
            out[r * C + c] = static_cast<T>(acc);
          });
    }
  });
}

// sums[c] = sum_r g[r, c] and sums[(1 + k) C + c] = sum_r g[r, c] (z_k[r, c] - shifts[k * C + c]) (shifts 0 when
// not given), deterministic
template <typename T>
std::vector<at::opmath_type<T>> grad_dot_sums(const T* g, const std::vector<const T*>& zs, int64_t M, int64_t C,
                                              const at::opmath_type<T>* shifts = nullptr) {
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
      // the block of g stays in L1 while every z_k is read against it; sum(g) rides along with the first
      for (int64_t k = 0; k < std::max<int64_t>(K, 1); ++k) {
        const T* z = k < K ? zs[k] : nullptr;
        A* dot = p + (k + 1) * C;
        bn_channel_chunks<T>(
            C,
            [&](auto u_count, int64_t c) {
              constexpr int64_t U = decltype(u_count)::value;
              constexpr int64_t Wv = VT::W;
              V s[U], d[U], sh[U];
              for (int64_t u = 0; u < U; ++u) {
                s[u] = d[u] = V(A(0));
                sh[u] = (z != nullptr && shifts) ? V::loadu(shifts + k * C + c + u * Wv) : V(A(0));
              }
              if (k > 0) {
                for (int64_t r = r0; r < r1; ++r) {
                  for (int64_t u = 0; u < U; ++u) {
                    const int64_t i = r * C + c + u * Wv;
                    d[u] = at::vec::fmadd(VT::load(g + i), VT::load(z + i) - sh[u], d[u]);
                  }
                }
              } else if (z != nullptr) {
                for (int64_t r = r0; r < r1; ++r) {
                  for (int64_t u = 0; u < U; ++u) {
                    const int64_t i = r * C + c + u * Wv;
                    const V gv = VT::load(g + i);
                    s[u] = s[u] + gv;
                    d[u] = at::vec::fmadd(gv, VT::load(z + i) - sh[u], d[u]);
                  }
                }
              } else {
                for (int64_t r = r0; r < r1; ++r) {
                  for (int64_t u = 0; u < U; ++u) s[u] = s[u] + VT::load(g + r * C + c + u * Wv);
                }
              }
              for (int64_t u = 0; u < U; ++u) {
                if (k == 0) s[u].store(p + c + u * Wv);
                if (z != nullptr) d[u].store(dot + c + u * Wv);
              }
            },
            [&](int64_t c) {
              A s = 0, d = 0;
              const A sh = (z != nullptr && shifts) ? shifts[k * C + c] : A(0);
              for (int64_t r = r0; r < r1; ++r) {
                s += static_cast<A>(g[r * C + c]);
                if (z != nullptr) d += static_cast<A>(g[r * C + c]) * (static_cast<A>(z[r * C + c]) - sh);
              }
              if (k == 0) p[c] = s;
              if (z != nullptr) dot[c] = d;
            });
      }
    }
  });
  std::vector<A> total(width, A(0));
  for (int64_t b = 0; b < nblocks; ++b)
    for (int64_t i = 0; i < width; ++i) total[i] += partial[b * width + i];
  return total;
}

// gz[r, c] = a[c] g[r, c] + b[c] (z[r, c] - shift[c]) + cc[c] (shift 0 when not given)
template <typename T>
void per_channel_affine_grad(const T* g, const T* z, const at::opmath_type<T>* a, const at::opmath_type<T>* b,
                             const at::opmath_type<T>* cc, T* gz, int64_t M, int64_t C,
                             const at::opmath_type<T>* shift = nullptr) {
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
            V zv = VT::load(z + r * C + c);
            if (shift) zv = zv - V::loadu(shift + c);
            VT::store(gz + r * C + c, at::vec::fmadd(V::loadu(b + c), zv, v));
          },
          [&](int64_t c) {
            const A zv = static_cast<A>(z[r * C + c]) - (shift ? shift[c] : A(0));
            gz[r * C + c] = static_cast<T>(a[c] * static_cast<A>(g[r * C + c]) + b[c] * zv + cc[c]);
          });
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
