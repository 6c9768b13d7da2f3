// Convolution of a few input channels to one output channel (stride 1, no dilation, zero padding): the k x k
// convolution of a CBAM spatial gate (2 channels -> 1). Image by image: the input is copied into a zero-padded planar
// buffer (channel, row, column) in the accumulation type, then every output row is computed vector by vector along
// the columns with the filter taps broadcast. oneDNN spends 0.4-0.6 ms on such a convolution at batch 32, 32x32;
// the arithmetic is 3 MFLOP.
//
// Gradients: the input gradient is the correlation of the zero-padded output gradient with the flipped filter, the
// weight gradient the correlation of the output gradient with the padded input, summed per image and then over the
// images in order (deterministic).
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

struct SingleConvGeometry {
  int64_t N, C, H, W, kh, kw, ph, pw, Ho, Wo;
  // strides (elements) of x / grad x, and of the [N, 1, Ho, Wo] output / its gradient
  int64_t xs_n, xs_c, xs_h, xs_w, os_n, os_h, os_w;
};

// A zero-filled planar image [planes][rows][cols] in A; cols rounded up to whole vectors plus one vector of slack.
template <typename A>
struct PaddedPlanes {
  int64_t planes, rows, cols;
  std::vector<A> data;
  PaddedPlanes(int64_t p, int64_t r, int64_t c_min)
      : planes(p), rows(r), cols(((c_min + Vectorized<A>::size() - 1) / Vectorized<A>::size() + 1) *
                                 Vectorized<A>::size()),
        data(p * r * cols, A(0)) {}
  A* row(int64_t plane, int64_t r) { return data.data() + (plane * rows + r) * cols; }
};

// out[0:len) += sum over taps (i, j) of w[i * kw + j] * src_row(i)[j + offset ...]: one output row, vectorised
template <typename A>
C10_ALWAYS_INLINE void correlate_row(A* out, int64_t len, const A* w, int64_t kh, int64_t kw,
                                     PaddedPlanes<A>& src, int64_t plane, int64_t first_row, bool flip) {
  using V = Vectorized<A>;
  constexpr int64_t Wv = V::size();
  for (int64_t x0 = 0; x0 < len; x0 += Wv) {
    V acc = V::loadu(out + x0);
    for (int64_t i = 0; i < kh; ++i) {
      const A* r = src.row(plane, first_row + i) + x0;  // lanes past len read the zero slack
      for (int64_t j = 0; j < kw; ++j) {
        const A tap = flip ? w[(kh - 1 - i) * kw + (kw - 1 - j)] : w[i * kw + j];
        acc = at::vec::fmadd(V(tap), V::loadu(r + j), acc);
      }
    }
    acc.store(out + x0);
  }
}

// image n of x into the interior of the zero-padded planes p (padding (ph, pw) around each plane)
template <typename T>
void load_padded_image(const T* x, int64_t n, const SingleConvGeometry& g, PaddedPlanes<at::opmath_type<T>>& p) {
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t h = 0; h < g.H; ++h) {
      at::opmath_type<T>* dst = p.row(c, h + g.ph) + g.pw;
      const T* src = x + n * g.xs_n + c * g.xs_c + h * g.xs_h;
      for (int64_t w = 0; w < g.W; ++w) dst[w] = static_cast<at::opmath_type<T>>(src[w * g.xs_w]);
    }
}

// out [N, 1, Ho, Wo] = conv(x [N, C, H, W], weight [1, C, kh, kw] as w (acc type, contiguous))
template <typename T>
void single_channel_conv_fwd(const T* x, const at::opmath_type<T>* w, T* out, const SingleConvGeometry& g) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
    PaddedPlanes<A> p(g.C, g.H + 2 * g.ph, g.W + 2 * g.pw);
    PaddedPlanes<A> acc(1, 1, g.Wo);
    for (int64_t n = n0; n < n1; ++n) {
      load_padded_image<T>(x, n, g, p);
      for (int64_t ho = 0; ho < g.Ho; ++ho) {
        A* row = acc.row(0, 0);
        std::fill(row, row + acc.cols, A(0));
        for (int64_t c = 0; c < g.C; ++c) correlate_row<A>(row, g.Wo, w + c * g.kh * g.kw, g.kh, g.kw, p, c, ho, false);
        T* o = out + n * g.os_n + ho * g.os_h;
        for (int64_t wo = 0; wo < g.Wo; ++wo) o[wo * g.os_w] = static_cast<T>(row[wo]);
      }
    }
  });
}

