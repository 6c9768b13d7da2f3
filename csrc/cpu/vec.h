// The vector helpers shared by the CPU kernels of the fastnas ops (csrc/cpu/<op>.h), which work on raw pointers:
// vectorised with at::vec::Vectorized, multi-threaded with at::parallel_for, accumulating in at::opmath_type<T> (float
// for half types, double for double).
//
// Every reduction is deterministic: the work is cut into chunks whose bounds depend on the problem size only (never on
// the number of threads), each chunk sums in a fixed order, and the chunk partials are added in a fixed order.
//
// Included by one translation unit per CPU capability; everything here lives in a namespace named after it.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fastnas::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Elements per parallel task of a streaming kernel.
constexpr int64_t kGrain = 32768;

// The float index lanes of the pooling kernels are exact below 2^24.
inline void check_index_range(const char* op, int64_t n) {
  TORCH_CHECK_VALUE(n < (int64_t(1) << 24), "fastnas.", op, ": the reduced dimension has ", n,
                    " elements, expected fewer than 2^24");
}

template <typename T>
struct VecT {
  using A = at::opmath_type<T>;
  using V = Vectorized<A>;
  static constexpr int64_t W = V::size();

  static C10_ALWAYS_INLINE V load(const T* p) {
    if constexpr (std::is_same_v<T, A>) {
      return V::loadu(p);
    } else {
      V v;
      at::vec::load_to_float<T>(p, v);
      return v;
    }
  }
  static C10_ALWAYS_INLINE void store(T* p, const V& v) {
    if constexpr (std::is_same_v<T, A>) {
      v.store(p);
    } else {
      at::vec::convert_from_float<T>(v, v).store(p, W);
    }
  }
  // Whether store_stream bypasses the cache for T (p must then be aligned to the vector size).
  static constexpr bool kCanStream =
#if defined(CPU_CAPABILITY_AVX2)
      std::is_same_v<T, float> || std::is_same_v<T, double>;
#else
      false;
#endif
  // A non-temporal store: for big outputs that are not read again soon (saves the read-for-ownership of the line).
  static C10_ALWAYS_INLINE void store_stream(T* p, const V& v) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(p, v);
      return;
    } else if constexpr (std::is_same_v<T, double>) {
      _mm256_stream_pd(p, v);
      return;
    }
#endif
    store(p, v);
  }
};

// Orders non-temporal stores before whatever follows (end of a parallel task).
C10_ALWAYS_INLINE void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Outputs at least this big (bytes per tensor) are written with non-temporal stores where possible.
constexpr int64_t kStreamBytes = int64_t(1) << 21;

template <typename A>
C10_ALWAYS_INLINE A sigmoid(A v) {
  return A(1) / (A(1) + std::exp(-v));
}

// s[i] = sigmoid(l[i]), vectorised
template <typename A>
void sigmoid_into(const A* l, A* s, int64_t n) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    const V one(A(1));
    int64_t i = b;
    for (; i + W <= e; i += W) (one / (one + V::loadu(l + i).neg().exp())).store(s + i);
    for (; i < e; ++i) s[i] = sigmoid(l[i]);
  });
}

template <typename A>
C10_ALWAYS_INLINE A hsum(const Vectorized<A>& v) {
  __at_align__ A buf[Vectorized<A>::size()];
  v.store(buf);
  A s = buf[0];
  for (int64_t l = 1; l < Vectorized<A>::size(); ++l) s += buf[l];
  return s;
}

// Does candidate (value v at index i) replace the current best (value m at index j < i)? NaN wins, then larger.
template <typename A>
C10_ALWAYS_INLINE bool beats_later(A v, A m) {
  return !std::isnan(m) && (std::isnan(v) || v > m);
}

// A running (sum, max, first argmax) over a row; the vector lanes see indices l, l + W, l + 2W, ... in order.
template <typename A>
struct PoolAcc {
  A sum = 0;
  A max = 0;
  int64_t arg = 0;
};

// Vector update of a running max/argmax: take v where it is larger, or NaN while the running max is not.
template <typename V>
C10_ALWAYS_INLINE V take_mask(const V& v, const V& m) {
  return (v > m) | (v.isnan() & (m == m));
}

// Merge two running (max, index) vectors lane by lane: the NaN, else the larger, else the smaller index.
template <typename V>
C10_ALWAYS_INLINE void merge_max(V& m, V& id, const V& m2, const V& id2) {
  const V nan1 = m.isnan(), nan2 = m2.isnan();
  const V earlier = id2 < id;
  const V take = (m2 > m) | (nan2 & ~nan1) | ((m2 == m) & earlier) | (nan1 & nan2 & earlier);
  m = V::blendv(m, m2, take);
  id = V::blendv(id, id2, take);
}

// [begin, end) in chunks of four, two and one vectors of W elements, in order: body(std::integral_constant<int64_t, U>,
// i) for each chunk (U independent vector chains hide the latency of a reduction's add or compare-blend chain).
// Returns where the chunks end; the rest (fewer than W elements) is the caller's.
template <int64_t W, typename Body>
C10_ALWAYS_INLINE int64_t vector_chunks(int64_t begin, int64_t end, Body body) {
  int64_t i = begin;
  for (; i + 4 * W <= end; i += 4 * W) body(std::integral_constant<int64_t, 4>{}, i);
  for (; i + 2 * W <= end; i += 2 * W) body(std::integral_constant<int64_t, 2>{}, i);
  for (; i + W <= end; i += W) body(std::integral_constant<int64_t, 1>{}, i);
  return i;
}

