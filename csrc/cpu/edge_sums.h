// edge_sums: the weighted sums of every edge leaving one search-cell state (fastnas/ops/defs/edge_sums.py). Edge e's
// output channels [e C, e C + C) = partial's (if given) + sum over the candidates k of weights[e, k] times candidate k
// of edge e: a C-channel unit of a term shared by every edge, or unit g n + e of a per-edge term.
//
// Channels_last data; every term and the partial may be a channel slice of a wider channels_last tensor (read where
// it is). Forward and backward are one pass over the pixels each, vectorised over the channels; the weights'
// gradient is summed per fixed block of pixels, then over the blocks in order (deterministic).
//
// Compiled once per CPU capability (cpu_ops.h), in a namespace named after it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../common.h"
#include "vec.h"

namespace fastnas::cpu {
inline namespace CPU_CAPABILITY {

// Pixels per block of the weights' gradient.
constexpr int64_t kEdgeSumsBlock = 256;

struct EdgeColumn {
  int64_t term;
  bool shared;
  int64_t unit;  // shared: the unit; per edge: the candidate g (edge e reads unit g n + e)
};

struct EdgeSumsProblem {
  int64_t N, H, W, C, n, K;
  std::vector<EdgeColumn> cols;
  std::vector<int64_t> units;  // per term
  // the unit edge e reads for column k
  int64_t unit_of(int64_t k, int64_t e) const { return cols[k].shared ? cols[k].unit : cols[k].unit * n + e; }
};

// the columns of terms of `units` C-channel units each (per_edge: g n + e is candidate g of edge e)
inline void add_columns(const char* op, EdgeSumsProblem& p, at::IntArrayRef units, at::IntArrayRef per_edge,
                        const Tensor& weights) {
  TORCH_CHECK_VALUE(per_edge.size() == units.size(), "fastnas.", op, ": per_edge must hold a 0 or 1 per term (",
                    units.size(), "), got ", per_edge.size(), " values");
  for (size_t t = 0; t < units.size(); ++t) {
    TORCH_CHECK_VALUE(per_edge[t] == 0 || per_edge[t] == 1, "fastnas.", op, ": per_edge[", t, "] must be 0 or 1, got ",
                      per_edge[t]);
    TORCH_CHECK_VALUE(units[t] > 0 && (per_edge[t] == 0 || units[t] % p.n == 0), "fastnas.", op, ": term ", t,
                      " has ", units[t], " units, expected a positive multiple of ", per_edge[t] ? p.n : 1);
    p.units.push_back(units[t]);
    const int64_t columns = per_edge[t] ? units[t] / p.n : units[t];
    for (int64_t g = 0; g < columns; ++g) p.cols.push_back({static_cast<int64_t>(t), per_edge[t] == 0, g});
  }
  p.K = static_cast<int64_t>(p.cols.size());
  TORCH_CHECK_VALUE(weights.size(1) == p.K, "fastnas.", op, ": weights must have shape [", p.n, ", ", p.K,
                    "] (edges, the terms' candidates), got ", shape_str(weights.sizes()));
}

inline void check_weights(const char* op, const Tensor& weights) {
  check_float(op, "weights", weights);
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(0) > 0, "fastnas.", op,
                    ": weights must have shape [edges, candidates], got ", shape_str(weights.sizes()));
}

inline EdgeSumsProblem edge_sums_problem(const char* op, at::TensorList terms, const Tensor& weights,
                                         at::IntArrayRef per_edge, int64_t channels) {
  TORCH_CHECK_VALUE(!terms.empty(), "fastnas.", op, ": terms must hold at least one tensor");
  TORCH_CHECK_VALUE(channels > 0, "fastnas.", op, ": channels must be positive, got ", channels);
  TORCH_CHECK_VALUE(per_edge.size() == terms.size(), "fastnas.", op, ": per_edge must hold a 0 or 1 per term (",
                    terms.size(), "), got ", per_edge.size(), " values");
  check_weights(op, weights);
  const Tensor& x0 = terms[0];
  EdgeSumsProblem p{x0.dim() == 4 ? x0.size(0) : 0, 0, 0, channels, weights.size(0), 0, {}, {}};
  std::vector<int64_t> units;
  for (size_t t = 0; t < terms.size(); ++t) {
    const Tensor& x = terms[t];
    const std::string arg = "terms[" + std::to_string(t) + "]";
    check_4d_on(op, arg, x, at::kCPU);
    check_float(op, arg, x);
    TORCH_CHECK_TYPE(x.scalar_type() == x0.scalar_type(), "fastnas.", op, ": ", arg, " has dtype ",
                     dtype_name(x.scalar_type()), ", expected ", dtype_name(x0.scalar_type()), " (of terms[0])");
    TORCH_CHECK_VALUE(per_edge[t] == 0 || per_edge[t] == 1, "fastnas.", op, ": per_edge[", t, "] must be 0 or 1, got ",
                      per_edge[t]);
    const int64_t step = channels * (per_edge[t] ? p.n : 1);
    TORCH_CHECK_VALUE(x.size(0) == x0.size(0) && x.size(2) == x0.size(2) && x.size(3) == x0.size(3) &&
                          x.size(1) > 0 && x.size(1) % step == 0,
                      "fastnas.", op, ": ", arg, " has shape ", shape_str(x.sizes()), ": expected [", x0.size(0),
                      ", a multiple of ", step, ", ", x0.size(2), ", ", x0.size(3), "]");
    units.push_back(x.size(1) / channels);
  }
  p.H = x0.size(2), p.W = x0.size(3);
  add_columns(op, p, units, per_edge, weights);
  return p;
}

// dst[0, C) (=)+ w * src[0, C) in the accumulation type
template <typename T>
C10_ALWAYS_INLINE void axpy_row(at::opmath_type<T>* dst, at::opmath_type<T> w, const T* src, int64_t C) {
  using VT = VecT<T>;
  using V = typename VT::V;
  constexpr int64_t Wv = VT::W;
  int64_t c = 0;
  const V wv(w);
  for (; c + Wv <= C; c += Wv) at::vec::fmadd(VT::load(src + c), wv, V::loadu(dst + c)).store(dst + c);
  for (; c < C; ++c) dst[c] += w * static_cast<at::opmath_type<T>>(src[c]);
}

// sum over c of a[c] * b[c]
template <typename T>
C10_ALWAYS_INLINE at::opmath_type<T> dot_row(const T* a, const T* b, int64_t C) {
  using VT = VecT<T>;
  using A = at::opmath_type<T>;
  using V = typename VT::V;
  constexpr int64_t Wv = VT::W;
  V acc(A(0));
  A tail = 0;
  int64_t c = 0;
  for (; c + Wv <= C; c += Wv) acc = at::vec::fmadd(VT::load(a + c), VT::load(b + c), acc);
  for (; c < C; ++c) tail += static_cast<A>(a[c]) * static_cast<A>(b[c]);
  return hsum(acc) + tail;
}

template <typename T>
void edge_sums_forward(const std::vector<const T*>& xs, const std::vector<int64_t>& xstride,
                       const at::opmath_type<T>* w, const T* partial, int64_t pstride, T* out,
                       const EdgeSumsProblem& p) {
  using A = at::opmath_type<T>;
  const int64_t nC = p.n * p.C;
  at::parallel_for(0, p.N * p.H * p.W, std::max<int64_t>(1, kGrain / std::max<int64_t>(nC * p.K, 1)),
                   [&](int64_t b, int64_t e_) {
    std::vector<A> acc(p.C);
    for (int64_t q = b; q < e_; ++q) {
      for (int64_t e = 0; e < p.n; ++e) {
        if (partial) {
          const T* src = partial + q * pstride + e * p.C;
          for (int64_t c = 0; c < p.C; ++c) acc[c] = static_cast<A>(src[c]);
        } else {
          std::fill(acc.begin(), acc.end(), A(0));
        }
        for (int64_t k = 0; k < p.K; ++k) {
          const int64_t t = p.cols[k].term;
          axpy_row<T>(acc.data(), w[e * p.K + k], xs[t] + q * xstride[t] + p.unit_of(k, e) * p.C, p.C);
        }
        T* dst = out + q * nC + e * p.C;
        for (int64_t c = 0; c < p.C; ++c) dst[c] = static_cast<T>(acc[c]);
      }
    }
  });
}

// gts[t] (dense [pixels, units_t C], when given) and the weights' gradient per block of pixels (when partial is
// given: [blocks, n K])
template <typename T>
void edge_sums_backward_rows(const T* g, const std::vector<const T*>& xs, const std::vector<int64_t>& xstride,
                             const at::opmath_type<T>* w, const std::vector<T*>& gts, at::opmath_type<T>* partial,
                             const EdgeSumsProblem& p) {
  using A = at::opmath_type<T>;
  const int64_t nC = p.n * p.C, pixels = p.N * p.H * p.W;
  const int64_t blocks = (pixels + kEdgeSumsBlock - 1) / kEdgeSumsBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> acc(p.C);
    for (int64_t blk = b0; blk < b1; ++blk) {
      A* gw = partial ? partial + blk * p.n * p.K : nullptr;
      if (gw) std::fill(gw, gw + p.n * p.K, A(0));
      const int64_t q1 = std::min(pixels, (blk + 1) * kEdgeSumsBlock);
      for (int64_t q = blk * kEdgeSumsBlock; q < q1; ++q) {
        const T* gq = g + q * nC;
        for (int64_t k = 0; k < p.K; ++k) {
          const EdgeColumn& col = p.cols[k];
          const int64_t t = col.term;
          if (gw) {
            for (int64_t e = 0; e < p.n; ++e)
              gw[e * p.K + k] += dot_row<T>(gq + e * p.C, xs[t] + q * xstride[t] + p.unit_of(k, e) * p.C, p.C);
          }
          if (gts.empty()) continue;
          T* base = gts[t] + q * p.units[t] * p.C;
          if (col.shared) {  // summed over the edges
            std::fill(acc.begin(), acc.end(), A(0));
            for (int64_t e = 0; e < p.n; ++e) axpy_row<T>(acc.data(), w[e * p.K + k], gq + e * p.C, p.C);
            T* dst = base + col.unit * p.C;
            for (int64_t c = 0; c < p.C; ++c) dst[c] = static_cast<T>(acc[c]);
          } else {
            for (int64_t e = 0; e < p.n; ++e) {
              T* dst = base + p.unit_of(k, e) * p.C;
              const A we = w[e * p.K + k];
              const T* src = gq + e * p.C;
              for (int64_t c = 0; c < p.C; ++c) dst[c] = static_cast<T>(we * static_cast<A>(src[c]));
            }
          }
        }
      }
    }
  });
}

