// Several depthwise convolutions of one input as one call (fastnas/ops/defs/depthwise_stack.py): column g has filters
// [n_g, 1, kh, kw] and its own stride, padding and dilation; the output concatenates the columns along the channels,
// and output channel o reads input channel o mod C_in. With relu every column reads max(x, 0) (DARTS's ReLU before
// each convolution, never stored). The candidates of every edge leaving a search-cell state run
// this way: the state read once (no repeated copy), one output (no concatenation).
//
// Channels_last throughout (x may be a channel slice of a wider channels_last tensor), vectorised over the channels.
// The work is cut into blocks: runs of output channels of one column that read a contiguous run of input channels.
//
// * forward: per output row, each output vector summed over the taps in registers;
// * input gradient: per input row, every block's taps that reach it (any stride: the output positions whose window
//   covers it) summed into a row of accumulators, then written once (deterministic, no atomics);
// * weight gradients: the depthwise weight-gradient kernel (depthwise_conv2d.h) per block, on strided pixels.
//
// Compiled once per CPU capability (cpu_ops.h), in a namespace named after it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../common.h"
#include "depthwise_conv2d.h"
#include "vec.h"

namespace fastnas::cpu {
inline namespace CPU_CAPABILITY {

struct StackColumn {
  int64_t width, kh, kw, sh, sw, ph, pw, dh, dw;
};

// output channels [o, o + n) = the column's channels [l, l + n), reading input channels [c, c + n)
struct StackBlock {
  int64_t col, o, l, n, c;
};

struct StackProblem {
  int64_t N, H, W, Cx, Ho, Wo, Co;
  int64_t Xs;  // x's pixel stride (elements), Cx unless x is a channel slice
  std::vector<StackColumn> cols;
  std::vector<StackBlock> blocks;
};

inline StackProblem stack_problem(const char* op, const Tensor& x, at::TensorList weights, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_4d_on(op, "x", x, at::kCPU);
  const int64_t k = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(k > 0, "fastnas.", op, ": weights must hold at least one tensor");
  TORCH_CHECK_VALUE(static_cast<int64_t>(stride.size()) == 2 * k && static_cast<int64_t>(padding.size()) == 2 * k &&
                        static_cast<int64_t>(dilation.size()) == 2 * k,
                    "fastnas.", op, ": stride, padding and dilation must hold two values per weight (", 2 * k,
                    "), got ", stride.size(), ", ", padding.size(), ", ", dilation.size());
  StackProblem p;
  p.N = x.size(0), p.Cx = x.size(1), p.H = x.size(2), p.W = x.size(3), p.Co = 0, p.Xs = p.Cx;
  p.Ho = p.Wo = -1;
  for (int64_t g = 0; g < k; ++g) {
    const Tensor& w = weights[g];
    const std::string arg = "weights[" + std::to_string(g) + "]";
    check_4d(op, arg, w);
    check_same_device(op, arg, w, "x", x);
    TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), "fastnas.", op, ": ", arg, " has dtype ",
                     dtype_name(w.scalar_type()), ", expected the dtype of x (", dtype_name(x.scalar_type()), ")");
    TORCH_CHECK_VALUE(w.size(1) == 1 && w.size(0) > 0, "fastnas.", op, ": ", arg,
                      " must have shape [n, 1, kh, kw], got ", shape_str(w.sizes()));
    StackColumn c{w.size(0), w.size(2), w.size(3), stride[2 * g], stride[2 * g + 1], padding[2 * g],
                  padding[2 * g + 1], dilation[2 * g], dilation[2 * g + 1]};
    TORCH_CHECK_VALUE(c.kh > 0 && c.kw > 0 && c.sh > 0 && c.sw > 0 && c.ph >= 0 && c.pw >= 0 && c.dh > 0 && c.dw > 0,
                      "fastnas.", op, ": column ", g, " has an invalid configuration");
    const int64_t Ho = (p.H + 2 * c.ph - c.dh * (c.kh - 1) - 1) / c.sh + 1;
    const int64_t Wo = (p.W + 2 * c.pw - c.dw * (c.kw - 1) - 1) / c.sw + 1;
    TORCH_CHECK_VALUE(Ho >= 1 && Wo >= 1, "fastnas.", op, ": the filters of ", arg,
                      " do not fit the input of shape ", shape_str(x.sizes()));
    TORCH_CHECK_VALUE(p.Ho < 0 || (Ho == p.Ho && Wo == p.Wo), "fastnas.", op, ": column ", g, " gives outputs of ",
                      Ho, "x", Wo, ", column 0 of ", p.Ho, "x", p.Wo, " (the columns are concatenated)");
    p.Ho = Ho, p.Wo = Wo;
    for (int64_t l = 0; l < c.width && p.Cx > 0;) {
      const int64_t ch = (p.Co + l) % p.Cx;
      const int64_t n = std::min(c.width - l, p.Cx - ch);
      p.blocks.push_back({g, p.Co + l, l, n, ch});
      l += n;
    }
    p.cols.push_back(c);
    p.Co += c.width;
  }
  return p;
}

