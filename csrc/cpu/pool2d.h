// Max and average pooling over kh x kw windows (DARTS's 3x3 pooling candidates) on channels_last tensors, forward
// and backward, vectorised over the channels. The max pool records the window position of each first maximum in one
// byte (NaN propagates and the last NaN of a window is its maximum, as in ATen); the average divides by the number of
// window elements inside the input (count_include_pad=False). The backward passes scatter into the input gradient
// image by image, each image owned by one thread: deterministic. pool_pair runs both poolings of one input into one
// output (max channels, then average channels) and sums both scatters in one backward pass.
//
// Compiled once per CPU capability (cpu_ops.h), in a namespace named after it.
#pragma once

#include <array>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common.h"
#include "vec.h"

namespace fastnas::cpu {
inline namespace CPU_CAPABILITY {

struct PoolGeometry {
  int64_t N, H, W, C, Ho, Wo, kh, kw, sh, sw, ph, pw;
  int64_t ys = 0;  // the pixel stride of the pooled tensor and its gradient (0: C)
  int64_t xs = 0;  // the pixel stride of the input (0: C; more for a channel slice of a wider tensor)
  C10_ALWAYS_INLINE int64_t out_stride() const { return ys ? ys : C; }
  C10_ALWAYS_INLINE int64_t in_stride() const { return xs ? xs : C; }
  // the window of output (ho, wo), clipped to the input: rows [h0, h1), columns [w0, w1)
  C10_ALWAYS_INLINE void window(int64_t ho, int64_t wo, int64_t& h0, int64_t& h1, int64_t& w0, int64_t& w1) const {
    h0 = ho * sh - ph;
    w0 = wo * sw - pw;
    h1 = std::min(h0 + kh, H);
    w1 = std::min(w0 + kw, W);
    h0 = std::max<int64_t>(h0, 0);
    w0 = std::max<int64_t>(w0, 0);
  }
};

// One output pixel of the max pool, channels [c, c + NV*W): the maximum of the window and the position of its first
// occurrence (tracked in float lanes, stored as bytes). NaN propagates, and a later NaN replaces an earlier one (ATen's
// rule).
template <typename T, int NV>
C10_ALWAYS_INLINE void max_window_vec(const T* x, const PoolGeometry& g, int64_t n, int64_t ho, int64_t wo, int64_t c,
                                      T* out, uint8_t* where) {
  using VT = VecT<T>;
  using V = typename VT::V;
  constexpr int64_t Wv = VT::W;
  int64_t h0, h1, w0, w1;
  g.window(ho, wo, h0, h1, w0, w1);
  const int64_t hb = ho * g.sh - g.ph, wb = wo * g.sw - g.pw;
  V best[NV], pos[NV];
  const T* first = x + ((n * g.H + h0) * g.W + w0) * g.in_stride() + c;
  const V k0(static_cast<at::opmath_type<T>>((h0 - hb) * g.kw + (w0 - wb)));
  for (int v = 0; v < NV; ++v) {
    best[v] = VT::load(first + v * Wv);
    pos[v] = k0;
  }
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = (h == h0 ? w0 + 1 : w0); w < w1; ++w) {
      const T* xp = x + ((n * g.H + h) * g.W + w) * g.in_stride() + c;
      const V k(static_cast<at::opmath_type<T>>((h - hb) * g.kw + (w - wb)));
      for (int v = 0; v < NV; ++v) {
        const V val = VT::load(xp + v * Wv);
        const V take = (val > best[v]) | val.isnan();
        best[v] = V::blendv(best[v], val, take);
        pos[v] = V::blendv(pos[v], k, take);
      }
    }
  }
  for (int v = 0; v < NV; ++v) {
    VT::store(out + v * Wv, best[v]);
    at::vec::convert<uint8_t>(pos[v]).store(where + v * Wv, Wv);
  }
}

