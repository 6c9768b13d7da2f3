// The weight gradient of a depthwise convolution (groups = channels, one filter per channel) on channels_last
// tensors: dW[c, i, j] = sum over n, ho, wo of g[n, ho, wo, c] * x[n, ho*sh - ph + i*dh, wo*sw - pw + j*dw, c].
//
// Vectorised over the channels (contiguous in channels_last); for one output row and one filter row, each gradient
// vector is loaded once and multiplied into the accumulators of every filter column, which stay in registers
// (KW * NV vectors). Deterministic: one partial sum per (image, block of output rows), blocks fixed by the problem
// size, added in order.
//
// Included by ops_cpu_impl.h (once per CPU capability).
#pragma once

#include "kernels.h"

namespace fastnas::cpu {
inline namespace CPU_CAPABILITY {

struct DepthwiseGeometry {
  int64_t N, H, W, C, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw;
};

// Accumulates, for output row ho of image n and filter row i, the products of the channel group [c0, c0 + NV*W) into
// acc[j * C + c] for every filter column j (input row hi = ho*sh - ph + i*dh, in range).
template <typename T, int KW, int NV>
C10_ALWAYS_INLINE void dw_row_group(const T* grow, const T* xrow, at::opmath_type<T>* acc, const DepthwiseGeometry& g,
                                    int64_t c0) {
  using VT = VecT<T>;
  using V = typename VT::V;
  constexpr int64_t Wv = VT::W;
  const int64_t C = g.C;
  V a[KW][NV];
  for (int j = 0; j < KW; ++j)
    for (int v = 0; v < NV; ++v) a[j][v] = V::loadu(acc + j * C + c0 + v * Wv);
  // columns wo whose taps all fall inside the row: [lo, hi); the others check each tap
  const int64_t lo = std::min(g.Wo, (g.pw + g.sw - 1) / g.sw);
  const int64_t last = g.W - 1 + g.pw - (KW - 1) * g.dw;
  const int64_t hi = std::max(lo, std::min(g.Wo, last < 0 ? int64_t(0) : last / g.sw + 1));
  auto column = [&](int64_t wo, auto checked) {
    V gv[NV];
    for (int v = 0; v < NV; ++v) gv[v] = VT::load(grow + wo * C + c0 + v * Wv);
    const int64_t w0 = wo * g.sw - g.pw;
    for (int j = 0; j < KW; ++j) {
      const int64_t wi = w0 + j * g.dw;
      if constexpr (decltype(checked)::value) {
        if (wi < 0 || wi >= g.W) continue;
      }
      const T* xp = xrow + wi * C + c0;
      for (int v = 0; v < NV; ++v) a[j][v] = at::vec::fmadd(gv[v], VT::load(xp + v * Wv), a[j][v]);
    }
  };
  for (int64_t wo = 0; wo < lo; ++wo) column(wo, std::true_type{});
  for (int64_t wo = lo; wo < hi; ++wo) column(wo, std::false_type{});
  for (int64_t wo = hi; wo < g.Wo; ++wo) column(wo, std::true_type{});
  for (int j = 0; j < KW; ++j)
    for (int v = 0; v < NV; ++v) a[j][v].store(acc + j * C + c0 + v * Wv);
}

// Any filter width and the channels left over after the vector groups: plain loops.
template <typename T>
void dw_row_scalar(const T* grow, const T* xrow, at::opmath_type<T>* acc, const DepthwiseGeometry& g, int64_t c0,
                   int64_t c1) {
  using A = at::opmath_type<T>;
  const int64_t C = g.C;
  for (int64_t wo = 0; wo < g.Wo; ++wo) {
    const int64_t w0 = wo * g.sw - g.pw;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t wi = w0 + j * g.dw;
      if (wi < 0 || wi >= g.W) continue;
      for (int64_t c = c0; c < c1; ++c)
        acc[j * C + c] += static_cast<A>(grow[wo * C + c]) * static_cast<A>(xrow[wi * C + c]);
    }
  }
}

template <typename T, int KW, int NV>
void dw_row(const T* grow, const T* xrow, at::opmath_type<T>* acc, const DepthwiseGeometry& g) {
  constexpr int64_t Wv = VecT<T>::W;
  int64_t c = 0;
  for (; c + NV * Wv <= g.C; c += NV * Wv) dw_row_group<T, KW, NV>(grow, xrow, acc, g, c);
  // the whole vectors left, as one group
  const int64_t rest = (g.C - c) / Wv;
  if constexpr (NV > 1) {
    if (rest == 1) dw_row_group<T, KW, 1>(grow, xrow, acc, g, c);
  }
  if constexpr (NV > 2) {
    if (rest == 2) dw_row_group<T, KW, 2>(grow, xrow, acc, g, c);
  }
  if constexpr (NV > 3) {
    if (rest == 3) dw_row_group<T, KW, 3>(grow, xrow, acc, g, c);
  }
  c += rest * Wv;
  if (c < g.C) dw_row_scalar<T>(grow, xrow, acc, g, c, g.C);
}

template <typename T>
using DwRowFn = void (*)(const T*, const T*, at::opmath_type<T>*, const DepthwiseGeometry&);

// The row kernel for a filter width: unrolled for the widths of the search spaces (accumulators in registers: at
// most 12 vectors, the gradient vectors and one input vector beside them), plain loops otherwise.
template <typename T>
DwRowFn<T> dw_row_for(int64_t kw) {
  switch (kw) {
    case 1: return &dw_row<T, 1, 4>;
    case 3: return &dw_row<T, 3, 3>;
    case 5: return &dw_row<T, 5, 2>;
    case 7: return &dw_row<T, 7, 1>;
    default:
      return [](const T* grow, const T* xrow, at::opmath_type<T>* acc, const DepthwiseGeometry& g) {
        dw_row_scalar<T>(grow, xrow, acc, g, 0, g.C);
      };
  }
}

// x [N, H, W, C], g [N, Ho, Wo, C] (channels_last data), out [C, kh, kw] in T.
template <typename T>
void depthwise_weight_grad(const T* x, const T* gr, T* out, const DepthwiseGeometry& g) {
  using A = at::opmath_type<T>;
  const int64_t taps = g.kh * g.kw * g.C;
  // output rows per partial: about kGrain gradient elements, at least one row
  const int64_t rows = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, g.Wo * g.C));
  const int64_t blocks_per_image = (g.Ho + rows - 1) / rows;
  const int64_t nblocks = g.N * blocks_per_image;
  std::vector<A> partial(nblocks * taps, A(0));
  const DwRowFn<T> row = dw_row_for<T>(g.kw);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / blocks_per_image;
      const int64_t ho0 = (b % blocks_per_image) * rows, ho1 = std::min(g.Ho, ho0 + rows);
      A* acc = partial.data() + b * taps;
      for (int64_t ho = ho0; ho < ho1; ++ho) {
        const T* grow = gr + (n * g.Ho + ho) * g.Wo * g.C;
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t hi = ho * g.sh - g.ph + i * g.dh;
          if (hi < 0 || hi >= g.H) continue;
          row(grow, x + (n * g.H + hi) * g.W * g.C, acc + i * g.kw * g.C, g);
        }
      }
    }
  });
  // sum the partials in order, then [kh, kw, C] -> [C, kh, kw]
  std::vector<A> total(taps, A(0));
  for (int64_t b = 0; b < nblocks; ++b) {
    const A* p = partial.data() + b * taps;
    for (int64_t t = 0; t < taps; ++t) total[t] += p[t];
  }
  const int64_t khw = g.kh * g.kw;
  for (int64_t t = 0; t < khw; ++t)
    for (int64_t c = 0; c < g.C; ++c) out[c * khw + t] = static_cast<T>(total[t * g.C + c]);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