// each column's filters as [taps, width] in the accumulation type (a tap's weights of adjacent channels adjacent)
template <typename T>
std::vector<std::vector<at::opmath_type<T>>> taps_by_channel(at::TensorList weights, const StackProblem& p) {
  std::vector<std::vector<at::opmath_type<T>>> out;
  for (size_t g = 0; g < p.cols.size(); ++g) {
    const StackColumn& c = p.cols[g];
    const Tensor w = weights[g].contiguous();
    const T* src = w.const_data_ptr<T>();
    const int64_t taps = c.kh * c.kw;
    std::vector<at::opmath_type<T>> t(taps * c.width);
    for (int64_t ch = 0; ch < c.width; ++ch)
      for (int64_t k = 0; k < taps; ++k) t[k * c.width + ch] = static_cast<at::opmath_type<T>>(src[ch * taps + k]);
    out.push_back(std::move(t));
  }
  return out;
}

// The taps of one pixel: rows [i0, i1) and columns [j0, j1) of a filter, tap (i, j) weighing the source element at
// offset base + i * si + j * sj (elements) with the weights at w + (i * kw + j) * width (a row of channels).
struct TapWindow {
  int64_t i0, i1, j0, j1, kw, width, base, si, sj;
};

// The taps of [lo, hi) = the t in [0, k) with 0 <= origin + t * step < size (step > 0) or the like for step < 0.
C10_ALWAYS_INLINE std::pair<int64_t, int64_t> tap_range(int64_t origin, int64_t step, int64_t size, int64_t k) {
  int64_t lo = 0, hi = k;
  if (step > 0) {
    if (origin < 0) lo = (-origin + step - 1) / step;
    if (origin + (k - 1) * step >= size) hi = origin >= size ? 0 : (size - 1 - origin) / step + 1;
  } else {
    const int64_t s = -step;
    if (origin >= size) lo = (origin - size + 1 + s - 1) / s;
    if (origin - (k - 1) * s < 0) hi = origin < 0 ? 0 : origin / s + 1;
  }
  return {lo, std::max(lo, hi)};
}

// For P adjacent pixels (destination p at dst + p * dstep, its window's sources shifted by p * sstep): the channels
// [c0, c0 + NV vectors) (+)= the window's weighted sum; each weight vector loaded once for the P pixels.
template <typename T, typename D, int NV, int P, bool R = false>
C10_ALWAYS_INLINE void window_group(D* dst, int64_t dstep, const at::opmath_type<T>* w, const T* src, int64_t sstep,
                                    const TapWindow& t, int64_t c0, bool add) {
  using VT = VecT<T>;
  using A = at::opmath_type<T>;
  using V = typename VT::V;
  constexpr int64_t Wv = VT::W;
  V acc[P][NV];
  for (int q = 0; q < P; ++q)
    for (int v = 0; v < NV; ++v) {
      if constexpr (std::is_same_v<D, A>) {
        acc[q][v] = add ? V::loadu(dst + q * dstep + c0 + v * Wv) : V(A(0));
      } else {
        acc[q][v] = V(A(0));
      }
    }
  for (int64_t i = t.i0; i < t.i1; ++i) {
    const A* wr = w + i * t.kw * t.width + c0;
    const T* sr = src + t.base + i * t.si + c0;
    for (int64_t j = t.j0; j < t.j1; ++j) {
      const A* wp = wr + j * t.width;
      const T* sp = sr + j * t.sj;
      for (int v = 0; v < NV; ++v) {
        const V wv = V::loadu(wp + v * Wv);
        for (int q = 0; q < P; ++q)
          acc[q][v] = at::vec::fmadd(wv, relu_if<R>(VT::load(sp + q * sstep + v * Wv)), acc[q][v]);
      }
    }
  }
  for (int q = 0; q < P; ++q)
    for (int v = 0; v < NV; ++v) {
      if constexpr (std::is_same_v<D, A>) {
        acc[q][v].store(dst + q * dstep + c0 + v * Wv);
      } else {
        VT::store(dst + q * dstep + c0 + v * Wv, acc[q][v]);
      }
    }
}

