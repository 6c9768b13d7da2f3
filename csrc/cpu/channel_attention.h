// The whole CBAM channel gate on the CPU, out = x * sigmoid(MLP(mean_hw x) + MLP(max_hw x)) with the shared MLP
// p -> relu(p w1^T + b1) w2^T + b2, forward and backward.
//
// Two schedules with the same arithmetic (and bit-identical results):
// - image by image (a task per image, when there are at least as many images as threads): the image's pooling,
//   MLP and scaling run back to back, so its second pass over x (forward) or over the gradient (backward) reads
//   the image from the core's L2 cache instead of memory;
// - pass by pass (fewer images than threads): each pass over the batch is parallel, the tiny MLP runs in between.
//
// The MLP rounds to T where the reference composition (linear layers in T) does: the pooled rows, the hidden
// activations, each row's output and the logits; and in the backward the logits' gradient, the hidden rows'
// gradient and the pooled rows' gradient.
//
// Compiled once per CPU capability (cpu_ops.h), in a namespace named after it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "channel_pool.h"
#include "scale.h"

namespace fastnas::cpu {
inline namespace CPU_CAPABILITY {

// The MLP's weights in the accumulation type A (biases zero when absent).
template <typename A>
struct GateMlp {
  const A* w1;  // [hid, C]
  const A* b1;  // [hid]
  const A* w2;  // [C, hid]
  const A* b2;  // [C]
  int64_t C, hid;
};

// Where the gate's tensors live. x, out, g, gx: [N, C, H, W] in one layout (NCHW or NHWC, dense); pooled, hidden:
// [2N, C] and [2N, hid] (the mean's rows, then the max's); logits, arg: [N, C]. The forward writes pooled, hidden,
// logits and arg; the backward reads hidden, logits and arg (pooled is not needed there).
template <typename T>
struct GateTensors {
  int64_t N, C, HW;
  bool nchw;
  const T* x;
  T* pooled;
  T* hidden;
  T* logits;
  int32_t* arg;
};

// (Σ w[i] x[i], Σ w[i] y[i]) over i < n, vectorised (two rows against one weight row).
template <typename A>
C10_ALWAYS_INLINE std::pair<A, A> dot2(const A* w, const A* x, const A* y, int64_t n) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  V vx(A(0)), vy(A(0));
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V wv = V::loadu(w + i);
    vx = at::vec::fmadd(wv, V::loadu(x + i), vx);
    vy = at::vec::fmadd(wv, V::loadu(y + i), vy);
  }
  A sx = hsum(vx), sy = hsum(vy);
  for (; i < n; ++i) {
    sx += w[i] * x[i];
    sy += w[i] * y[i];
  }
  return {sx, sy};
}

// acc[i] += a * w[i] for i < n, vectorised.
template <typename A>
C10_ALWAYS_INLINE void axpy(A a, const A* w, A* acc, int64_t n) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const V va(a);
  int64_t i = 0;
  for (; i + W <= n; i += W) at::vec::fmadd(va, V::loadu(w + i), V::loadu(acc + i)).store(acc + i);
  for (; i < n; ++i) acc[i] += a * w[i];
}

// Scratch rows of the MLP in the accumulation type, per task: C-sized (pa, pm) and hid-sized (ha, hm) pairs.
template <typename A>
struct GateScratch {
  std::vector<A> pa, pm, ha, hm;
  GateScratch(int64_t C, int64_t hid) : pa(C), pm(C), ha(hid), hm(hid) {}
};