template <typename T>
void max_pool_fwd(const T* x, T* out, uint8_t* pos, const PoolGeometry& g) {
  using A = at::opmath_type<T>;
  constexpr int64_t Wv = VecT<T>::W;
  const int64_t C = g.C;
  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.Ho, ho = r % g.Ho;
      for (int64_t wo = 0; wo < g.Wo; ++wo) {
        T* op = out + (r * g.Wo + wo) * g.out_stride();
        uint8_t* pp = pos + (r * g.Wo + wo) * C;
        int64_t c = 0;
        for (; c + 2 * Wv <= C; c += 2 * Wv) max_window_vec<T, 2>(x, g, n, ho, wo, c, op + c, pp + c);
        for (; c + Wv <= C; c += Wv) max_window_vec<T, 1>(x, g, n, ho, wo, c, op + c, pp + c);
        if (c < C) {
          int64_t h0, h1, w0, w1;
          g.window(ho, wo, h0, h1, w0, w1);
          const int64_t hb = ho * g.sh - g.ph, wb = wo * g.sw - g.pw;
          for (; c < C; ++c) {
            A best = static_cast<A>(x[((n * g.H + h0) * g.W + w0) * g.in_stride() + c]);
            A k_best = static_cast<A>((h0 - hb) * g.kw + (w0 - wb));
            for (int64_t h = h0; h < h1; ++h) {
              for (int64_t w = (h == h0 ? w0 + 1 : w0); w < w1; ++w) {
                const A v = static_cast<A>(x[((n * g.H + h) * g.W + w) * g.in_stride() + c]);
                if (v > best || std::isnan(v)) {
                  best = v;
                  k_best = static_cast<A>((h - hb) * g.kw + (w - wb));
                }
              }
            }
            op[c] = static_cast<T>(best);
            pp[c] = static_cast<uint8_t>(static_cast<int32_t>(k_best));
          }
        }
      }
    }
  });
}

// The backward passes' scaffold: each image's input gradient is accumulated (in the accumulation type, zeroed) by
// scatter(n, acc), acc being [H*W, C], then stored; an image per task, so the scatters need no atomics.
template <typename T, typename Scatter>
void scatter_by_image(T* gx, const PoolGeometry& g, Scatter scatter) {
  using A = at::opmath_type<T>;
  const int64_t image = g.H * g.W * g.C;
  at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<A> acc(image);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(acc.begin(), acc.end(), A(0));
      scatter(n, acc.data());
      T* dst = gx + n * image;
      for (int64_t i = 0; i < image; ++i) dst[i] = static_cast<T>(acc[i]);
    }
  });
}

// The max pool's scatter of image n's gradient into acc [H*W, C] (the gradient to each window's first maximum).
template <typename T>
struct MaxScatter {
  using A = at::opmath_type<T>;
  const T* grad;
  const uint8_t* pos;
  const PoolGeometry& g;
  // each window position's row and column in the window (past the window: row kh, which no window holds) and its
  // element offset from the window's corner
  std::array<int64_t, 256> row, col, offset;

  MaxScatter(const T* grad_, const uint8_t* pos_, const PoolGeometry& g_) : grad(grad_), pos(pos_), g(g_) {
    const int64_t khw = g.kh * g.kw;
    for (int64_t k = 0; k < 256; ++k) {
      row[k] = k < khw ? k / g.kw : g.kh;
      col[k] = k < khw ? k % g.kw : 0;
      offset[k] = (row[k] * g.W + col[k]) * g.C;
    }
  }