// window_group over the channels [0, n) of P pixels (P = 1: one pixel), vector groups then the scalar rest; R: the
// sources read through a ReLU
template <typename T, typename D, int P, bool R = false>
void window_sum(D* dst, int64_t dstep, int64_t n, const at::opmath_type<T>* w, const T* src, int64_t sstep,
                const TapWindow& t, bool add) {
  using A = at::opmath_type<T>;
  constexpr int64_t Wv = VecT<T>::W;
  constexpr int NV = P > 2 ? 2 : 4;  // at most 8 accumulators beside the weight and source vectors
  int64_t c = 0;
  for (; c + NV * Wv <= n; c += NV * Wv) window_group<T, D, NV, P, R>(dst, dstep, w, src, sstep, t, c, add);
  switch ((n - c) / Wv) {
    case 3: window_group<T, D, 3, (P > 2 ? 2 : P), R>(dst, dstep, w, src, sstep, t, c, add);
            if constexpr (P > 2) window_group<T, D, 3, P - 2, R>(dst + 2 * dstep, dstep, w, src + 2 * sstep, sstep, t,
                                                                 c, add);
            break;
    case 2: window_group<T, D, 2, P, R>(dst, dstep, w, src, sstep, t, c, add); break;
    case 1: window_group<T, D, 1, P, R>(dst, dstep, w, src, sstep, t, c, add); break;
    default: break;
  }
  c += (n - c) / Wv * Wv;
  for (int q = 0; q < P; ++q)
    for (int64_t cc = c; cc < n; ++cc) {
      D* d = dst + q * dstep;
      A acc = add ? static_cast<A>(d[cc]) : A(0);
      for (int64_t i = t.i0; i < t.i1; ++i)
        for (int64_t j = t.j0; j < t.j1; ++j) {
          const A s = static_cast<A>(src[q * sstep + t.base + i * t.si + j * t.sj + cc]);
          acc += w[(i * t.kw + j) * t.width + cc] * (R && s < A(0) ? A(0) : s);
        }
      d[cc] = static_cast<D>(acc);
    }
}

// Pixels [0, count) of a row, pixel q's window from window(q): those whose window is full ([full0, full1)) four at a
// time, the others one by one.
template <typename T, typename D, bool R, typename Window>
C10_ALWAYS_INLINE void row_sum(D* dst, int64_t dstep, int64_t count, int64_t full0, int64_t full1, int64_t n,
                               const at::opmath_type<T>* w, const T* src, int64_t sstep, Window window, bool add) {
  int64_t q = 0;
  for (; q < count; ++q) {
    if (q >= full0 && q + 4 <= full1) {
      window_sum<T, D, 4, R>(dst + q * dstep, dstep, n, w, src, sstep, window(q), add);
      q += 3;
    } else {
      window_sum<T, D, 1, R>(dst + q * dstep, dstep, n, w, src, sstep, window(q), add);
    }
  }
}

// out [N, Ho, Wo, Co] from x [N, H, W, Xs] (channels_last data, Cx channels read; R: through a ReLU)
template <typename T, bool R>
void stack_forward(const T* x, at::TensorList weights, const StackProblem& p, T* out) {
  const auto wt = taps_by_channel<T>(weights, p);
  at::parallel_for(0, p.N * p.Ho, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / p.Ho, ho = r % p.Ho;
      T* orow = out + r * p.Wo * p.Co;
      for (const StackBlock& b : p.blocks) {
        const StackColumn& c = p.cols[b.col];
        const int64_t h0 = ho * c.sh - c.ph;
        const auto [i0, i1] = tap_range(h0, c.dh, p.H, c.kh);
        auto window = [&](int64_t wo) {
          const int64_t w0 = wo * c.sw - c.pw;
          const auto [j0, j1] = tap_range(w0, c.dw, p.W, c.kw);
          return TapWindow{i0, i1, j0, j1, c.kw, c.width, ((n * p.H + h0) * p.W + w0) * p.Xs + b.c,
                           c.dh * p.W * p.Xs, c.dw * p.Xs};
        };
        // the outputs whose filter row lies inside the input row
        const int64_t full0 = (c.pw + c.sw - 1) / c.sw;
        const int64_t last = p.W - 1 + c.pw - (c.kw - 1) * c.dw;
        const int64_t full1 = last < 0 ? 0 : std::min(p.Wo, last / c.sw + 1);
        row_sum<T, T, R>(orow + b.o, p.Co, p.Wo, full0, full1, b.n, wt[b.col].data() + b.l, x, c.sw * p.Xs, window,
                         false);
      }
    }
  });
}

