// mixed_sum: the weighted sum of a node's candidate outputs, sum_k w[k] xs[k], and its two backward ops.
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

// Elements per deterministic partial sum of the weight gradient (a chunk of grad stays in L1 for all K).
constexpr int64_t kChunk = 4096;

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

namespace {

Tensor mixed_sum(at::TensorList xs, const Tensor& weights) {
  check_mixed_sum(xs, weights);
  check_device_type("mixed_sum", "xs[0]", xs[0], at::kCPU);
  Tensor out = at::empty_like(xs[0]);
  if (out.numel() == 0) return out;
  std::vector<Tensor> xd;
  xd.reserve(xs.size());
  for (const Tensor& x : xs) xd.push_back(with_strides_of(x, out));
  Tensor w = as_acc(weights, out.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fastnas::mixed_sum", [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> ptrs;
    for (const Tensor& x : xd) ptrs.push_back(x.const_data_ptr<scalar_t>());
    mixed_sum_fwd<scalar_t>(ptrs, w.const_data_ptr<A>(), out.data_ptr<scalar_t>(), out.numel());
  });
  return out;
}

// shared by both backward ops: xs empty -> no weight gradient
std::tuple<std::vector<Tensor>, Tensor> mixed_sum_bwd_impl(const Tensor& grad, at::TensorList xs,
                                                           const Tensor& weights, bool need_xs_grad) {
  const int64_t K = weights.size(0);
  std::vector<Tensor> gxs;
  if (need_xs_grad) {
    for (int64_t k = 0; k < K; ++k) gxs.push_back(at::empty_like(grad));
  }
  // the element order every operand is brought to: that of the (dense) gradients
  Tensor gd_like = !gxs.empty() ? gxs[0] : grad.is_non_overlapping_and_dense() ? grad : at::empty_like(grad);
  const bool want_w = !xs.empty();
  Tensor gw_acc = at::zeros({want_w ? K : 0}, grad.options().dtype(acc_dtype(grad.scalar_type())));
  if (grad.numel() > 0 && (need_xs_grad || want_w)) {
    Tensor g = with_strides_of(grad, gd_like);
    std::vector<Tensor> xd;
    for (const Tensor& x : xs) xd.push_back(with_strides_of(x, gd_like));
    Tensor w = as_acc(weights, grad.scalar_type());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "fastnas::mixed_sum_backward", [&] {
      using A = at::opmath_type<scalar_t>;
      std::vector<const scalar_t*> xp;
      for (const Tensor& x : xd) xp.push_back(x.const_data_ptr<scalar_t>());
      std::vector<scalar_t*> gp;
      for (Tensor& t : gxs) gp.push_back(t.data_ptr<scalar_t>());
      mixed_sum_bwd<scalar_t>(g.const_data_ptr<scalar_t>(), xp, w.const_data_ptr<A>(), gp,
                              want_w ? gw_acc.data_ptr<A>() : nullptr, K, grad.numel());
    });
  }
  Tensor gw = want_w ? at::empty_like(weights) : at::empty({0}, weights.options());
  if (want_w) gw.copy_(gw_acc);
  return {gxs, gw};
}

std::tuple<std::vector<Tensor>, Tensor> mixed_sum_backward(const Tensor& grad, at::TensorList xs,
                                                           const Tensor& weights, bool need_xs_grad) {
  check_mixed_sum_backward(grad, xs, weights, at::kCPU);
  return mixed_sum_bwd_impl(grad, xs, weights, need_xs_grad);
}

std::vector<Tensor> mixed_sum_backward_xs(const Tensor& grad, const Tensor& weights) {
  check_mixed_sum_backward_xs(grad, weights, at::kCPU);
  return std::get<0>(mixed_sum_bwd_impl(grad, {}, weights, true));
}

}  // namespace

// the CPU kernels of mixed_sum
inline void register_mixed_sum(torch::Library& m) {
  m.impl("mixed_sum", &mixed_sum);
  m.impl("mixed_sum_backward", &mixed_sum_backward);
  m.impl("mixed_sum_backward_xs", &mixed_sum_backward_xs);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
