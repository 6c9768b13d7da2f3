// CPU kernels of the fastnas ops, on raw pointers. Vectorised with at::vec::Vectorized, multi-threaded with
// at::parallel_for, accumulating in at::opmath_type<T> (float for half types, double for double).
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
// Elements per deterministic partial sum of mixed_sum's weight gradient (a chunk of grad stays in L1 for all K).
constexpr int64_t kChunk = 4096;

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

// ------------------------------------------------------------------------------------------------ mixed_sum

// out = sum_k w[k] xs[k] for K known at compile time (the common DARTS case: every pointer and weight in a register,
// one pass over the inputs).
template <typename T, int K>
void mixed_sum_fwd_k(const T* const* xs_in, const at::opmath_type<T>* w, T* out, int64_t n) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    const T* xs[K];
    A wk[K];
    for (int k = 0; k < K; ++k) {
      xs[k] = xs_in[k];
      wk[k] = w[k];
    }
    int64_t i = b;
    for (; i + 2 * W <= e; i += 2 * W) {
      V a0 = VT::load(xs[0] + i) * V(wk[0]);
      V a1 = VT::load(xs[0] + i + W) * V(wk[0]);
      for (int k = 1; k < K; ++k) {
        a0 = at::vec::fmadd(VT::load(xs[k] + i), V(wk[k]), a0);
        a1 = at::vec::fmadd(VT::load(xs[k] + i + W), V(wk[k]), a1);
      }
      VT::store(out + i, a0);
      VT::store(out + i + W, a1);
    }
    for (; i < e; ++i) {
      A acc = A(xs[0][i]) * wk[0];
      for (int k = 1; k < K; ++k) acc += A(xs[k][i]) * wk[k];
      out[i] = T(acc);
    }
  });
}

// any K: the inputs in groups, the running sum kept in the output's accumulation type
template <typename T>
void mixed_sum_fwd_any(const std::vector<const T*>& xs, const at::opmath_type<T>* w, T* out, int64_t n) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  const int64_t K = static_cast<int64_t>(xs.size());
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    int64_t i = b;
    for (; i + W <= e; i += W) {
      V acc = VT::load(xs[0] + i) * V(w[0]);
      for (int64_t k = 1; k < K; ++k) acc = at::vec::fmadd(VT::load(xs[k] + i), V(w[k]), acc);
      VT::store(out + i, acc);
    }
    for (; i < e; ++i) {
      A acc = A(xs[0][i]) * w[0];
      for (int64_t k = 1; k < K; ++k) acc += A(xs[k][i]) * w[k];
      out[i] = T(acc);
    }
  });
}

template <typename T>
void mixed_sum_fwd(const std::vector<const T*>& xs, const at::opmath_type<T>* w, T* out, int64_t n) {
  switch (xs.size()) {
    case 1: return mixed_sum_fwd_k<T, 1>(xs.data(), w, out, n);
    case 2: return mixed_sum_fwd_k<T, 2>(xs.data(), w, out, n);
    case 3: return mixed_sum_fwd_k<T, 3>(xs.data(), w, out, n);
    case 4: return mixed_sum_fwd_k<T, 4>(xs.data(), w, out, n);
    case 5: return mixed_sum_fwd_k<T, 5>(xs.data(), w, out, n);
    case 6: return mixed_sum_fwd_k<T, 6>(xs.data(), w, out, n);
    case 7: return mixed_sum_fwd_k<T, 7>(xs.data(), w, out, n);
    case 8: return mixed_sum_fwd_k<T, 8>(xs.data(), w, out, n);
    default: return mixed_sum_fwd_any<T>(xs, w, out, n);
  }
}

// One chunk [lo, hi) of the backward for K known at compile time: gx[k] = w[k] g (WantX), partial[k] = sum g xs[k]
// (WantW), one pass over g and the inputs.
template <typename T, int K, bool WantX, bool WantW, bool Stream>
C10_ALWAYS_INLINE void mixed_sum_bwd_chunk(const T* g, const T* const* xs_in, const at::opmath_type<T>* w,
                                           T* const* gx_in, at::opmath_type<T>* partial, int64_t lo, int64_t hi) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  const T* xs[K];
  T* gx[K];
  A wk[K];
  V acc[K];
  A tail[K];
  for (int k = 0; k < K; ++k) {
    xs[k] = WantW ? xs_in[k] : nullptr;
    gx[k] = WantX ? gx_in[k] : nullptr;
    wk[k] = w[k];
    acc[k] = V(A(0));
    tail[k] = A(0);
  }
  int64_t i = lo;
  for (; i + W <= hi; i += W) {
    const V gv = VT::load(g + i);
    for (int k = 0; k < K; ++k) {
      if constexpr (WantX) {
        if constexpr (Stream) {
          VT::store_stream(gx[k] + i, gv * V(wk[k]));
        } else {
          VT::store(gx[k] + i, gv * V(wk[k]));
        }
      }
      if constexpr (WantW) acc[k] = at::vec::fmadd(gv, VT::load(xs[k] + i), acc[k]);
    }
  }
  for (; i < hi; ++i) {
    const A gi = A(g[i]);
    for (int k = 0; k < K; ++k) {
      if constexpr (WantX) gx[k][i] = T(gi * wk[k]);
      if constexpr (WantW) tail[k] += gi * A(xs[k][i]);
    }
  }
  if constexpr (WantW) {
    for (int k = 0; k < K; ++k) partial[k] = hsum(acc[k]) + tail[k];
  }
}