// grad x [N, C, H, W] (written through the x strides of g) and/or grad weight [C * kh * kw] (acc type)
template <typename T>
void single_channel_conv_bwd(const T* grad, const T* x, const at::opmath_type<T>* w, T* gx, at::opmath_type<T>* gw,
                             const SingleConvGeometry& g) {
  using A = at::opmath_type<T>;
  using V = Vectorized<A>;
  constexpr int64_t Wv = V::size();
  const int64_t taps = g.C * g.kh * g.kw;
  std::vector<A> partial(gw ? g.N * taps : 0, A(0));
  at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
    // the output gradient with a margin of (k - 1 - p) >= 0 zeros on each side (the op requires p < k): the input
    // gradient's correlation window
    const int64_t mh = g.kh - 1 - g.ph, mw = g.kw - 1 - g.pw;
    PaddedPlanes<A> gp(1, g.Ho + 2 * mh, g.Wo + 2 * mw);
    PaddedPlanes<A> p(gw ? g.C : 0, g.H + 2 * g.ph, g.W + 2 * g.pw);
    PaddedPlanes<A> row(1, 1, g.W);
    for (int64_t n = n0; n < n1; ++n) {
      // (the margins stay zero: only the interior is written, image after image)
      for (int64_t ho = 0; ho < g.Ho; ++ho) {
        A* dst = gp.row(0, ho + mh) + mw;
        const T* src = grad + n * g.os_n + ho * g.os_h;
        for (int64_t wo = 0; wo < g.Wo; ++wo) dst[wo] = static_cast<A>(src[wo * g.os_w]);
      }
      if (gx) {
        // gx[c, h, w] = sum_ij w[c, i, j] grad[h + ph - i, w + pw - j] = sum_ij flip(w)[c, i, j] gp[h + i, w + j]
        for (int64_t c = 0; c < g.C; ++c)
          for (int64_t h = 0; h < g.H; ++h) {
            A* r = row.row(0, 0);
            std::fill(r, r + row.cols, A(0));
            correlate_row<A>(r, g.W, w + c * g.kh * g.kw, g.kh, g.kw, gp, 0, h, true);
            T* o = gx + n * g.xs_n + c * g.xs_c + h * g.xs_h;
            for (int64_t ww = 0; ww < g.W; ++ww) o[ww * g.xs_w] = static_cast<T>(r[ww]);
          }
      }
      if (gw) {
        load_padded_image<T>(x, n, g, p);  // (the padding stays zero: only the interior is written)
        // gw[c, i, j] = sum_{ho, wo} grad[ho, wo] p[c, ho + i, wo + j]; lanes past Wo read zeros of gp
        A* acc_out = partial.data() + n * taps;
        for (int64_t c = 0; c < g.C; ++c)
          for (int64_t i = 0; i < g.kh; ++i)
            for (int64_t j = 0; j < g.kw; ++j) {
              V acc(A(0));
              for (int64_t ho = 0; ho < g.Ho; ++ho) {
                const A* gr = gp.row(0, ho + mh) + mw;
                const A* pr = p.row(c, ho + i) + j;
                for (int64_t x0 = 0; x0 < g.Wo; x0 += Wv) acc = at::vec::fmadd(V::loadu(gr + x0), V::loadu(pr + x0), acc);
              }
              acc_out[(c * g.kh + i) * g.kw + j] = hsum(acc);
            }
      }
    }
  });
  if (gw) {
    for (int64_t t = 0; t < taps; ++t) gw[t] = A(0);
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t t = 0; t < taps; ++t) gw[t] += partial[n * taps + t];
  }
}

namespace {

// A stride-1 convolution of x [N, C, H, W] to one channel (weight [1, C, kh, kw], zero padding p < k, no bias): the
// convolution of a CBAM spatial gate.

SingleConvGeometry single_conv_geometry(const char* op, const Tensor& x, const Tensor& weight,
                                        at::IntArrayRef padding) {
  check_4d_on(op, "x", x, at::kCPU);
  check_4d(op, "weight", weight);
  check_same_device(op, "weight", weight, "x", x);
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "fastnas.", op, ": weight has dtype ",
                   dtype_name(weight.scalar_type()), ", expected the dtype of x (", dtype_name(x.scalar_type()), ")");
  TORCH_CHECK_VALUE(weight.size(0) == 1 && weight.size(1) == x.size(1), "fastnas.", op,
                    ": weight must have shape [1, ", x.size(1), ", kh, kw], got ", shape_str(weight.sizes()));
  const int64_t kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK_VALUE(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0 && padding[0] < kh && padding[1] < kw,
                    "fastnas.", op, ": padding must be two integers in [0, kernel size), got ", shape_str(padding),
                    " for a ", kh, "x", kw, " filter");
  const int64_t H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(H + 2 * padding[0] >= kh && W + 2 * padding[1] >= kw, "fastnas.", op, ": the ", kh, "x", kw,
                    " filter (padding ", shape_str(padding), ") does not fit an input of ", H, "x", W);
  SingleConvGeometry g{x.size(0), x.size(1), H, W, kh, kw, padding[0], padding[1], H + 2 * padding[0] - kh + 1,
                       W + 2 * padding[1] - kw + 1, 0, 0, 0, 0, 0, 0, 0};
  g.os_n = g.Ho * g.Wo;
  g.os_h = g.Wo;
  g.os_w = 1;
  return g;
}