  void operator()(int64_t n, A* acc) const {
    const int64_t C = g.C, khw = g.kh * g.kw;
    for (int64_t ho = 0; ho < g.Ho; ++ho) {
      for (int64_t wo = 0; wo < g.Wo; ++wo) {
        const int64_t pixel = (n * g.Ho + ho) * g.Wo + wo;
        const int64_t o = pixel * g.out_stride();
        const uint8_t* p = pos + pixel * C;
        // the corner may lie in the padding; the maximum itself never does. The positions are checked before any
        // is written: inside the window's part inside the input (rows [i0, i1), columns [j0, j1)); for a window
        // wholly inside the input that is the largest position (a vectorised max) below kh * kw.
        const int64_t hs = ho * g.sh - g.ph, ws = wo * g.sw - g.pw;
        int64_t h0, h1, w0, w1;
        g.window(ho, wo, h0, h1, w0, w1);
        const int64_t i0 = h0 - hs, i1 = h1 - hs, j0 = w0 - ws, j1 = w1 - ws;
        if (i0 == 0 && i1 == g.kh && j0 == 0 && j1 == g.kw) {
          uint8_t largest = 0;
          for (int64_t c = 0; c < C; ++c) largest = std::max(largest, p[c]);
          TORCH_CHECK_INDEX(largest < khw, "fastnas.max_pool2d: argmax holds window position ", int(largest),
                            " at [", n, ", :, ", ho, ", ", wo, "], outside the ", g.kh, "x", g.kw, " window");
        } else {
          for (int64_t c = 0; c < C; ++c) {
            TORCH_CHECK_INDEX(row[p[c]] >= i0 && row[p[c]] < i1 && col[p[c]] >= j0 && col[p[c]] < j1,
                              "fastnas.max_pool2d: argmax holds window position ", int(p[c]), " at [", n, ", ", c,
                              ", ", ho, ", ", wo, "], outside the ", g.kh, "x", g.kw,
                              " window's part inside the input");
          }
        }
        A* corner = acc + (hs * g.W + ws) * C;
        for (int64_t c = 0; c < C; ++c) corner[offset[p[c]] + c] += static_cast<A>(grad[o + c]);
      }
    }
  }
};

template <typename T>
void max_pool_bwd(const T* grad, const uint8_t* pos, T* gx, const PoolGeometry& g) {
  const MaxScatter<T> scatter(grad, pos, g);
  scatter_by_image(gx, g, scatter);
}

template <typename T>
void avg_pool_fwd(const T* x, T* out, const PoolGeometry& g) {
  using A = at::opmath_type<T>;
  using VT = VecT<T>;
  using V = typename VT::V;
  constexpr int64_t Wv = VT::W;
  const int64_t C = g.C;
  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.Ho, ho = r % g.Ho;
      for (int64_t wo = 0; wo < g.Wo; ++wo) {
        int64_t h0, h1, w0, w1;
        g.window(ho, wo, h0, h1, w0, w1);
        const A inv = A(1) / static_cast<A>((h1 - h0) * (w1 - w0));
        T* op = out + (r * g.Wo + wo) * g.out_stride();
        // NV vectors of channels at a time: independent add chains
        auto channels = [&](auto nv_count, int64_t c) {
          constexpr int64_t NV = decltype(nv_count)::value;
          V sum[NV];
          for (int64_t v = 0; v < NV; ++v) sum[v] = V(A(0));
          for (int64_t h = h0; h < h1; ++h) {
            for (int64_t w = w0; w < w1; ++w) {
              const T* xp = x + ((n * g.H + h) * g.W + w) * g.in_stride() + c;
              for (int64_t v = 0; v < NV; ++v) sum[v] = sum[v] + VT::load(xp + v * Wv);
            }
          }
          for (int64_t v = 0; v < NV; ++v) VT::store(op + c + v * Wv, sum[v] * V(inv));
        };
        int64_t c = 0;
        for (; c + 2 * Wv <= C; c += 2 * Wv) channels(std::integral_constant<int64_t, 2>{}, c);
        for (; c + Wv <= C; c += Wv) channels(std::integral_constant<int64_t, 1>{}, c);
        for (; c < C; ++c) {
          A sum = 0;
          for (int64_t h = h0; h < h1; ++h)
            for (int64_t w = w0; w < w1; ++w) sum += static_cast<A>(x[((n * g.H + h) * g.W + w) * g.in_stride() + c]);
          op[c] = static_cast<T>(sum * inv);
        }
      }
    }
  });
}

