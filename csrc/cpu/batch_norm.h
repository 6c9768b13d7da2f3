// Affine-free batch norm in training mode on channels_last data x [M, C] (M = N*H*W rows), vectorised over the
// channels:
//   forward:  per-channel mean and biased variance in one pass over x (each block of rows is summed twice while it is
//             in L1, then the blocks are merged with Chan's formula), then y = (x - mean) * invstd;
//   backward: gx = invstd * (g - mean(g) - y * mean(g * y)), from the output y (one pass for the two sums, one for gx).
// Deterministic: the row blocks depend on M and C only and are merged in order.
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
      const A inv_n = A(1) / static_cast<A>(r1 - r0);
      A* mu = bmean.data() + b * C;
      A* m2 = bm2.data() + b * C;
      bn_channel_loop<T>(
          C,
          [&](int64_t c) {
            V s(A(0));
            for (int64_t r = r0; r < r1; ++r) s = s + VT::load(x + r * C + c);
            const V m = s * V(inv_n);
            V q(A(0));
            for (int64_t r = r0; r < r1; ++r) {
              const V d = VT::load(x + r * C + c) - m;
              q = at::vec::fmadd(d, d, q);
            }
            m.store(mu + c);
            q.store(m2 + c);
          },
          [&](int64_t c) {
            A s = 0;
            for (int64_t r = r0; r < r1; ++r) s += static_cast<A>(x[r * C + c]);
            const A m = s * inv_n;
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

// y = (x - mean) * invstd
template <typename T>
void bn_normalize(const T* x, T* y, int64_t M, int64_t C, const at::opmath_type<T>* mean,
                  const at::opmath_type<T>* invstd) {
  using A = at::opmath_type<T>;
  using VT = VecT<T>;
  using V = typename VT::V;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // row by row: each row is read and written once
      const T* xr = x + r * C;
      T* yr = y + r * C;
      bn_channel_loop<T>(
          C, [&](int64_t c) { VT::store(yr + c, (VT::load(xr + c) - V::loadu(mean + c)) * V::loadu(invstd + c)); },
          [&](int64_t c) { yr[c] = static_cast<T>((static_cast<A>(xr[c]) - mean[c]) * invstd[c]); });
    }
  });
}

// gx = invstd * (g - mean(g) - y * mean(g * y))
template <typename T>
void bn_backward(const T* g, const T* y, T* gx, int64_t M, int64_t C, const at::opmath_type<T>* invstd) {
  using A = at::opmath_type<T>;
  using VT = VecT<T>;
  using V = typename VT::V;
  const int64_t R = bn_block_rows(C);
  const int64_t nblocks = (M + R - 1) / R;
  std::vector<A> bsum(nblocks * C), bdot(nblocks * C);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * R, r1 = std::min(M, r0 + R);
      A* sp = bsum.data() + b * C;
      A* dp = bdot.data() + b * C;
      bn_channel_loop<T>(
          C,
          [&](int64_t c) {
            V s(A(0)), d(A(0));
            for (int64_t r = r0; r < r1; ++r) {
              const V gv = VT::load(g + r * C + c);
              s = s + gv;
              d = at::vec::fmadd(gv, VT::load(y + r * C + c), d);
            }
            s.store(sp + c);
            d.store(dp + c);
          },
          [&](int64_t c) {
            A s = 0, d = 0;
            for (int64_t r = r0; r < r1; ++r) {
              s += static_cast<A>(g[r * C + c]);
              d += static_cast<A>(g[r * C + c]) * static_cast<A>(y[r * C + c]);
            }
            sp[c] = s;
            dp[c] = d;
          });
    }
  });
  std::vector<A> mg(C, A(0)), mgy(C, A(0));
  for (int64_t b = 0; b < nblocks; ++b)
    for (int64_t c = 0; c < C; ++c) {
      mg[c] += bsum[b * C + c];
      mgy[c] += bdot[b * C + c];
    }
  for (int64_t c = 0; c < C; ++c) {
    mg[c] /= static_cast<A>(M);
    mgy[c] /= static_cast<A>(M);
  }
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C));
  // the shift and scale of g and y per channel: gx = (g - mean(g)) * invstd - y * (mean(g y) * invstd)
  for (int64_t c = 0; c < C; ++c) mgy[c] *= invstd[c];
  const A* mgp = mg.data();
  const A* mgyp = mgy.data();
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* gr = g + r * C;
      const T* yr = y + r * C;
      T* out = gx + r * C;
      bn_channel_loop<T>(
          C,
          [&](int64_t c) {
            const V v = (VT::load(gr + c) - V::loadu(mgp + c)) * V::loadu(invstd + c);
            VT::store(out + c, v - VT::load(yr + c) * V::loadu(mgyp + c));
          },
          [&](int64_t c) {
            out[c] = static_cast<T>((static_cast<A>(gr[c]) - mgp[c]) * invstd[c] - static_cast<A>(yr[c]) * mgyp[c]);
          });
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