// One step of a running (sum s, max m, index id of the first max) vector lane, fed values v at index idx in
// increasing order. The max is NaN-blind (v > m): a NaN makes the lane's sum NaN, and the callers redo it exactly.
template <typename V>
C10_ALWAYS_INLINE void pool_lane_add(V& s, V& m, V& id, const V& v, const V& idx) {
  s = s + v;
  const V take = v > m;
  m = V::blendv(m, v, take);
  id = V::blendv(id, idx, take);
}

// U pool lanes over n >= 1 steps: step k reads the U vectors at base + k * stride + u * W (its index is k); the
// lanes start from step 0.
template <typename T, int64_t U, typename V>
C10_ALWAYS_INLINE void pool_lanes_strided(const T* base, int64_t stride, int64_t n, V (&s)[U], V (&m)[U], V (&id)[U]) {
  using A = at::opmath_type<T>;
  constexpr int64_t W = V::size();
  for (int64_t u = 0; u < U; ++u) {
    s[u] = m[u] = VecT<T>::load(base + u * W);
    id[u] = V(A(0));
  }
  for (int64_t k = 1; k < n; ++k) {
    const V vk(static_cast<A>(k));
    const T* step = base + k * stride;
    for (int64_t u = 0; u < U; ++u) pool_lane_add(s[u], m[u], id[u], VecT<T>::load(step + u * W), vk);
  }
}

// Sum, NaN-propagating max and index of the first maximum of p[0..n) (n >= 1), in one pass. Up to U independent
// vector accumulators hide the latency of the add / max chains; each lane sees its indices in increasing order, and
// merge_max / the final lane scan pick NaN first, then the larger value, then the smaller index.
//
// Exact = false skips the NaN tests in the hot loop (3 of its 8 vector operations): a NaN anywhere makes the sum NaN,
// and reduce_row then redoes the row exactly. (So does a row holding both +inf and -inf: rare, and still right.)
template <typename T, bool Exact>
PoolAcc<at::opmath_type<T>> reduce_row_impl(const T* p, int64_t n) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  constexpr int64_t U = 4;
  PoolAcc<A> r;
  int64_t i = 0;
  if (n >= W) {
    const int64_t u_n = n >= U * W ? U : 1;  // accumulators in use
    V vs[U], vm[U], vi[U];
    const V lane = V::arange(A(0), A(1));
    for (int64_t u = 0; u < u_n; ++u) {
      vs[u] = vm[u] = VT::load(p + u * W);
      vi[u] = lane + V(static_cast<A>(u * W));  // exact: n < 2^24 for float, checked by the caller
    }
    const V step(static_cast<A>(W));
    if (u_n == U) {
      V vidx = lane + V(static_cast<A>(U * W));
      for (i = U * W; i + U * W <= n; i += U * W) {
        for (int64_t u = 0; u < U; ++u) {
          V v = VT::load(p + i + u * W);
          vs[u] = vs[u] + v;
          V take = Exact ? take_mask(v, vm[u]) : (v > vm[u]);
          vm[u] = V::blendv(vm[u], v, take);
          vi[u] = V::blendv(vi[u], vidx, take);
          vidx = vidx + step;
        }
      }
      vs[0] = (vs[0] + vs[1]) + (vs[2] + vs[3]);
      merge_max(vm[0], vi[0], vm[1], vi[1]);
      merge_max(vm[2], vi[2], vm[3], vi[3]);
      merge_max(vm[0], vi[0], vm[2], vi[2]);
    } else {
      V vidx = lane + step;
      for (i = W; i + W <= n; i += W) {
        V v = VT::load(p + i);
        vs[0] = vs[0] + v;
        V take = Exact ? take_mask(v, vm[0]) : (v > vm[0]);
        vm[0] = V::blendv(vm[0], v, take);
        vi[0] = V::blendv(vi[0], vidx, take);
        vidx = vidx + step;
      }
    }
    __at_align__ A m[W];
    __at_align__ A id[W];
    vm[0].store(m);
    vi[0].store(id);
    r.sum = hsum(vs[0]);
    A best = m[0];
    A besti = id[0];
    for (int64_t l = 1; l < W; ++l) {
      bool take;
      if (std::isnan(best)) {
        take = std::isnan(m[l]) && id[l] < besti;
      } else {
        take = std::isnan(m[l]) || m[l] > best || (m[l] == best && id[l] < besti);
      }
      if (take) {
        best = m[l];
        besti = id[l];
      }
    }
    r.max = best;
    r.arg = static_cast<int64_t>(besti);
  } else {
    r.sum = A(p[0]);
    r.max = A(p[0]);
    r.arg = 0;
    i = 1;
  }
  // the rest, in order (every index here is larger than those seen by the vectors)
  for (; i < n; ++i) {
    A v = A(p[i]);
    r.sum += v;
    if (beats_later(v, r.max)) {
      r.max = v;
      r.arg = i;
    }
  }
  return r;
}

template <typename T>
C10_ALWAYS_INLINE PoolAcc<at::opmath_type<T>> reduce_row(const T* p, int64_t n) {
  PoolAcc<at::opmath_type<T>> r = reduce_row_impl<T, false>(p, n);
  if (C10_UNLIKELY(std::isnan(r.sum))) r = reduce_row_impl<T, true>(p, n);
  return r;
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