Tensor single_channel_conv2d(const Tensor& x, const Tensor& weight, at::IntArrayRef padding) {
  const char* op = "single_channel_conv2d";
  SingleConvGeometry g = single_conv_geometry(op, x, weight, padding);
  const auto fmt = prefers_channels_last(x) ? c10::MemoryFormat::ChannelsLast : c10::MemoryFormat::Contiguous;
  Tensor out = at::empty({g.N, 1, g.Ho, g.Wo}, x.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  Tensor xc = x.contiguous(fmt);
  g.xs_n = xc.stride(0), g.xs_c = xc.stride(1), g.xs_h = xc.stride(2), g.xs_w = xc.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::single_channel_conv2d", [&] {
    using A = at::opmath_type<scalar_t>;
    Tensor w = weight.to(acc_dtype(x.scalar_type())).contiguous();
    single_channel_conv_fwd<scalar_t>(xc.const_data_ptr<scalar_t>(), w.const_data_ptr<A>(), out.data_ptr<scalar_t>(),
                                      g);
  });
  return out;
}

// (grad x (empty unless need_x_grad), grad weight (empty unless need_weight_grad))
std::tuple<Tensor, Tensor> single_channel_conv2d_backward(const Tensor& grad, const Tensor& x, const Tensor& weight,
                                                          at::IntArrayRef padding, bool need_x_grad,
                                                          bool need_weight_grad) {
  const char* op = "single_channel_conv2d";
  SingleConvGeometry g = single_conv_geometry(op, x, weight, padding);
  check_float(op, "grad", grad);
  check_same_device(op, "grad", grad, "x", x);
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == g.N && grad.size(1) == 1 && grad.size(2) == g.Ho &&
                        grad.size(3) == g.Wo,
                    "fastnas.", op, ": grad must have shape [", g.N, ", 1, ", g.Ho, ", ", g.Wo, "], got ",
                    shape_str(grad.sizes()));
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "fastnas.", op, ": grad has dtype ",
                   dtype_name(grad.scalar_type()), ", expected ", dtype_name(x.scalar_type()));
  const auto fmt = prefers_channels_last(x) ? c10::MemoryFormat::ChannelsLast : c10::MemoryFormat::Contiguous;
  Tensor xc = x.contiguous(fmt);
  g.xs_n = xc.stride(0), g.xs_c = xc.stride(1), g.xs_h = xc.stride(2), g.xs_w = xc.stride(3);
  Tensor gx = need_x_grad ? at::empty_like(xc) : at::empty({0}, x.options());
  Tensor gw_acc = at::zeros(need_weight_grad ? weight.sizes() : at::IntArrayRef{0},
                            x.options().dtype(acc_dtype(x.scalar_type())));
  if (g.N > 0 && (need_x_grad || need_weight_grad)) {
    Tensor gc = grad.contiguous();  // [N, 1, Ho, Wo]: both layouts are this order
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                    "fastnas::single_channel_conv2d_backward",
                                    [&] {
      using A = at::opmath_type<scalar_t>;
      Tensor w = weight.to(acc_dtype(x.scalar_type())).contiguous();
      single_channel_conv_bwd<scalar_t>(gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
                                        w.const_data_ptr<A>(), need_x_grad ? gx.data_ptr<scalar_t>() : nullptr,
                                        need_weight_grad ? gw_acc.data_ptr<A>() : nullptr, g);
    });
  } else if (need_x_grad) {
    gx.zero_();
  }
  return {gx, need_weight_grad ? gw_acc.to(weight.scalar_type()) : gw_acc};
}

}  // namespace

// the CPU kernels of single_channel_conv2d
inline void register_single_channel_conv2d(torch::Library& m) {
  m.impl("single_channel_conv2d", &single_channel_conv2d);
  m.impl("single_channel_conv2d_backward", &single_channel_conv2d_backward);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