// The MLP of image n: hidden rows n and N + n from pooled rows n and N + n; logits row n; s[C] = sigmoid(logits).
template <typename T, typename A = at::opmath_type<T>>
void gate_mlp_forward(const GateMlp<A>& m, const GateTensors<T>& t, int64_t n, A* s, GateScratch<A>& w) {
  const T* pa = t.pooled + n * m.C;
  const T* pm = t.pooled + (t.N + n) * m.C;
  T* ha = t.hidden + n * m.hid;
  T* hm = t.hidden + (t.N + n) * m.hid;
  for (int64_t c = 0; c < m.C; ++c) {
    w.pa[c] = A(pa[c]);
    w.pm[c] = A(pm[c]);
  }
  for (int64_t j = 0; j < m.hid; ++j) {
    auto [a, b] = dot2(m.w1 + j * m.C, w.pa.data(), w.pm.data(), m.C);
    a += m.b1[j];
    b += m.b1[j];
    ha[j] = T(a > A(0) || std::isnan(a) ? a : A(0));  // relu, NaN kept (as torch.relu)
    hm[j] = T(b > A(0) || std::isnan(b) ? b : A(0));
    w.ha[j] = A(ha[j]);
    w.hm[j] = A(hm[j]);
  }
  T* l = t.logits + n * m.C;
  for (int64_t c = 0; c < m.C; ++c) {
    auto [a, b] = dot2(m.w2 + c * m.hid, w.ha.data(), w.hm.data(), m.hid);
    l[c] = T(A(T(a + m.b2[c])) + A(T(b + m.b2[c])));
    s[c] = sigmoid(A(l[c]));
  }
}

// The MLP's backward for image n from d[C] = sum_hw g x: glogits row n = sigmoid'(logits) d, ghidden rows n and
// N + n (masked by relu); when ga / gm are given, the pooled rows' gradients (ga already divided by H*W).
template <typename T, typename A = at::opmath_type<T>>
void gate_mlp_backward(const GateMlp<A>& m, const GateTensors<T>& t, int64_t n, const A* d, T* glogits, T* ghidden,
                       A* ga, A* gm, GateScratch<A>& w) {
  T* gl = glogits + n * m.C;
  const T* l = t.logits + n * m.C;
  std::fill(w.ha.begin(), w.ha.end(), A(0));
  for (int64_t c = 0; c < m.C; ++c) {  // and Σ_c glogits[c] w2[c, :], row by row of w2
    const A s = sigmoid(A(l[c]));
    gl[c] = T(s * (A(1) - s) * d[c]);
    axpy(A(gl[c]), m.w2 + c * m.hid, w.ha.data(), m.hid);
  }
  const T* ha = t.hidden + n * m.hid;
  const T* hm = t.hidden + (t.N + n) * m.hid;
  T* gha = ghidden + n * m.hid;
  T* ghm = ghidden + (t.N + n) * m.hid;
  for (int64_t j = 0; j < m.hid; ++j) {  // both rows' outputs were summed into the logits: one gradient for both
    const T tj = T(w.ha[j]);
    gha[j] = A(ha[j]) > A(0) ? tj : T(0);
    ghm[j] = A(hm[j]) > A(0) ? tj : T(0);
  }
  if (ga == nullptr) return;
  std::fill(w.pa.begin(), w.pa.end(), A(0));
  std::fill(w.pm.begin(), w.pm.end(), A(0));
  for (int64_t j = 0; j < m.hid; ++j) {  // Σ_j ghidden[j] w1[j, :], row by row of w1
    axpy(A(gha[j]), m.w1 + j * m.C, w.pa.data(), m.C);
    axpy(A(ghm[j]), m.w1 + j * m.C, w.pm.data(), m.C);
  }
  const A inv_hw = A(1) / A(t.HW);
  for (int64_t c = 0; c < m.C; ++c) {
    ga[c] = A(T(w.pa[c])) * inv_hw;
    gm[c] = A(T(w.pm[c]));
  }
}

