// The weight gradient of a depthwise convolution (groups = channels, one filter per channel) on channels_last
// tensors: dW[c, i, j] = sum over n, ho, wo of g[n, ho, wo, c] * x[n, ho*sh - ph + i*dh, wo*sw - pw + j*dw, c].
//
// Vectorised over the channels (contiguous in channels_last); for one output row and one filter row, each gradient
// vector is loaded once and multiplied into the accumulators of every filter column, which stay in registers
// (KW * NV vectors). Deterministic: one partial sum per (image, block of output rows), blocks fixed by the problem
// size, added in order.
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

// C channels of x [N, H, W, xs] and of the gradient [N, Ho, Wo, gs] (pixel strides xs, gs >= C; the pointers are
// those of the first channel); relu: the convolution reads max(x, 0)
struct DepthwiseGeometry {
  int64_t N, H, W, C, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, xs, gs;
  bool relu = false;
};

// an input vector as the convolution reads it: max(x, 0) under a fused ReLU
template <bool R, typename V>
C10_ALWAYS_INLINE V relu_if(const V& v) {
  if constexpr (R) {
    return at::vec::maximum(v, V(0));
  } else {
    return v;
  }
}

// Accumulates, for output row ho of image n and filter row i, the products of the channel group [c0, c0 + NV*W) into
// acc[j * C + c] for every filter column j (input row hi = ho*sh - ph + i*dh, in range).
template <typename T, int KW, int NV, bool R>
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
    for (int v = 0; v < NV; ++v) gv[v] = VT::load(grow + wo * g.gs + c0 + v * Wv);
    const int64_t w0 = wo * g.sw - g.pw;
    for (int j = 0; j < KW; ++j) {
      const int64_t wi = w0 + j * g.dw;
      if constexpr (decltype(checked)::value) {
        if (wi < 0 || wi >= g.W) continue;
      }
      const T* xp = xrow + wi * g.xs + c0;
      for (int v = 0; v < NV; ++v) a[j][v] = at::vec::fmadd(gv[v], relu_if<R>(VT::load(xp + v * Wv)), a[j][v]);
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
      for (int64_t c = c0; c < c1; ++c) {
        const A xv = static_cast<A>(xrow[wi * g.xs + c]);
        acc[j * C + c] += static_cast<A>(grow[wo * g.gs + c]) * (g.relu && xv < A(0) ? A(0) : xv);
      }
    }
  }
}

template <typename T, int KW, int NV, bool R>
void dw_row(const T* grow, const T* xrow, at::opmath_type<T>* acc, const DepthwiseGeometry& g) {
  constexpr int64_t Wv = VecT<T>::W;
  int64_t c = 0;
  for (; c + NV * Wv <= g.C; c += NV * Wv) dw_row_group<T, KW, NV, R>(grow, xrow, acc, g, c);
  // the whole vectors left, as one group
  const int64_t rest = (g.C - c) / Wv;
  if constexpr (NV > 1) {
    if (rest == 1) dw_row_group<T, KW, 1, R>(grow, xrow, acc, g, c);
  }
  if constexpr (NV > 2) {
    if (rest == 2) dw_row_group<T, KW, 2, R>(grow, xrow, acc, g, c);
  }
  if constexpr (NV > 3) {
    if (rest == 3) dw_row_group<T, KW, 3, R>(grow, xrow, acc, g, c);
  }
  c += rest * Wv;
  if (c < g.C) dw_row_scalar<T>(grow, xrow, acc, g, c, g.C);
}

template <typename T>
using DwRowFn = void (*)(const T*, const T*, at::opmath_type<T>*, const DepthwiseGeometry&);

// The row kernel for a filter width: unrolled for the widths of the search spaces (accumulators in registers: at
// most 12 vectors, the gradient vectors and one input vector beside them), plain loops otherwise.
template <typename T, bool R>
DwRowFn<T> dw_row_for(int64_t kw) {
  switch (kw) {
    case 1: return &dw_row<T, 1, 4, R>;
    case 3: return &dw_row<T, 3, 3, R>;
    case 5: return &dw_row<T, 5, 2, R>;
    case 7: return &dw_row<T, 7, 1, R>;
    default:
      return [](const T* grow, const T* xrow, at::opmath_type<T>* acc, const DepthwiseGeometry& g) {
        dw_row_scalar<T>(grow, xrow, acc, g, 0, g.C);
      };
  }
}