// gx [N, H, W, Cx] from the output gradient g [N, Ho, Wo, Co]: at stride 1 output (hi + ph - i dh, wi + pw - j dw)
// reaches input (hi, wi) through tap (i, j); at other strides only the outputs on the stride's grid do. relu_of: x
// [N, H, W, Xs] under a fused ReLU (the gradient is kept where x > 0), else null.
template <typename T>
void stack_input_grad(const T* g, at::TensorList weights, const StackProblem& p, T* gx, const T* relu_of) {
  using A = at::opmath_type<T>;
  const auto wt = taps_by_channel<T>(weights, p);
  at::parallel_for(0, p.N * p.H, 1, [&](int64_t r0, int64_t r1) {
    std::vector<A> acc(p.W * p.Cx);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / p.H, hi = r % p.H;
      std::fill(acc.begin(), acc.end(), A(0));
      for (const StackBlock& b : p.blocks) {
        const StackColumn& c = p.cols[b.col];
        const A* w = wt[b.col].data() + b.l;
        const int64_t gbase = n * p.Ho * p.Wo * p.Co + b.o;
        if (c.sh == 1 && c.sw == 1) {
          const int64_t h0 = hi + c.ph;
          const auto [i0, i1] = tap_range(h0, -c.dh, p.Ho, c.kh);
          auto window = [&](int64_t wi) {
            const int64_t w0 = wi + c.pw;
            const auto [j0, j1] = tap_range(w0, -c.dw, p.Wo, c.kw);
            return TapWindow{i0, i1, j0, j1, c.kw, c.width, gbase + (h0 * p.Wo + w0) * p.Co, -c.dh * p.Wo * p.Co,
                             -c.dw * p.Co};
          };
          // the inputs that every filter column reaches from inside the output row
          const int64_t full0 = std::max<int64_t>(0, (c.kw - 1) * c.dw - c.pw);
          const int64_t full1 = std::min(p.W, p.Wo - c.pw);
          row_sum<T, A, false>(acc.data() + b.c, p.Cx, p.W, full0, full1, b.n, w, g, p.Co, window, true);
          continue;
        }
        for (int64_t i = 0; i < c.kh; ++i) {  // one filter row at a time: its output row, if on the grid
          const int64_t th = hi + c.ph - i * c.dh;
          if (th < 0 || th % c.sh != 0 || th / c.sh >= p.Ho) continue;
          for (int64_t wi = 0; wi < p.W; ++wi)
            for (int64_t j = 0; j < c.kw; ++j) {
              const int64_t tw = wi + c.pw - j * c.dw;
              if (tw < 0 || tw % c.sw != 0 || tw / c.sw >= p.Wo) continue;
              const TapWindow t{i, i + 1, j, j + 1, c.kw, c.width,
                                gbase + ((th / c.sh) * p.Wo + tw / c.sw) * p.Co, 0, 0};
              window_sum<T, A, 1>(acc.data() + wi * p.Cx + b.c, 0, b.n, w, g, 0, t, true);
            }
        }
      }
      T* dst = gx + r * p.W * p.Cx;
      if (relu_of == nullptr) {
        for (int64_t e = 0; e < p.W * p.Cx; ++e) dst[e] = static_cast<T>(acc[e]);
      } else {  // as ReLU's backward: the gradient where the ReLU's output is positive, else 0
        const T* xr = relu_of + r * p.W * p.Xs;
        for (int64_t wi = 0; wi < p.W; ++wi)
          for (int64_t ch = 0; ch < p.Cx; ++ch)
            dst[wi * p.Cx + ch] =
                static_cast<A>(xr[wi * p.Xs + ch]) > A(0) ? static_cast<T>(acc[wi * p.Cx + ch]) : T(0);
      }
    }
  });
}