// Pool image n into pooled rows n and N + n and arg row n; sa, sm, sid: scratch of C (NHWC).
template <typename T, typename A = at::opmath_type<T>>
void gate_pool_image(const GateTensors<T>& t, int64_t n, A* sa, A* sm, A* sid) {
  const T* xn = t.x + n * t.C * t.HW;
  T* avg = t.pooled + n * t.C;
  T* mx = t.pooled + (t.N + n) * t.C;
  int32_t* arg = t.arg + n * t.C;
  if (t.nchw) {
    for (int64_t c = 0; c < t.C; ++c) {
      PoolAcc<A> p = reduce_row(xn + c * t.HW, t.HW);
      avg[c] = T(p.sum / A(t.HW));
      mx[c] = T(p.max);
      arg[c] = static_cast<int32_t>(p.arg);
    }
  } else {
    channel_pool_image_nhwc<T>(xn, t.C, t.HW, sa, sm, sid, avg, mx, arg);
  }
}

// out (image n) = x * s, s[C] the image's gate values.
template <typename T, typename A = at::opmath_type<T>>
void gate_scale_image(const GateTensors<T>& t, int64_t n, const A* s, T* out) {
  const int64_t off = n * t.C * t.HW;
  if (t.nchw) {
    for (int64_t c = 0; c < t.C; ++c) {
      scale_row_by_scalar<T>(t.x + off + c * t.HW, s[c], out + off + c * t.HW, t.HW, nullptr);
    }
  } else {
    for (int64_t h = 0; h < t.HW; ++h) {
      scale_row_by_vector<T>(t.x + off + h * t.C, s, out + off + h * t.C, t.C, nullptr);
    }
  }
}

// d[C] = sum_hw g x over image n.
template <typename T, typename A = at::opmath_type<T>>
void gate_dot_image(const GateTensors<T>& t, const T* g, int64_t n, A* d) {
  const int64_t off = n * t.C * t.HW;
  if (t.nchw) {
    for (int64_t c = 0; c < t.C; ++c) {
      d[c] = scale_row_by_scalar_bwd<T>(g + off + c * t.HW, t.x + off + c * t.HW, A(0), nullptr, t.HW);
    }
  } else {
    std::fill(d, d + t.C, A(0));
    for (int64_t h = 0; h < t.HW; ++h) {
      scale_row_by_vector_bwd<T>(g + off + h * t.C, t.x + off + h * t.C, nullptr, nullptr, d, t.C);
    }
  }
}

// The max's share of image n's input gradient, after g * s + ga was written everywhere: the element at each
// channel's first maximum becomes g * s + ga + gm. s, ga, gm: the image's C values.
template <typename T, typename A = at::opmath_type<T>>
void gate_add_max_share_image(const GateTensors<T>& t, const T* g, int64_t n, const A* s, const A* ga, const A* gm,
                              T* gx) {
  const int64_t off = n * t.C * t.HW;
  const int32_t* arg = t.arg + n * t.C;
  for (int64_t c = 0; c < t.C; ++c) {
    const int64_t i = off + (t.nchw ? c * t.HW + arg[c] : int64_t(arg[c]) * t.C + c);
    gx[i] = T(A(g[i]) * s[c] + ga[c] + gm[c]);
  }
}

// gx (image n) = g * s + ga, plus gm at each channel's argmax.
template <typename T, typename A = at::opmath_type<T>>
void gate_input_grad_image(const GateTensors<T>& t, const T* g, int64_t n, const A* s, const A* ga, const A* gm,
                           T* gx) {
  const int64_t off = n * t.C * t.HW;
  if (t.nchw) {
    for (int64_t c = 0; c < t.C; ++c) {
      scale_row_by_scalar<T>(g + off + c * t.HW, s[c], gx + off + c * t.HW, t.HW, ga + c);
    }
  } else {
    for (int64_t h = 0; h < t.HW; ++h) scale_row_by_vector<T>(g + off + h * t.C, s, gx + off + h * t.C, t.C, ga);
  }
  gate_add_max_share_image(t, g, n, s, ga, gm, gx);
}

// Whether the gate runs image by image (see the top of this file).
inline bool gate_by_image(int64_t N) { return N >= at::get_num_threads(); }