// Any K: input by input over the chunk (the chunk of g stays in L1).
template <typename T>
void mixed_sum_bwd_chunk_any(const T* g, const std::vector<const T*>& xs, const at::opmath_type<T>* w,
                             const std::vector<T*>& gxs, at::opmath_type<T>* partial, int64_t K, int64_t lo,
                             int64_t hi) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  const bool want_x = !gxs.empty();
  const bool want_w = !xs.empty();
  for (int64_t k = 0; k < K; ++k) {
    const V wk(w[k]);
    V acc(A(0));
    A tail = 0;
    int64_t i = lo;
    for (; i + W <= hi; i += W) {
      V gv = VT::load(g + i);
      if (want_x) VT::store(gxs[k] + i, gv * wk);
      if (want_w) acc = at::vec::fmadd(gv, VT::load(xs[k] + i), acc);
    }
    for (; i < hi; ++i) {
      A gi = A(g[i]);
      if (want_x) gxs[k][i] = T(gi * w[k]);
      if (want_w) tail += gi * A(xs[k][i]);
    }
    if (want_w) partial[k] = hsum(acc) + tail;
  }
}

template <typename T, int K, bool WantX, bool WantW, typename A = at::opmath_type<T>>
void mixed_sum_bwd_chunks(const T* g, const std::vector<const T*>& xs, const at::opmath_type<T>* w,
                          const std::vector<T*>& gxs, at::opmath_type<T>* partial, int64_t n, int64_t nchunks) {
  // big gradients are written around the cache (chunk starts are multiples of kChunk elements: aligned when the
  // tensors are)
  bool stream = WantX && VecT<T>::kCanStream && n * int64_t(sizeof(T)) >= kStreamBytes;
  for (T* p : gxs) stream = stream && reinterpret_cast<uintptr_t>(p) % sizeof(typename VecT<T>::V) == 0;
  at::parallel_for(0, nchunks, std::max<int64_t>(1, kGrain / kChunk), [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(n, (c + 1) * kChunk);
      A* pc = WantW ? partial + c * K : nullptr;
      if (stream) {
        mixed_sum_bwd_chunk<T, K, WantX, WantW, true>(g, xs.data(), w, gxs.data(), pc, lo, hi);
      } else {
        mixed_sum_bwd_chunk<T, K, WantX, WantW, false>(g, xs.data(), w, gxs.data(), pc, lo, hi);
      }
    }
    if (stream) stream_fence();
  });
}

template <typename T, int K>
void mixed_sum_bwd_k(const T* g, const std::vector<const T*>& xs, const at::opmath_type<T>* w,
                     const std::vector<T*>& gxs, at::opmath_type<T>* partial, int64_t n, int64_t nchunks) {
  const bool want_x = !gxs.empty(), want_w = !xs.empty();
  if (want_x && want_w) return mixed_sum_bwd_chunks<T, K, true, true>(g, xs, w, gxs, partial, n, nchunks);
  if (want_x) return mixed_sum_bwd_chunks<T, K, true, false>(g, xs, w, gxs, partial, n, nchunks);
  if (want_w) return mixed_sum_bwd_chunks<T, K, false, true>(g, xs, w, gxs, partial, n, nchunks);
}