// The average pool's scatter of image n's gradient into acc [H*W, C] (each window's share to its elements).
template <typename T>
void avg_scatter(const T* grad, const PoolGeometry& g, int64_t n, at::opmath_type<T>* acc) {
  using A = at::opmath_type<T>;
  const int64_t C = g.C;
  {
    std::vector<A> share(C);
    for (int64_t ho = 0; ho < g.Ho; ++ho) {
      for (int64_t wo = 0; wo < g.Wo; ++wo) {
        int64_t h0, h1, w0, w1;
        g.window(ho, wo, h0, h1, w0, w1);
        const A inv = A(1) / static_cast<A>((h1 - h0) * (w1 - w0));
        const T* gp = grad + ((n * g.Ho + ho) * g.Wo + wo) * g.out_stride();
        for (int64_t c = 0; c < C; ++c) share[c] = static_cast<A>(gp[c]) * inv;
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = w0; w < w1; ++w) {
            A* ap = acc + (h * g.W + w) * C;
            for (int64_t c = 0; c < C; ++c) ap[c] += share[c];
          }
        }
      }
    }
  }
}

template <typename T>
void avg_pool_bwd(const T* grad, T* gx, const PoolGeometry& g) {
  scatter_by_image(gx, g, [&](int64_t n, at::opmath_type<T>* acc) { avg_scatter<T>(grad, g, n, acc); });
}

// pool_pair: out [N, Ho, Wo, 2C] (max channels, then average channels), pos [N, Ho, Wo, C]; backward: both
// scatters into one input gradient
template <typename T>
void pool_pair_fwd(const T* x, T* out, uint8_t* pos, PoolGeometry g) {
  g.ys = 2 * g.C;
  max_pool_fwd<T>(x, out, pos, g);
  avg_pool_fwd<T>(x, out + g.C, g);
}

template <typename T>
void pool_pair_bwd(const T* grad, const uint8_t* pos, T* gx, PoolGeometry g) {
  g.ys = 2 * g.C;
  const MaxScatter<T> max_part(grad, pos, g);
  scatter_by_image(gx, g, [&](int64_t n, at::opmath_type<T>* acc) {
    max_part(n, acc);
    avg_scatter<T>(grad + g.C, g, n, acc);
  });
}

namespace {

// kh x kw max / average pooling (average: count_include_pad=False), computed on channels_last data; results keep
// channels_last when the input prefers it (prefers_channels_last), else they are NCHW.

void check_pool_args(const char* op, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  check_int_pairs(op, {{"kernel_size", kernel_size, 1}, {"stride", stride, 1}, {"padding", padding, 0}});
  TORCH_CHECK_VALUE(padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2, "fastnas.", op,
                    ": padding ", shape_str(padding), " must be at most half the kernel size ",
                    shape_str(kernel_size));
  TORCH_CHECK_VALUE(kernel_size[0] * kernel_size[1] <= 255, "fastnas.", op, ": windows of at most 255 elements, got ",
                    shape_str(kernel_size));
}

PoolGeometry pool_geometry(const char* op, int64_t N, int64_t C, int64_t H, int64_t W, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding) {
  check_pool_args(op, kernel_size, stride, padding);
  const int64_t Ho = (H + 2 * padding[0] - kernel_size[0]) / stride[0] + 1;
  const int64_t Wo = (W + 2 * padding[1] - kernel_size[1]) / stride[1] + 1;
  TORCH_CHECK_VALUE(H + 2 * padding[0] >= kernel_size[0] && W + 2 * padding[1] >= kernel_size[1], "fastnas.", op,
                    ": the ", kernel_size[0], "x", kernel_size[1], " window (padding ", shape_str(padding),
                    ") does not fit an input of ", H, "x", W);
  // (padding at most half the window: every window then holds an input element, unless the input has none)
  TORCH_CHECK_VALUE((H > 0 && W > 0) || N * C == 0, "fastnas.", op, ": an input of ", H, "x", W,
                    " leaves the windows empty (padding ", shape_str(padding), ")");
  return {N, H, W, C, Ho, Wo, kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1]};
}

Tensor pool_output(const Tensor& like, at::IntArrayRef sizes, bool channels_last, c10::ScalarType dtype) {
  return at::empty(sizes, like.options().dtype(dtype).memory_format(
                              channels_last ? c10::MemoryFormat::ChannelsLast : c10::MemoryFormat::Contiguous));
}