namespace {

Tensor edge_sums(at::TensorList terms, const Tensor& weights, at::IntArrayRef per_edge, int64_t channels,
                 const c10::optional<Tensor>& partial) {
  const char* op = "edge_sums";
  const EdgeSumsProblem p = edge_sums_problem(op, terms, weights, per_edge, channels);
  const Tensor& x0 = terms[0];
  if (partial.has_value()) {
    check_float(op, "partial", *partial);
    TORCH_CHECK_VALUE(partial->dim() == 4 && partial->size(0) == p.N && partial->size(1) == p.n * p.C &&
                          partial->size(2) == p.H && partial->size(3) == p.W &&
                          partial->scalar_type() == x0.scalar_type(),
                      "fastnas.", op, ": partial must be a ", dtype_name(x0.scalar_type()), " tensor of shape [", p.N,
                      ", ", p.n * p.C, ", ", p.H, ", ", p.W, "], got ", shape_str(partial->sizes()));
    check_same_device(op, "partial", *partial, "terms[0]", x0);
  }
  Tensor out = at::empty({p.N, p.n * p.C, p.H, p.W}, x0.options().memory_format(c10::MemoryFormat::ChannelsLast));
  if (out.numel() > 0) {
    std::vector<Tensor> held;
    std::vector<int64_t> xstride;
    for (const Tensor& x : terms) {
      auto [xc, xs] = channels_last_rows(x);
      held.push_back(xc);
      xstride.push_back(xs);
    }
    Tensor pc;
    int64_t ps = 0;
    if (partial.has_value()) std::tie(pc, ps) = channels_last_rows(*partial);
    const Tensor wa = as_acc(weights, x0.scalar_type());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x0.scalar_type(), "fastnas::edge_sums", [&] {
      using A = at::opmath_type<scalar_t>;
      std::vector<const scalar_t*> xs;
      for (const Tensor& x : held) xs.push_back(x.const_data_ptr<scalar_t>());
      edge_sums_forward<scalar_t>(xs, xstride, wa.const_data_ptr<A>(),
                                  pc.defined() ? pc.const_data_ptr<scalar_t>() : nullptr, ps,
                                  out.data_ptr<scalar_t>(), p);
    });
  }
  return in_rule_layout(out, x0);
}

