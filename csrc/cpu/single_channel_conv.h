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
// Included by ops_cpu_impl.h (once per CPU capability).
#pragma once

#include "kernels.h"

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

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