namespace {

// x as the kernels read it, its pixel stride into p.Xs
inline Tensor pixel_strided(const Tensor& x, StackProblem& p) {
  auto [xc, xs] = channels_last_rows(x);
  p.Xs = xs;
  return xc;
}

Tensor depthwise_stack(const Tensor& x, at::TensorList weights, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, bool relu) {
  StackProblem p = stack_problem("depthwise_stack", x, weights, stride, padding, dilation);
  Tensor out = at::empty({p.N, p.Co, p.Ho, p.Wo}, x.options().memory_format(c10::MemoryFormat::ChannelsLast));
  if (p.N == 0 || p.Cx == 0) return in_rule_layout(out.zero_(), x);
  const Tensor xc = pixel_strided(x, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::depthwise_stack", [&] {
    if (relu) {
      stack_forward<scalar_t, true>(xc.const_data_ptr<scalar_t>(), weights, p, out.data_ptr<scalar_t>());
    } else {
      stack_forward<scalar_t, false>(xc.const_data_ptr<scalar_t>(), weights, p, out.data_ptr<scalar_t>());
    }
  });
  return in_rule_layout(out, x);
}

std::tuple<Tensor, std::vector<Tensor>> depthwise_stack_backward(const Tensor& grad, const Tensor& x,
                                                                 at::TensorList weights, at::IntArrayRef stride,
                                                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                                                 bool relu, bool need_x_grad, bool need_weights_grad) {
  const char* op = "depthwise_stack_backward";
  StackProblem p = stack_problem(op, x, weights, stride, padding, dilation);
  check_4d(op, "grad", grad);
  check_same_device(op, "grad", grad, "x", x);
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "fastnas.", op, ": grad has dtype ",
                   dtype_name(grad.scalar_type()), ", expected the dtype of x (", dtype_name(x.scalar_type()), ")");
  TORCH_CHECK_VALUE(grad.size(0) == p.N && grad.size(1) == p.Co && grad.size(2) == p.Ho && grad.size(3) == p.Wo,
                    "fastnas.", op, ": grad must have shape [", p.N, ", ", p.Co, ", ", p.Ho, ", ", p.Wo, "], got ",
                    shape_str(grad.sizes()));
  const Tensor gc = grad.contiguous(c10::MemoryFormat::ChannelsLast);
  // x's values are read for the weight gradients and, under a fused ReLU, for the input gradient's mask
  const bool read_x = (need_weights_grad || (relu && need_x_grad)) && p.N > 0 && p.Cx > 0;
  const Tensor xc = read_x ? pixel_strided(x, p) : x;
  Tensor gx = x.new_empty({0});
  if (need_x_grad) {
    Tensor buf = at::empty(x.sizes(), x.options().memory_format(c10::MemoryFormat::ChannelsLast));
    if (p.N > 0 && p.Cx > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::depthwise_stack_backward",
                                      [&] {
        stack_input_grad<scalar_t>(gc.const_data_ptr<scalar_t>(), weights, p, buf.data_ptr<scalar_t>(),
                                   relu ? xc.const_data_ptr<scalar_t>() : nullptr);
      });
    } else {
      buf.zero_();
    }
    gx = with_strides_of(buf, at::empty_like(x));
  }
  std::vector<Tensor> gws;
  if (need_weights_grad) {
    for (const StackColumn& c : p.cols) gws.push_back(at::zeros({c.width, 1, c.kh, c.kw}, x.options()));
    if (p.N > 0 && p.Cx > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::depthwise_stack_backward",
                                      [&] {
        for (const StackBlock& b : p.blocks) {
          const StackColumn& c = p.cols[b.col];
          const DepthwiseGeometry geo{p.N, p.H, p.W, b.n, p.Ho, p.Wo, c.kh, c.kw, c.sh, c.sw,
                                      c.ph, c.pw, c.dh, c.dw, p.Xs, p.Co, relu};
          depthwise_weight_grad<scalar_t>(xc.const_data_ptr<scalar_t>() + b.c, gc.const_data_ptr<scalar_t>() + b.o,
                                          gws[b.col].data_ptr<scalar_t>() + b.l * c.kh * c.kw, geo);
        }
      });
    }
  }
  return {gx, gws};
}

}  // namespace

// the CPU kernels of depthwise_stack
inline void register_depthwise_stack(torch::Library& m) {
  m.impl("depthwise_stack", &depthwise_stack);
  m.impl("depthwise_stack_backward", &depthwise_stack_backward);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