// Forward: out, and pooled, hidden, logits, arg for the backward.
template <typename T, typename A = at::opmath_type<T>>
void channel_gate_fwd(const GateMlp<A>& m, const GateTensors<T>& t, T* out) {
  const int64_t C = t.C, image = C * t.HW;
  if (gate_by_image(t.N)) {
    at::parallel_for(0, t.N, std::max<int64_t>(1, kGrain / std::max<int64_t>(image, 1)), [&](int64_t b, int64_t e) {
      std::vector<A> s(C), sm(C), sid(C);
      GateScratch<A> w(C, m.hid);
      for (int64_t n = b; n < e; ++n) {
        gate_pool_image(t, n, s.data(), sm.data(), sid.data());
        gate_mlp_forward(m, t, n, s.data(), w);
        gate_scale_image(t, n, s.data(), out);
      }
    });
    return;
  }
  std::vector<A> s(t.N * C);
  if (t.nchw) {  // a task per (image, channel) row
    at::parallel_for(0, t.N * C, std::max<int64_t>(1, kGrain / std::max<int64_t>(t.HW, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / C, c = r % C;
        PoolAcc<A> p = reduce_row(t.x + r * t.HW, t.HW);
        t.pooled[n * C + c] = T(p.sum / A(t.HW));
        t.pooled[(t.N + n) * C + c] = T(p.max);
        t.arg[r] = static_cast<int32_t>(p.arg);
      }
    });
  } else {
    at::parallel_for(0, t.N, 1, [&](int64_t b, int64_t e) {
      std::vector<A> sa(C), sm(C), sid(C);
      for (int64_t n = b; n < e; ++n) gate_pool_image(t, n, sa.data(), sm.data(), sid.data());
    });
  }
  GateScratch<A> w(C, m.hid);
  for (int64_t n = 0; n < t.N; ++n) gate_mlp_forward(m, t, n, s.data() + n * C, w);
  if (t.nchw) {
    scale_rows_by_scalar<T>(t.x, s.data(), out, t.N * C, t.HW);
  } else {
    scale_rows_by_vector<T>(t.x, s.data(), out, t.N * t.HW, C, t.HW);
  }
}

// Backward: glogits, ghidden and (when gx is given) the input gradient.
template <typename T, typename A = at::opmath_type<T>>
void channel_gate_bwd(const GateMlp<A>& m, const GateTensors<T>& t, const T* g, T* glogits, T* ghidden, T* gx) {
  const int64_t C = t.C, image = C * t.HW;
  if (gate_by_image(t.N)) {
    at::parallel_for(0, t.N, std::max<int64_t>(1, kGrain / std::max<int64_t>(image, 1)), [&](int64_t b, int64_t e) {
      std::vector<A> d(C), s(C), ga(C), gm(C);
      GateScratch<A> w(C, m.hid);
      for (int64_t n = b; n < e; ++n) {
        gate_dot_image(t, g, n, d.data());
        gate_mlp_backward(m, t, n, d.data(), glogits, ghidden, gx ? ga.data() : nullptr, gm.data(), w);
        if (gx) {
          for (int64_t c = 0; c < C; ++c) s[c] = sigmoid(A(t.logits[n * C + c]));
          gate_input_grad_image(t, g, n, s.data(), ga.data(), gm.data(), gx);
        }
      }
    });
    return;
  }
  std::vector<A> d(t.N * C), s(t.N * C), ga(t.N * C), gm(t.N * C);
  if (t.nchw) {
    scale_rows_by_scalar_bwd<T>(g, t.x, s.data(), nullptr, d.data(), t.N * C, t.HW);
  } else {
    scale_rows_by_vector_bwd<T>(g, t.x, s.data(), nullptr, d.data(), t.N, t.HW, C);
  }
  GateScratch<A> w(C, m.hid);
  for (int64_t n = 0; n < t.N; ++n) {
    gate_mlp_backward(m, t, n, d.data() + n * C, glogits, ghidden, gx ? ga.data() + n * C : nullptr,
                      gm.data() + n * C, w);
  }
  if (!gx) return;
  for (int64_t i = 0; i < t.N * C; ++i) s[i] = sigmoid(A(t.logits[i]));
  if (t.nchw) {
    scale_rows_by_scalar<T>(g, s.data(), gx, t.N * C, t.HW, ga.data());
  } else {
    scale_rows_by_vector<T>(g, s.data(), gx, t.N * t.HW, C, t.HW, ga.data());
  }
  for (int64_t n = 0; n < t.N; ++n) {
    const int64_t k = n * C;
    gate_add_max_share_image(t, g, n, s.data() + k, ga.data() + k, gm.data() + k, gx);
  }
}