// (the pooled tensor, uint8 window position of each first maximum)
std::tuple<Tensor, Tensor> max_pool2d(const Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                      at::IntArrayRef padding) {
  const char* op = "max_pool2d";
  check_4d_on(op, "x", x, at::kCPU);
  const PoolGeometry g = pool_geometry(op, x.size(0), x.size(1), x.size(2), x.size(3), kernel_size, stride, padding);
  Tensor out = pool_output(x, {g.N, g.C, g.Ho, g.Wo}, true, x.scalar_type());
  Tensor pos = pool_output(x, {g.N, g.C, g.Ho, g.Wo}, true, at::kByte);
  if (out.numel() > 0) {
    Tensor xc = x.contiguous(c10::MemoryFormat::ChannelsLast);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::max_pool2d", [&] {
      max_pool_fwd<scalar_t>(xc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), pos.data_ptr<uint8_t>(), g);
    });
  }
  return {in_rule_layout(out, x), pos};
}

Tensor max_pool2d_backward(const Tensor& grad, const Tensor& argmax, int64_t H, int64_t W,
                           at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                           bool channels_last) {
  const char* op = "max_pool2d";
  check_4d_on(op, "grad", grad, at::kCPU);
  check_size_arg(op, "H", H);
  check_size_arg(op, "W", W);
  const PoolGeometry g = pool_geometry(op, grad.size(0), grad.size(1), H, W, kernel_size, stride, padding);
  TORCH_CHECK_VALUE(grad.size(2) == g.Ho && grad.size(3) == g.Wo && argmax.sizes().equals(grad.sizes()), "fastnas.",
                    op, ": backward expects grad and argmax of shape [", g.N, ", ", g.C, ", ", g.Ho, ", ", g.Wo,
                    "], got ", shape_str(grad.sizes()), " and ", shape_str(argmax.sizes()));
  TORCH_CHECK_TYPE(argmax.scalar_type() == at::kByte, "fastnas.", op, ": backward expects a uint8 argmax, got ",
                   dtype_name(argmax.scalar_type()));
  check_same_device(op, "argmax", argmax, "grad", grad);
  Tensor gx = pool_output(grad, {g.N, g.C, H, W}, true, grad.scalar_type());
  if (gx.numel() > 0) {
    Tensor gc = grad.contiguous(c10::MemoryFormat::ChannelsLast);
    Tensor pc = argmax.contiguous(c10::MemoryFormat::ChannelsLast);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "fastnas::max_pool2d_backward",
                                    [&] {
      max_pool_bwd<scalar_t>(gc.const_data_ptr<scalar_t>(), pc.const_data_ptr<uint8_t>(), gx.data_ptr<scalar_t>(),
                             g);
    });
  }
  return channels_last ? gx : gx.contiguous();
}

Tensor avg_pool2d(const Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "avg_pool2d";
  check_4d_on(op, "x", x, at::kCPU);
  const PoolGeometry g = pool_geometry(op, x.size(0), x.size(1), x.size(2), x.size(3), kernel_size, stride, padding);
  Tensor out = pool_output(x, {g.N, g.C, g.Ho, g.Wo}, true, x.scalar_type());
  if (out.numel() > 0) {
    Tensor xc = x.contiguous(c10::MemoryFormat::ChannelsLast);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::avg_pool2d", [&] {
      avg_pool_fwd<scalar_t>(xc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g);
    });
  }
  return in_rule_layout(out, x);
}

Tensor avg_pool2d_backward(const Tensor& grad, int64_t H, int64_t W, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, bool channels_last) {
  const char* op = "avg_pool2d";
  check_4d_on(op, "grad", grad, at::kCPU);
  const PoolGeometry g = pool_geometry(op, grad.size(0), grad.size(1), H, W, kernel_size, stride, padding);
  TORCH_CHECK_VALUE(grad.size(2) == g.Ho && grad.size(3) == g.Wo, "fastnas.", op, ": backward expects grad of shape [",
                    g.N, ", ", g.C, ", ", g.Ho, ", ", g.Wo, "], got ", shape_str(grad.sizes()));
  Tensor gx = pool_output(grad, {g.N, g.C, H, W}, true, grad.scalar_type());
  if (gx.numel() > 0) {
    Tensor gc = grad.contiguous(c10::MemoryFormat::ChannelsLast);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "fastnas::avg_pool2d_backward",
                                    [&] {
      avg_pool_bwd<scalar_t>(gc.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), g);
    });
  }
  return channels_last ? gx : gx.contiguous();
}