// x [N, H, W, xs], g [N, Ho, Wo, gs] (channels_last data, C channels read from each), out [C, kh, kw] in T.
template <typename T>
void depthwise_weight_grad(const T* x, const T* gr, T* out, const DepthwiseGeometry& g) {
  using A = at::opmath_type<T>;
  const int64_t taps = g.kh * g.kw * g.C;
  // output rows per partial: about kGrain gradient elements, at least one row
  const int64_t rows = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, g.Wo * g.C));
  const int64_t blocks_per_image = (g.Ho + rows - 1) / rows;
  const int64_t nblocks = g.N * blocks_per_image;
  std::vector<A> partial(nblocks * taps, A(0));
  const DwRowFn<T> row = g.relu ? dw_row_for<T, true>(g.kw) : dw_row_for<T, false>(g.kw);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / blocks_per_image;
      const int64_t ho0 = (b % blocks_per_image) * rows, ho1 = std::min(g.Ho, ho0 + rows);
      A* acc = partial.data() + b * taps;
      for (int64_t ho = ho0; ho < ho1; ++ho) {
        const T* grow = gr + (n * g.Ho + ho) * g.Wo * g.gs;
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t hi = ho * g.sh - g.ph + i * g.dh;
          if (hi < 0 || hi >= g.H) continue;
          row(grow, x + (n * g.H + hi) * g.W * g.xs, acc + i * g.kw * g.C, g);
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

namespace {

// dW of a depthwise convolution (weight [C, 1, kh, kw]) from its output gradient and input, in x's dtype.
Tensor depthwise_conv2d_weight_grad(const Tensor& grad, const Tensor& x, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "depthwise_conv2d_weight_grad";
  check_4d_on(op, "x", x, at::kCPU);
  check_4d(op, "grad", grad);
  check_same_device(op, "grad", grad, "x", x);
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "fastnas.", op, ": grad has dtype ",
                   dtype_name(grad.scalar_type()), ", expected the dtype of x (", dtype_name(x.scalar_type()), ")");
  check_int_pairs(op, {{"kernel_size", kernel_size, 1}, {"stride", stride, 1}, {"padding", padding, 0},
                       {"dilation", dilation, 1}});
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) / stride[0] + 1;
  const int64_t Wo = (W + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) / stride[1] + 1;
  TORCH_CHECK_VALUE(Ho >= 1 && Wo >= 1, "fastnas.", op, ": the ", kernel_size[0], "x", kernel_size[1],
                    " filter (dilation ", shape_str(dilation), ", padding ", shape_str(padding),
                    ") does not fit the input of shape ", shape_str(x.sizes()));
  TORCH_CHECK_VALUE(grad.size(0) == N && grad.size(1) == C && grad.size(2) == Ho && grad.size(3) == Wo, "fastnas.",
                    op, ": grad must have shape [", N, ", ", C, ", ", Ho, ", ", Wo, "], got ",
                    shape_str(grad.sizes()));
  Tensor out = at::zeros({C, 1, kernel_size[0], kernel_size[1]}, x.options());
  if (N == 0 || C == 0) return out;
  Tensor xc = x.contiguous(c10::MemoryFormat::ChannelsLast);
  Tensor gc = grad.contiguous(c10::MemoryFormat::ChannelsLast);
  const DepthwiseGeometry geo{N, H, W, C, Ho, Wo, kernel_size[0], kernel_size[1], stride[0], stride[1],
                              padding[0], padding[1], dilation[0], dilation[1], C, C};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::depthwise_conv2d_weight_grad",
                                  [&] {
    depthwise_weight_grad<scalar_t>(xc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                                    out.data_ptr<scalar_t>(), geo);
  });
  return out;
}

}  // namespace

// the CPU kernels of depthwise_conv2d
inline void register_depthwise_conv2d(torch::Library& m) {
  m.impl("depthwise_conv2d_weight_grad", &depthwise_conv2d_weight_grad);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