namespace {

// A matrix argument of the gate: shape [rows, cols], x's dtype and device.
void check_gate_param(const char* arg, const Tensor& t, std::initializer_list<int64_t> shape, const Tensor& x) {
  const char* op = "channel_gate";
  check_float(op, arg, t);
  check_same_device(op, arg, t, "x", x);
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "fastnas.", op, ": ", arg, " has dtype ",
                   dtype_name(t.scalar_type()), ", expected the dtype of x (", dtype_name(x.scalar_type()), ")");
  TORCH_CHECK_VALUE(t.sizes().equals(shape), "fastnas.", op, ": ", arg, " must have shape ", shape_str(shape),
                    ", got ", shape_str(t.sizes()));
}

// x and the MLP's weights: x [N, C, H, W] with H*W >= 1, w1 [hid, C], w2 [C, hid], b1 [hid] and b2 [C] when given.
void check_channel_gate(const Tensor& x, const Tensor& w1, const c10::optional<Tensor>& b1, const Tensor& w2,
                        const c10::optional<Tensor>& b2) {
  const char* op = "channel_gate";
  check_4d_on(op, "x", x, at::kCPU);
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK_VALUE(HW >= 1 || x.size(0) * C == 0, "fastnas.", op, ": x has no spatial elements (shape ",
                    shape_str(x.sizes()), "), the max is undefined");
  check_index_range(op, HW);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(0) >= 1, "fastnas.", op, ": w1 must have shape [hidden, ", C,
                    "] (hidden >= 1), got ", shape_str(w1.sizes()));
  const int64_t hid = w1.size(0);
  check_gate_param("w1", w1, {hid, C}, x);
  check_gate_param("w2", w2, {C, hid}, x);
  if (b1) check_gate_param("b1", *b1, {hid}, x);
  if (b2) check_gate_param("b2", *b2, {C}, x);
}

// The MLP's weights in the accumulation type, kept alive beside the raw view the kernels read.
template <typename A>
struct GateWeights {
  Tensor w1, b1, w2, b2;
  GateMlp<A> view() const {
    return {w1.const_data_ptr<A>(), b1.const_data_ptr<A>(), w2.const_data_ptr<A>(), b2.const_data_ptr<A>(),
            w2.size(0), w1.size(0)};
  }
};

template <typename A>
GateWeights<A> gate_weights(const Tensor& w1, const c10::optional<Tensor>& b1, const Tensor& w2,
                            const c10::optional<Tensor>& b2) {
  const auto acc = w1.options().dtype(c10::CppTypeToScalarType<A>::value);
  auto bias = [&](const c10::optional<Tensor>& b, int64_t n) {
    return b ? b->to(acc).contiguous() : at::zeros({n}, acc);
  };
  return {w1.to(acc).contiguous(), bias(b1, w1.size(0)), w2.to(acc).contiguous(), bias(b2, w2.size(0))};
}