// grad_xs[k] = w[k] * g (when gxs is not empty) and grad_w[k] = sum g * xs[k] (when xs is not empty), one pass.
// The weight gradient is summed per fixed chunk of kChunk elements, then over the chunks in order: deterministic.
template <typename T>
void mixed_sum_bwd(const T* g, const std::vector<const T*>& xs, const at::opmath_type<T>* w,
                   const std::vector<T*>& gxs, at::opmath_type<T>* gw, int64_t K, int64_t n) {
  using A = at::opmath_type<T>;
  const bool want_w = !xs.empty();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<A> partial(want_w ? nchunks * K : 0);
  switch (K) {
    case 1: mixed_sum_bwd_k<T, 1>(g, xs, w, gxs, partial.data(), n, nchunks); break;
    case 2: mixed_sum_bwd_k<T, 2>(g, xs, w, gxs, partial.data(), n, nchunks); break;
    case 3: mixed_sum_bwd_k<T, 3>(g, xs, w, gxs, partial.data(), n, nchunks); break;
    case 4: mixed_sum_bwd_k<T, 4>(g, xs, w, gxs, partial.data(), n, nchunks); break;
    case 5: mixed_sum_bwd_k<T, 5>(g, xs, w, gxs, partial.data(), n, nchunks); break;
    case 6: mixed_sum_bwd_k<T, 6>(g, xs, w, gxs, partial.data(), n, nchunks); break;
    case 7: mixed_sum_bwd_k<T, 7>(g, xs, w, gxs, partial.data(), n, nchunks); break;
    case 8: mixed_sum_bwd_k<T, 8>(g, xs, w, gxs, partial.data(), n, nchunks); break;
    default:
      at::parallel_for(0, nchunks, std::max<int64_t>(1, kGrain / kChunk), [&](int64_t cb, int64_t ce) {
        for (int64_t c = cb; c < ce; ++c) {
          mixed_sum_bwd_chunk_any<T>(g, xs, w, gxs, want_w ? partial.data() + c * K : nullptr, K, c * kChunk,
                                     std::min(n, (c + 1) * kChunk));
        }
      });
  }
  if (want_w) {
    for (int64_t k = 0; k < K; ++k) {
      A s = 0;
      for (int64_t c = 0; c < nchunks; ++c) s += partial[c * K + k];
      gw[k] = s;
    }
  }
}

// ------------------------------------------------------------------------------------------------ channel_pool

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

// ------------------------------------------------------------------------------------------------ spatial_pool

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

// ------------------------------------------------------------------------------------------------ scales

// One row: o[i] = x[i] * s (+ shift when given).
template <typename T>
C10_ALWAYS_INLINE void scale_row_by_scalar(const T* x, at::opmath_type<T> s, T* o, int64_t len,
                                           const at::opmath_type<T>* shift) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  const V vs(s);
  int64_t i = 0;
  if (shift) {
    const A a = *shift;
    const V va(a);
    for (; i + W <= len; i += W) VT::store(o + i, at::vec::fmadd(VT::load(x + i), vs, va));
    for (; i < len; ++i) o[i] = T(A(x[i]) * s + a);
  } else {
    for (; i + W <= len; i += W) VT::store(o + i, VT::load(x + i) * vs);
    for (; i < len; ++i) o[i] = T(A(x[i]) * s);
  }
}

// One row: o[i] = x[i] * s[i] (+ shift[i] when given).
template <typename T>
C10_ALWAYS_INLINE void scale_row_by_vector(const T* x, const at::opmath_type<T>* s, T* o, int64_t len,
                                           const at::opmath_type<T>* shift) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  int64_t i = 0;
  if (shift) {
    for (; i + W <= len; i += W)
      VT::store(o + i, at::vec::fmadd(VT::load(x + i), V::loadu(s + i), V::loadu(shift + i)));
    for (; i < len; ++i) o[i] = T(A(x[i]) * s[i] + shift[i]);
  } else {
    for (; i + W <= len; i += W) VT::store(o + i, VT::load(x + i) * V::loadu(s + i));
    for (; i < len; ++i) o[i] = T(A(x[i]) * s[i]);
  }
}

// Backward of one scale_row_by_scalar row: gx[i] = g[i] * s (if gx); returns sum_i g[i] * x[i].
template <typename T>
C10_ALWAYS_INLINE at::opmath_type<T> scale_row_by_scalar_bwd(const T* g, const T* x, at::opmath_type<T> s, T* gx,
                                                             int64_t len) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  const V vs(s);
  V acc(A(0));
  A tail = 0;
  int64_t i = 0;
  if (gx) {
    for (; i + W <= len; i += W) {
      V gv = VT::load(g + i);
      VT::store(gx + i, gv * vs);
      acc = at::vec::fmadd(gv, VT::load(x + i), acc);
    }
    for (; i < len; ++i) {
      A gi = A(g[i]);
      gx[i] = T(gi * s);
      tail += gi * A(x[i]);
    }
  } else {
    for (; i + W <= len; i += W) acc = at::vec::fmadd(VT::load(g + i), VT::load(x + i), acc);
    for (; i < len; ++i) tail += A(g[i]) * A(x[i]);
  }
  return hsum(acc) + tail;
}