// (max then average pooling of x along the channels [N, 2C, Ho, Wo], uint8 window position of each first maximum)
std::tuple<Tensor, Tensor> pool_pair(const Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding) {
  const char* op = "pool_pair";
  check_4d_on(op, "x", x, at::kCPU);
  const PoolGeometry g = pool_geometry(op, x.size(0), x.size(1), x.size(2), x.size(3), kernel_size, stride, padding);
  Tensor out = pool_output(x, {g.N, 2 * g.C, g.Ho, g.Wo}, true, x.scalar_type());
  Tensor pos = pool_output(x, {g.N, g.C, g.Ho, g.Wo}, true, at::kByte);
  if (pos.numel() > 0) {
    // a channel slice of a channels_last tensor (a node of a search cell's running sums) is read where it is
    auto [xc, xs] = channels_last_rows(x);
    PoolGeometry gx = g;
    gx.xs = xs;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::pool_pair", [&] {
      pool_pair_fwd<scalar_t>(xc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), pos.data_ptr<uint8_t>(), gx);
    });
  }
  return {in_rule_layout(out, x), pos};
}

Tensor pool_pair_backward(const Tensor& grad, const Tensor& argmax, int64_t H, int64_t W, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef padding, bool channels_last) {
  const char* op = "pool_pair";
  check_4d_on(op, "grad", grad, at::kCPU);
  check_size_arg(op, "H", H);
  check_size_arg(op, "W", W);
  TORCH_CHECK_VALUE(grad.size(1) % 2 == 0, "fastnas.", op, ": backward expects grad of 2C channels, got ",
                    grad.size(1));
  const PoolGeometry g = pool_geometry(op, grad.size(0), grad.size(1) / 2, H, W, kernel_size, stride, padding);
  TORCH_CHECK_VALUE(grad.size(2) == g.Ho && grad.size(3) == g.Wo && argmax.dim() == 4 && argmax.size(0) == g.N &&
                        argmax.size(1) == g.C && argmax.size(2) == g.Ho && argmax.size(3) == g.Wo,
                    "fastnas.", op, ": backward expects grad of shape [", g.N, ", ", 2 * g.C, ", ", g.Ho, ", ", g.Wo,
                    "] and argmax of shape [", g.N, ", ", g.C, ", ", g.Ho, ", ", g.Wo, "], got ",
                    shape_str(grad.sizes()), " and ", shape_str(argmax.sizes()));
  TORCH_CHECK_TYPE(argmax.scalar_type() == at::kByte, "fastnas.", op, ": backward expects a uint8 argmax, got ",
                   dtype_name(argmax.scalar_type()));
  check_same_device(op, "argmax", argmax, "grad", grad);
  Tensor gx = pool_output(grad, {g.N, g.C, H, W}, true, grad.scalar_type());
  if (gx.numel() > 0) {
    Tensor gc = grad.contiguous(c10::MemoryFormat::ChannelsLast);
    Tensor pc = argmax.contiguous(c10::MemoryFormat::ChannelsLast);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "fastnas::pool_pair_backward", [&] {
      pool_pair_bwd<scalar_t>(gc.const_data_ptr<scalar_t>(), pc.const_data_ptr<uint8_t>(), gx.data_ptr<scalar_t>(),
                              g);
    });
  }
  return channels_last ? gx : gx.contiguous();
}

}  // namespace

// the CPU kernels of pool2d
inline void register_pool2d(torch::Library& m) {
  m.impl("max_pool2d", &max_pool2d);
  m.impl("max_pool2d_backward", &max_pool2d_backward);
  m.impl("avg_pool2d", &avg_pool2d);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward);
  m.impl("pool_pair", &pool_pair);
  m.impl("pool_pair_backward", &pool_pair_backward);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