std::tuple<std::vector<Tensor>, Tensor> edge_sums_backward(const Tensor& grad, at::TensorList terms,
                                                           const Tensor& weights, at::IntArrayRef per_edge,
                                                           at::IntArrayRef units, bool need_terms_grad,
                                                           bool need_weights_grad) {
  const char* op = "edge_sums_backward";
  check_4d_on(op, "grad", grad, at::kCPU);
  check_float(op, "grad", grad);
  check_weights(op, weights);
  TORCH_CHECK_VALUE(grad.size(1) > 0 && grad.size(1) % weights.size(0) == 0, "fastnas.", op,
                    ": grad must have shape [N, edges * C, H, W] for weights of shape [edges, K], got ",
                    shape_str(grad.sizes()), " and ", shape_str(weights.sizes()));
  const int64_t C = grad.size(1) / weights.size(0);
  // the terms are read for the weights' gradient; else units alone gives their sizes
  TORCH_CHECK_VALUE(!need_weights_grad || !terms.empty(), "fastnas.", op,
                    ": the weights' gradient needs the terms");
  EdgeSumsProblem p{grad.size(0), grad.size(2), grad.size(3), C, weights.size(0), 0, {}, {}};
  if (terms.empty()) {
    add_columns(op, p, units, per_edge, weights);
  } else {
    p = edge_sums_problem(op, terms, weights, per_edge, C);
    TORCH_CHECK_VALUE(units.equals(p.units), "fastnas.", op, ": units ", shape_str(units),
                      " does not match the terms' ", shape_str(p.units));
    const Tensor& x0 = terms[0];
    TORCH_CHECK_VALUE(grad.size(0) == p.N && grad.size(2) == p.H && grad.size(3) == p.W &&
                          grad.scalar_type() == x0.scalar_type(),
                      "fastnas.", op, ": grad must be a ", dtype_name(x0.scalar_type()), " tensor of shape [", p.N,
                      ", ", p.n * p.C, ", ", p.H, ", ", p.W, "], got ", shape_str(grad.sizes()));
    check_same_device(op, "grad", grad, "terms[0]", x0);
  }
  std::vector<Tensor> gts, bufs;
  if (need_terms_grad) {
    for (const int64_t u : p.units)
      bufs.push_back(at::empty({p.N, u * C, p.H, p.W}, grad.options().memory_format(c10::MemoryFormat::ChannelsLast)));
  }
  const int64_t pixels = p.N * p.H * p.W;
  const int64_t blocks = (pixels + kEdgeSumsBlock - 1) / kEdgeSumsBlock;
  const Tensor wa = as_acc(weights, grad.scalar_type());
  Tensor partial = need_weights_grad ? at::zeros({std::max<int64_t>(blocks, 1), p.n * p.K}, wa.options()) : Tensor();
  if (pixels > 0 && (need_terms_grad || need_weights_grad)) {
    const Tensor gc = grad.contiguous(c10::MemoryFormat::ChannelsLast);
    std::vector<Tensor> held;
    std::vector<int64_t> xstride;
    for (const Tensor& x : terms) {
      auto [xc, xs] = need_weights_grad ? channels_last_rows(x) : std::pair<Tensor, int64_t>{x, 0};
      held.push_back(xc);
      xstride.push_back(xs);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "fastnas::edge_sums_backward", [&] {
      using A = at::opmath_type<scalar_t>;
      std::vector<const scalar_t*> xs;
      for (const Tensor& x : held) xs.push_back(x.const_data_ptr<scalar_t>());
      std::vector<scalar_t*> gptr;
      for (Tensor& b : bufs) gptr.push_back(b.data_ptr<scalar_t>());
      edge_sums_backward_rows<scalar_t>(gc.const_data_ptr<scalar_t>(), xs, xstride, wa.const_data_ptr<A>(), gptr,
                                        need_weights_grad ? partial.data_ptr<A>() : nullptr, p);
    });
  } else {
    for (Tensor& b : bufs) b.zero_();
  }
  // channels_last where grad prefers it (the terms' gradients need only their shapes)
  for (Tensor& b : bufs) gts.push_back(prefers_channels_last(grad) ? b : b.contiguous());
  Tensor gw = at::empty({0}, weights.options());
  if (need_weights_grad) gw = partial.sum(0).view({p.n, p.K}).to(weights.scalar_type());
  return {gts, gw};
}

}  // namespace

// the CPU kernels of edge_sums
inline void register_edge_sums(torch::Library& m) {
  m.impl("edge_sums", &edge_sums);
  m.impl("edge_sums_backward", &edge_sums_backward);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