// Backward of one scale_row_by_vector row: gx[i] = g[i] * s[i] (if gx), d[i] += g[i] * x[i].
template <typename T>
C10_ALWAYS_INLINE void scale_row_by_vector_bwd(const T* g, const T* x, const at::opmath_type<T>* s, T* gx,
                                               at::opmath_type<T>* d, int64_t len) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  int64_t i = 0;
  if (gx) {
    for (; i + W <= len; i += W) {
      V gv = VT::load(g + i);
      VT::store(gx + i, gv * V::loadu(s + i));
      at::vec::fmadd(gv, VT::load(x + i), V::loadu(d + i)).store(d + i);
    }
    for (; i < len; ++i) {
      A gi = A(g[i]);
      gx[i] = T(gi * s[i]);
      d[i] += gi * A(x[i]);
    }
  } else {
    for (; i + W <= len; i += W) at::vec::fmadd(VT::load(g + i), VT::load(x + i), V::loadu(d + i)).store(d + i);
    for (; i < len; ++i) d[i] += A(g[i]) * A(x[i]);
  }
}

// Row-wise product: out[r, :] = x[r, :] * s[r] (+ shift[r] when shift is given) (channel_scale NCHW) for rows of
// length len.
template <typename T>
void scale_rows_by_scalar(const T* x, const at::opmath_type<T>* s, T* out, int64_t rows, int64_t len,
                          const at::opmath_type<T>* shift = nullptr) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(len, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      scale_row_by_scalar<T>(x + r * len, s[r], out + r * len, len, shift ? shift + r : nullptr);
    }
  });
}

// Row-wise product with a vector: out[r, :] = x[r, :] * s[(r / group) % ngroups, :] (+ the same row of shift when
// given) for rows of length len.
// channel_scale NHWC: rows = N*HW, group = HW, s [N, C]; spatial_scale NCHW: rows = N*C, group = C, s [N, HW].
template <typename T>
void scale_rows_by_vector(const T* x, const at::opmath_type<T>* s, T* out, int64_t rows, int64_t len, int64_t group,
                          const at::opmath_type<T>* shift = nullptr) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(len, 1)), [&](int64_t b, int64_t e) {
    int64_t grp = b / group, left = group - b % group;  // the row's group, and its rows from here on
    for (int64_t r = b; r < e; ++r) {
      const int64_t off = grp * len;
      scale_row_by_vector<T>(x + r * len, s + off, out + r * len, len, shift ? shift + off : nullptr);
      if (--left == 0) {
        ++grp;
        left = group;
      }
    }
  });
}

// Backward of scale_rows_by_scalar: gx[r, :] = g[r, :] * s[r] (if gx), d[r] = sum_i g[r, i] * x[r, i].
template <typename T>
void scale_rows_by_scalar_bwd(const T* g, const T* x, const at::opmath_type<T>* s, T* gx, at::opmath_type<T>* d,
                              int64_t rows, int64_t len) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(len, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      d[r] = scale_row_by_scalar_bwd<T>(g + r * len, x + r * len, s[r], gx ? gx + r * len : nullptr, len);
    }
  });
}

// Backward of scale_rows_by_vector, reducing over the rows of each group:
// gx[r, :] = g[r, :] * s[grp, :] (if gx), d[grp, :] = sum over the rows r of group grp of g[r, :] * x[r, :].
// One task per group: its rows are summed in order.
template <typename T>
void scale_rows_by_vector_bwd(const T* g, const T* x, const at::opmath_type<T>* s, T* gx, at::opmath_type<T>* d,
                              int64_t groups, int64_t group, int64_t len) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, groups, std::max<int64_t>(1, kGrain / std::max<int64_t>(len * group, 1)), [&](int64_t b,
                                                                                                    int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      A* dn = d + n * len;
      std::fill(dn, dn + len, A(0));
      for (int64_t j = 0; j < group; ++j) {
        const int64_t r = n * group + j;
        scale_row_by_vector_bwd<T>(g + r * len, x + r * len, s + n * len, gx ? gx + r * len : nullptr, dn, len);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------ channel gate

// The max's share of a channel gate's input gradient, after scale_rows_* wrote g * s + a everywhere: the element at
// each channel's first maximum becomes g * s + a + m. s, a, m, arg are [N, C]; element (n, c, hw) of out and g is at
// n * s_n + c * s_c + hw * s_hw (NCHW or NHWC strides, in elements).
template <typename T>
void channel_gate_add_max_share(const T* g, const at::opmath_type<T>* s, const at::opmath_type<T>* a,
                                const at::opmath_type<T>* m, const int32_t* arg, T* out, int64_t N, int64_t C,
                                int64_t s_n, int64_t s_c, int64_t s_hw) {
  using A = at::opmath_type<T>;
  for (int64_t n = 0; n < N; ++n) {  // one element per (n, c)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t k = n * C + c;
      const int64_t i = n * s_n + c * s_c + int64_t(arg[k]) * s_hw;
      out[i] = T(A(g[i]) * s[k] + a[k] + m[k]);
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