// The whole channel gate (see above): (out, pooled [2N, C], hidden [2N, hid], logits [N, C], int32 argmax
// [N, C]); the last four are what the backward reads.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> channel_gate(const Tensor& x_in, const Tensor& w1,
                                                                const c10::optional<Tensor>& b1, const Tensor& w2,
                                                                const c10::optional<Tensor>& b2) {
  check_channel_gate(x_in, w1, b1, w2, b2);
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3), hid = w1.size(0);
  Output o = make_output(x_in);
  Tensor pooled = at::empty({2 * N, C}, x_in.options());
  Tensor hidden = at::empty({2 * N, hid}, x_in.options());
  Tensor logits = at::empty({N, C}, x_in.options());
  Tensor arg = at::empty({N, C}, x_in.options().dtype(at::kInt));
  if (N * C == 0) return {o.out, pooled, hidden.zero_(), logits, arg};
  Tensor x = in_layout(x_in, o.layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::channel_gate", [&] {
    using A = at::opmath_type<scalar_t>;
    const GateWeights<A> w = gate_weights<A>(w1, b1, w2, b2);
    const GateTensors<scalar_t> t{N, C, HW, o.layout == Layout::NCHW, x.const_data_ptr<scalar_t>(),
                                  pooled.data_ptr<scalar_t>(), hidden.data_ptr<scalar_t>(),
                                  logits.data_ptr<scalar_t>(), arg.data_ptr<int32_t>()};
    channel_gate_fwd<scalar_t>(w.view(), t, o.buffer.data_ptr<scalar_t>());
  });
  o.finish();
  return {o.out, pooled, hidden, logits, arg};
}

// (grad x (an empty tensor unless need_x_grad), grad logits [N, C], grad hidden [2N, hid]); the weights' gradients
// are small products of these with the saved pooled and hidden rows.
std::tuple<Tensor, Tensor, Tensor> channel_gate_backward(const Tensor& grad, const Tensor& x_in, const Tensor& argmax,
                                                         const Tensor& logits, const Tensor& hidden, const Tensor& w1,
                                                         const Tensor& w2, bool need_x_grad) {
  const char* op = "channel_gate";
  check_channel_gate(x_in, w1, c10::nullopt, w2, c10::nullopt);
  check_grad(op, grad, x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3), hid = w1.size(0);
  check_gate_param("logits", logits, {N, C}, x_in);
  check_gate_param("hidden", hidden, {2 * N, hid}, x_in);
  TORCH_CHECK_VALUE(argmax.sizes().equals({N, C}), "fastnas.", op, ": argmax must have shape [", N, ", ", C,
                    "], got ", shape_str(argmax.sizes()));
  check_index_tensor(op, "argmax", argmax, at::kInt, HW, "x", x_in);
  Output o = make_output(grad);
  Tensor gx = need_x_grad ? o.out : at::empty({0}, grad.options());
  Tensor glogits = at::empty({N, C}, x_in.options());
  Tensor ghidden = at::empty({2 * N, hid}, x_in.options());
  if (N * C == 0) return {gx, glogits, ghidden.zero_()};
  Tensor g = in_layout(grad, o.layout), x = in_layout(x_in, o.layout);
  Tensor l = logits.contiguous(), h = hidden.contiguous(), arg = argmax.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::channel_gate_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    const GateWeights<A> w = gate_weights<A>(w1, c10::nullopt, w2, c10::nullopt);
    // (the backward only reads hidden, logits and argmax)
    const GateTensors<scalar_t> t{N, C, HW, o.layout == Layout::NCHW, x.const_data_ptr<scalar_t>(), nullptr,
                                  h.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(), arg.data_ptr<int32_t>()};
    channel_gate_bwd<scalar_t>(w.view(), t, g.const_data_ptr<scalar_t>(), glogits.data_ptr<scalar_t>(),
                               ghidden.data_ptr<scalar_t>(), need_x_grad ? o.buffer.data_ptr<scalar_t>() : nullptr);
  });
  if (need_x_grad) o.finish();
  return {gx, glogits, ghidden};
}

}  // namespace

// the CPU kernels of channel_gate
inline void register_channel_attention(torch::Library& m) {
  m.impl("channel_gate", &channel_gate);
  m.impl("channel_gate_backward", &channel_gate_backward);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
