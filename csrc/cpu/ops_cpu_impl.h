// CPU implementations of the fastnas operators: checks, allocation, layout choice, dtype dispatch. The arithmetic is
// in kernels.h. Compiled once per CPU capability (ops_cpu_default.cpp, ops_cpu_avx2.cpp), each copy in its own
// namespace; register_cpu.cpp registers the best one the machine supports.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common.h"
#include "batch_norm.h"
#include "channel_gate.h"
#include "depthwise.h"
#include "pool2d.h"
#include "single_channel_conv.h"
#include "kernels.h"

namespace fastnas::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::Tensor;

constexpr c10::DeviceType kDev = c10::DeviceType::CPU;

// The float index lanes of the pooling kernels are exact below 2^24.
void check_index_range(const char* op, int64_t n) {
  TORCH_CHECK_VALUE(n < (int64_t(1) << 24), "fastnas.", op, ": the reduced dimension has ", n,
                    " elements, expected fewer than 2^24");
}

// weights / logits as a contiguous tensor of the accumulation type of `like`
Tensor as_acc(const Tensor& t, c10::ScalarType like) { return t.to(acc_dtype(like)).contiguous(); }

template <typename A>
Tensor sigmoid_of(const Tensor& logits_acc) {
  Tensor s = at::empty_like(logits_acc);
  sigmoid_into<A>(logits_acc.const_data_ptr<A>(), s.data_ptr<A>(), s.numel());
  return s;
}

// grad logits = s (1 - s) d, written into a tensor like `logits` (its dtype and strides)
template <typename A>
Tensor logits_grad(const Tensor& s, const Tensor& d, const Tensor& logits) {
  const A* sp = s.data_ptr<A>();
  A* dp = d.data_ptr<A>();
  for (int64_t i = 0; i < d.numel(); ++i) dp[i] = sp[i] * (A(1) - sp[i]) * dp[i];
  Tensor out = at::empty_like(logits);
  out.copy_(d.view(logits.sizes()));
  return out;
}

// A 4-D floating-point CPU tensor, or an error naming the op and the argument.
void check_cpu_4d_float(const char* op, const char* arg, const Tensor& t) {
  check_4d(op, arg, t);
  check_float(op, arg, t);
  check_device_type(op, arg, t, kDev);
}

// Each of the named int[2] arguments holds two integers >= its minimum.
void check_int_pairs(const char* op,
                     std::initializer_list<std::tuple<const char*, at::IntArrayRef, int64_t>> args) {
  for (const auto& [name, v, lo] : args) {
    TORCH_CHECK_VALUE(v.size() == 2 && v[0] >= lo && v[1] >= lo, "fastnas.", op, ": ", name,
                      " must be two integers >= ", lo, ", got ", shape_str(v));
  }
}

// ------------------------------------------------------------------------------------------------ mixed_sum

Tensor mixed_sum(at::TensorList xs, const Tensor& weights) {
  check_mixed_sum(xs, weights);
  check_device_type("mixed_sum", "xs[0]", xs[0], kDev);
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
  check_mixed_sum_backward(grad, xs, weights, kDev);
  return mixed_sum_bwd_impl(grad, xs, weights, need_xs_grad);
}

std::vector<Tensor> mixed_sum_backward_xs(const Tensor& grad, const Tensor& weights) {
  check_mixed_sum_backward_xs(grad, weights, kDev);
  return std::get<0>(mixed_sum_bwd_impl(grad, {}, weights, true));
}

// ------------------------------------------------------------------------------------------------ channel_pool

std::tuple<Tensor, Tensor, Tensor> channel_pool(const Tensor& x_in) {
  check_channel_pool(x_in);
  check_device_type("channel_pool", "x", x_in, kDev);
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  check_index_range("channel_pool", HW);
  Tensor avg = at::empty({N, C}, x_in.options());
  Tensor mx = at::empty({N, C}, x_in.options());
  Tensor arg = at::empty({N, C}, x_in.options().dtype(at::kInt));
  if (N * C == 0) return {avg, mx, arg};
  const Layout L = layout_of(x_in);
  Tensor x = in_layout(x_in, L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::channel_pool", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (L == Layout::NCHW) {
      channel_pool_nchw<scalar_t>(xp, avg.data_ptr<scalar_t>(), mx.data_ptr<scalar_t>(), arg.data_ptr<int32_t>(),
                                  N * C, HW);
    } else {
      channel_pool_nhwc<scalar_t>(xp, avg.data_ptr<scalar_t>(), mx.data_ptr<scalar_t>(), arg.data_ptr<int32_t>(), N,
                                  C, HW);
    }
  });
  return {avg, mx, arg};
}

Tensor channel_pool_backward(const Tensor& grad_avg, const Tensor& grad_max, const Tensor& argmax, int64_t H,
                             int64_t W, bool channels_last) {
  check_float("channel_pool", "grad_avg", grad_avg);
  check_device_type("channel_pool", "grad_avg", grad_avg, kDev);
  TORCH_CHECK_VALUE(grad_avg.dim() == 2 && grad_max.sizes().equals(grad_avg.sizes()) &&
                        argmax.sizes().equals(grad_avg.sizes()),
                    "fastnas.channel_pool: backward expects grad_avg, grad_max and argmax of one shape [N, C]");
  TORCH_CHECK_TYPE(grad_max.scalar_type() == grad_avg.scalar_type() && argmax.scalar_type() == at::kInt,
                   "fastnas.channel_pool: backward expects grad_max of the dtype of grad_avg and an int32 argmax");
  const int64_t N = grad_avg.size(0), C = grad_avg.size(1), HW = H * W;
  const Layout L = channels_last ? Layout::NHWC : Layout::NCHW;
  Tensor out = at::empty({N, C, H, W}, grad_avg.options().memory_format(memory_format(L)));
  if (out.numel() == 0) return out;
  Tensor ga = grad_avg.contiguous(), gm = grad_max.contiguous().to(ga.scalar_type()), arg = argmax.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ga.scalar_type(), "fastnas::channel_pool_backward", [&] {
    const scalar_t* gap = ga.const_data_ptr<scalar_t>();
    const scalar_t* gmp = gm.const_data_ptr<scalar_t>();
    const int32_t* ap = arg.const_data_ptr<int32_t>();
    if (L == Layout::NCHW) {
      channel_pool_bwd_nchw<scalar_t>(gap, gmp, ap, out.data_ptr<scalar_t>(), N * C, HW);
    } else {
      channel_pool_bwd_nhwc<scalar_t>(gap, gmp, ap, out.data_ptr<scalar_t>(), N, C, HW);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------ spatial_pool

std::tuple<Tensor, Tensor> spatial_pool(const Tensor& x_in) {
  check_spatial_pool(x_in);
  check_device_type("spatial_pool", "x", x_in, kDev);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), HW = H * W;
  check_index_range("spatial_pool", C);
  Tensor out = at::empty({N, 2, H, W}, x_in.options().memory_format(c10::MemoryFormat::ChannelsLast));
  Tensor arg = at::empty({N, H, W}, x_in.options().dtype(at::kInt));
  if (N * HW == 0) return {out, arg};
  const Layout L = prefers_channels_last(x_in) ? Layout::NHWC : Layout::NCHW;
  Tensor x = in_layout(x_in, L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::spatial_pool", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (L == Layout::NCHW) {
      spatial_pool_nchw<scalar_t>(xp, out.data_ptr<scalar_t>(), arg.data_ptr<int32_t>(), N, C, HW);
    } else {
      spatial_pool_nhwc<scalar_t>(xp, out.data_ptr<scalar_t>(), arg.data_ptr<int32_t>(), N * HW, C);
    }
  });
  return {out, arg};
}

Tensor spatial_pool_backward(const Tensor& grad_in, const Tensor& argmax, int64_t C, bool channels_last) {
  check_4d("spatial_pool", "grad", grad_in);
  check_device_type("spatial_pool", "grad", grad_in, kDev);
  const int64_t N = grad_in.size(0), H = grad_in.size(2), W = grad_in.size(3), HW = H * W;
  TORCH_CHECK_VALUE(grad_in.size(1) == 2 && argmax.dim() == 3 && argmax.size(0) == N && argmax.size(1) == H &&
                        argmax.size(2) == W,
                    "fastnas.spatial_pool: backward expects grad [N, 2, H, W] and argmax [N, H, W]");
  TORCH_CHECK_TYPE(argmax.scalar_type() == at::kInt, "fastnas.spatial_pool: backward expects an int32 argmax");
  const Layout L = channels_last ? Layout::NHWC : Layout::NCHW;
  Tensor out = at::empty({N, C, H, W}, grad_in.options().memory_format(memory_format(L)));
  if (out.numel() == 0) return out;
  const SpatialPoolGrad g = spatial_pool_grad_view(grad_in);
  Tensor arg = argmax.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.t.scalar_type(), "fastnas::spatial_pool_backward", [&] {
    const scalar_t* gp = g.t.const_data_ptr<scalar_t>();
    const int32_t* ap = arg.const_data_ptr<int32_t>();
    if (L == Layout::NCHW) {
      spatial_pool_bwd_nchw<scalar_t>(gp, g.s_n, g.s_c, g.s_hw, ap, out.data_ptr<scalar_t>(), N, C, HW);
    } else {
      spatial_pool_bwd_nhwc<scalar_t>(gp, g.s_n, g.s_c, g.s_hw, ap, out.data_ptr<scalar_t>(), N * HW, C, HW);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------ scales

enum class Gate { Channel, Spatial };

// The four (gate, layout) cases map onto two row kernels: a row of x is scaled either by one gate value (scalar) or
// element-wise by a row of gate values (vector).
struct RowPlan {
  bool scalar;        // scale_rows_by_scalar (else by_vector)
  int64_t rows, len;  // x viewed as [rows, len]
  int64_t group;      // by_vector: rows per gate row; by_scalar backward: unused
};

RowPlan plan(Gate gate, Layout L, int64_t N, int64_t C, int64_t HW) {
  if (gate == Gate::Channel) {
    return L == Layout::NCHW ? RowPlan{true, N * C, HW, 1} : RowPlan{false, N * HW, C, HW};
  }
  return L == Layout::NCHW ? RowPlan{false, N * C, HW, C} : RowPlan{true, N * HW, C, 1};
}

Tensor scale_forward(Gate gate, const Tensor& x_in, const Tensor& logits) {
  Output o = make_output(x_in);
  if (x_in.numel() == 0) return o.out;
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  Tensor x = in_layout(x_in, o.layout);
  Tensor l = as_acc(logits, x.scalar_type());
  const RowPlan p = plan(gate, o.layout, N, C, HW);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::scale", [&] {
    using A = at::opmath_type<scalar_t>;
    Tensor s = sigmoid_of<A>(l);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = o.buffer.data_ptr<scalar_t>();
    if (p.scalar) {
      scale_rows_by_scalar<scalar_t>(xp, s.const_data_ptr<A>(), op, p.rows, p.len);
    } else {
      scale_rows_by_vector<scalar_t>(xp, s.const_data_ptr<A>(), op, p.rows, p.len, p.group);
    }
  });
  o.finish();
  return o.out;
}

std::tuple<Tensor, Tensor> scale_backward(Gate gate, const char* op, const Tensor& grad, const Tensor& x_in,
                                          const Tensor& logits, bool need_x_grad) {
  check_grad(op, grad, x_in);
  Output o = make_output(grad);
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  Tensor gx = need_x_grad ? o.out : at::empty({0}, grad.options());
  Tensor l = as_acc(logits, x_in.scalar_type());
  Tensor d = at::zeros(l.sizes(), l.options());
  Tensor glog;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "fastnas::scale_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    Tensor s = sigmoid_of<A>(l);
    if (x_in.numel() > 0) {
      Tensor g = in_layout(grad, o.layout), x = in_layout(x_in, o.layout);
      const RowPlan p = plan(gate, o.layout, N, C, HW);
      scalar_t* gxp = need_x_grad ? o.buffer.data_ptr<scalar_t>() : nullptr;
      if (p.scalar) {
        scale_rows_by_scalar_bwd<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                           s.const_data_ptr<A>(), gxp, d.data_ptr<A>(), p.rows, p.len);
      } else {
        scale_rows_by_vector_bwd<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                           s.const_data_ptr<A>(), gxp, d.data_ptr<A>(), p.rows / p.group, p.group,
                                           p.len);
      }
      if (need_x_grad) o.finish();
    }
    glog = logits_grad<A>(s, d, logits);
  });
  return {gx, glog};
}

Tensor channel_scale(const Tensor& x, const Tensor& logits) {
  check_channel_scale(x, logits);
  check_device_type("channel_scale", "x", x, kDev);
  return scale_forward(Gate::Channel, x, logits);
}

std::tuple<Tensor, Tensor> channel_scale_backward(const Tensor& grad, const Tensor& x, const Tensor& logits,
                                                  bool need_x_grad) {
  check_channel_scale(x, logits);
  check_device_type("channel_scale", "x", x, kDev);
  return scale_backward(Gate::Channel, "channel_scale", grad, x, logits, need_x_grad);
}

Tensor spatial_scale(const Tensor& x, const Tensor& logits) {
  check_spatial_scale(x, logits);
  check_device_type("spatial_scale", "x", x, kDev);
  return scale_forward(Gate::Spatial, x, logits);
}

std::tuple<Tensor, Tensor> spatial_scale_backward(const Tensor& grad, const Tensor& x, const Tensor& logits,
                                                  bool need_x_grad) {
  check_spatial_scale(x, logits);
  check_device_type("spatial_scale", "x", x, kDev);
  return scale_backward(Gate::Spatial, "spatial_scale", grad, x, logits, need_x_grad);
}

// ------------------------------------------------------------------------------------------------ channel gate

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
  check_cpu_4d_float(op, "x", x);
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

// The whole channel gate (see channel_gate.h): (out, pooled [2N, C], hidden [2N, hid], logits [N, C], int32 argmax
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
  check_same_device(op, "argmax", argmax, "x", x_in);
  TORCH_CHECK_TYPE(argmax.scalar_type() == at::kInt, "fastnas.", op, ": argmax has dtype ",
                   dtype_name(argmax.scalar_type()), ", expected int32");
  TORCH_CHECK_VALUE(argmax.sizes().equals({N, C}), "fastnas.", op, ": argmax must have shape [", N, ", ", C,
                    "], got ", shape_str(argmax.sizes()));
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

// ------------------------------------------------------------------------------------------------ depthwise conv

// dW of a depthwise convolution (weight [C, 1, kh, kw]) from its output gradient and input, in x's dtype.
Tensor depthwise_conv2d_weight_grad(const Tensor& grad, const Tensor& x, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "depthwise_conv2d_weight_grad";
  check_cpu_4d_float(op, "x", x);
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
                              padding[0], padding[1], dilation[0], dilation[1]};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::depthwise_conv2d_weight_grad",
                                  [&] {
    depthwise_weight_grad<scalar_t>(xc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                                    out.data_ptr<scalar_t>(), geo);
  });
  return out;
}

// ------------------------------------------------------------------------------------------------ pool2d
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
  check_cpu_4d_float(op, "x", x);
  const PoolGeometry g = pool_geometry(op, x.size(0), x.size(1), x.size(2), x.size(3), kernel_size, stride, padding);
  Tensor out = pool_output(x, {g.N, g.C, g.Ho, g.Wo}, true, x.scalar_type());
  Tensor pos = pool_output(x, {g.N, g.C, g.Ho, g.Wo}, true, at::kByte);
  if (out.numel() > 0) {
    Tensor xc = x.contiguous(c10::MemoryFormat::ChannelsLast);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::max_pool2d", [&] {
      max_pool_fwd<scalar_t>(xc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), pos.data_ptr<uint8_t>(), g);
    });
  }
  return {prefers_channels_last(x) ? out : out.contiguous(), pos};
}

Tensor max_pool2d_backward(const Tensor& grad, const Tensor& argmax, int64_t H, int64_t W,
                           at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                           bool channels_last) {
  const char* op = "max_pool2d";
  check_cpu_4d_float(op, "grad", grad);
  const PoolGeometry g = pool_geometry(op, grad.size(0), grad.size(1), H, W, kernel_size, stride, padding);
  TORCH_CHECK_VALUE(grad.size(2) == g.Ho && grad.size(3) == g.Wo && argmax.sizes().equals(grad.sizes()), "fastnas.",
                    op, ": backward expects grad and argmax of shape [", g.N, ", ", g.C, ", ", g.Ho, ", ", g.Wo,
                    "], got ", shape_str(grad.sizes()), " and ", shape_str(argmax.sizes()));
  TORCH_CHECK_TYPE(argmax.scalar_type() == at::kByte, "fastnas.", op, ": backward expects a uint8 argmax, got ",
                   dtype_name(argmax.scalar_type()));
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
  check_cpu_4d_float(op, "x", x);
  const PoolGeometry g = pool_geometry(op, x.size(0), x.size(1), x.size(2), x.size(3), kernel_size, stride, padding);
  Tensor out = pool_output(x, {g.N, g.C, g.Ho, g.Wo}, true, x.scalar_type());
  if (out.numel() > 0) {
    Tensor xc = x.contiguous(c10::MemoryFormat::ChannelsLast);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::avg_pool2d", [&] {
      avg_pool_fwd<scalar_t>(xc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g);
    });
  }
  return prefers_channels_last(x) ? out : out.contiguous();
}

Tensor avg_pool2d_backward(const Tensor& grad, int64_t H, int64_t W, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, bool channels_last) {
  const char* op = "avg_pool2d";
  check_cpu_4d_float(op, "grad", grad);
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

// ------------------------------------------------------------------------------------------------ batch norm
// Training mode (affine-free or affine), computed on channels_last data; y keeps channels_last when x prefers it.

// running statistics, as nn.BatchNorm2d updates them (the unbiased variance); mean, var in the accumulation type
void update_running_stats(const Tensor& running_mean, const Tensor& running_var, const Tensor& mean, const Tensor& var,
                          double momentum, int64_t M) {
  const double unbias = double(M) / double(M - 1);
  const c10::ScalarType acc = mean.scalar_type();
  if (running_mean.scalar_type() == acc && running_var.scalar_type() == acc && running_mean.is_contiguous() &&
      running_var.is_contiguous()) {
    AT_DISPATCH_FLOATING_TYPES(acc, "fastnas::update_running_stats", [&] {
      scalar_t *rm = running_mean.data_ptr<scalar_t>(), *rv = running_var.data_ptr<scalar_t>();
      const scalar_t *mp = mean.const_data_ptr<scalar_t>(), *vp = var.const_data_ptr<scalar_t>();
      const scalar_t m = static_cast<scalar_t>(momentum), keep = static_cast<scalar_t>(1.0 - momentum);
      for (int64_t c = 0; c < mean.numel(); ++c) {
        rm[c] = keep * rm[c] + m * mp[c];
        rv[c] = keep * rv[c] + m * static_cast<scalar_t>(unbias) * vp[c];
      }
    });
  } else {
    Tensor rm = running_mean, rv = running_var;  // shallow handles: the updates land in the caller's tensors
    rm.mul_(1.0 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
    rv.mul_(1.0 - momentum).add_(var.to(running_var.scalar_type()), momentum * unbias);
  }
}

void check_running_stat(const char* op, const std::string& name, const Tensor& t, const Tensor& like, int64_t C) {
  check_float(op, name, t);
  check_same_device(op, name, t, "x", like);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, "fastnas.", op, ": ", name, " must have shape [", C, "], got ",
                    shape_str(t.sizes()));
}

// Training-mode batch norm of a channels_last copy of x: (y = weight (x - mean) invstd + bias, mean, invstd), the
// running statistics updated; weight and bias absent: the affine-free y = (x - mean) invstd.
std::tuple<Tensor, Tensor, Tensor> bn_train(const char* op, const Tensor& x, const c10::optional<Tensor>& weight,
                                            const c10::optional<Tensor>& bias, Tensor& running_mean,
                                            Tensor& running_var, double momentum, double eps) {
  check_cpu_4d_float(op, "x", x);
  const int64_t C = x.size(1), M = x.numel() / std::max<int64_t>(1, C);
  TORCH_CHECK_VALUE(M > 1, "fastnas.", op, ": training needs more than one value per channel, got input of shape ",
                    shape_str(x.sizes()));
  check_running_stat(op, "running_mean", running_mean, x, C);
  check_running_stat(op, "running_var", running_var, x, C);
  const c10::ScalarType acc = acc_dtype(x.scalar_type());
  Tensor w, b;
  if (weight) {
    check_running_stat(op, "weight", *weight, x, C);
    check_running_stat(op, "bias", *bias, x, C);
    w = weight->to(acc).contiguous();
    b = bias->to(acc).contiguous();
  }
  Tensor mean = at::empty({C}, x.options().dtype(acc)), var = at::empty({C}, x.options().dtype(acc));
  Tensor invstd = at::empty({C}, x.options().dtype(acc));
  Tensor xc = x.contiguous(c10::MemoryFormat::ChannelsLast);
  Tensor y = at::empty_like(xc, c10::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::batch_norm_train", [&] {
    using A = at::opmath_type<scalar_t>;
    A* mp = mean.data_ptr<A>();
    A* vp = var.data_ptr<A>();
    A* ip = invstd.data_ptr<A>();
    bn_stats<scalar_t>(xc.const_data_ptr<scalar_t>(), M, C, mp, vp);
    std::vector<A> scale(C), shift(C);  // y = scale (x - mean) + shift
    for (int64_t c = 0; c < C; ++c) {
      ip[c] = A(1) / std::sqrt(vp[c] + static_cast<A>(eps));
      scale[c] = weight ? w.const_data_ptr<A>()[c] * ip[c] : ip[c];
      shift[c] = weight ? b.const_data_ptr<A>()[c] : A(0);
    }
    per_channel_weighted_sum<scalar_t>({xc.const_data_ptr<scalar_t>()}, scale.data(), shift.data(),
                                       y.data_ptr<scalar_t>(), M, C, mp);
  });
  update_running_stats(running_mean, running_var, mean, var, momentum, M);
  return {prefers_channels_last(x) ? y : y.contiguous(), mean, invstd};
}

std::tuple<Tensor, Tensor> batch_norm_train(const Tensor& x, Tensor& running_mean, Tensor& running_var,
                                            double momentum, double eps) {
  auto [y, mean, invstd] = bn_train("batch_norm_train", x, c10::nullopt, c10::nullopt, running_mean, running_var,
                                    momentum, eps);
  return {y, invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_affine_train(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                           Tensor& running_mean, Tensor& running_var, double momentum,
                                                           double eps) {
  return bn_train("batch_norm_affine_train", x, weight, bias, running_mean, running_var, momentum, eps);
}

// The affine batch norm's gradients (grad x (an empty tensor unless need_x_grad), grad weight, grad bias) from its
// input x and the saved mean and invstd: with S_g = sum g and S = sum g (x - mean) invstd (= grad weight) per
// channel, grad x = weight invstd (g - S_g / M - (x - mean) invstd S / M), per-channel affine in (g, x).
std::tuple<Tensor, Tensor, Tensor> batch_norm_affine_backward(const Tensor& grad, const Tensor& x,
                                                              const Tensor& weight, const Tensor& mean,
                                                              const Tensor& invstd, bool need_x_grad) {
  const char* op = "batch_norm_affine_backward";
  check_cpu_4d_float(op, "x", x);
  check_grad(op, grad, x);
  const int64_t C = x.size(1), M = x.numel() / std::max<int64_t>(1, C);
  const c10::ScalarType acc = acc_dtype(x.scalar_type());
  check_running_stat(op, "weight", weight, x, C);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"mean", mean}, {"invstd", invstd}}) {
    check_running_stat(op, name, t, x, C);
    TORCH_CHECK_TYPE(t.scalar_type() == acc, "fastnas.", op, ": ", name, " has dtype ", dtype_name(t.scalar_type()),
                     ", expected ", dtype_name(acc));
  }
  Tensor gx = at::empty({0}, x.options());
  Tensor gw = at::zeros({C}, x.options().dtype(acc)), gb = at::zeros({C}, x.options().dtype(acc));
  if (M > 0) {
    Tensor gc = grad.contiguous(c10::MemoryFormat::ChannelsLast), xc = x.contiguous(c10::MemoryFormat::ChannelsLast);
    Tensor w = weight.to(acc).contiguous(), mu = mean.contiguous(), is = invstd.contiguous();
    if (need_x_grad) gx = at::empty_like(xc, c10::MemoryFormat::ChannelsLast);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::batch_norm_affine_backward",
                                    [&] {
      using A = at::opmath_type<scalar_t>;
      const scalar_t* gp = gc.const_data_ptr<scalar_t>();
      const scalar_t* xp = xc.const_data_ptr<scalar_t>();
      const A *wp = w.const_data_ptr<A>(), *mp = mu.const_data_ptr<A>(), *ip = is.const_data_ptr<A>();
      const std::vector<A> sums = grad_dot_sums<scalar_t>(gp, {xp}, M, C, mp);  // sum g, sum g (x - mean)
      A *gwp = gw.data_ptr<A>(), *gbp = gb.data_ptr<A>();
      std::vector<A> a(C), b(C), shift(C);  // grad x = a g + b (x - mean) + shift
      for (int64_t c = 0; c < C; ++c) {
        gbp[c] = sums[c];
        gwp[c] = sums[C + c] * ip[c];
        a[c] = wp[c] * ip[c];
        b[c] = -a[c] * ip[c] * gwp[c] / static_cast<A>(M);
        shift[c] = -a[c] * sums[c] / static_cast<A>(M);
      }
      if (need_x_grad) {
        per_channel_affine_grad<scalar_t>(gp, xp, a.data(), b.data(), shift.data(), gx.data_ptr<scalar_t>(), M, C,
                                          mp);
      }
    });
    if (need_x_grad && !prefers_channels_last(x)) gx = gx.contiguous();
  }
  return {gx, gw.to(weight.scalar_type()), gb.to(weight.scalar_type())};
}

// the input gradient of batch_norm_train from its output y and invstd
Tensor batch_norm_backward(const Tensor& grad, const Tensor& y, const Tensor& invstd) {
  const char* op = "batch_norm_backward";
  check_cpu_4d_float(op, "y", y);
  check_grad(op, grad, y);
  const int64_t C = y.size(1), M = y.numel() / std::max<int64_t>(1, C);
  const c10::ScalarType acc = acc_dtype(y.scalar_type());
  check_same_device(op, "invstd", invstd, "y", y);
  TORCH_CHECK_TYPE(invstd.scalar_type() == acc, "fastnas.", op, ": invstd has dtype ",
                   dtype_name(invstd.scalar_type()), ", expected ", dtype_name(acc));
  TORCH_CHECK_VALUE(invstd.dim() == 1 && invstd.size(0) == C, "fastnas.", op, ": invstd must have shape [", C,
                    "], got ", shape_str(invstd.sizes()));
  Tensor gc = grad.contiguous(c10::MemoryFormat::ChannelsLast), yc = y.contiguous(c10::MemoryFormat::ChannelsLast);
  Tensor gx = at::empty_like(yc, c10::MemoryFormat::ChannelsLast);
  if (M > 0) {
    Tensor is = invstd.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "fastnas::batch_norm_backward", [&] {
      using A = at::opmath_type<scalar_t>;
      // gx = invstd (g - mean(g) - y mean(g y)): per-channel affine in (g, y)
      const scalar_t* gp = gc.const_data_ptr<scalar_t>();
      const scalar_t* yp = yc.const_data_ptr<scalar_t>();
      const std::vector<A> sums = grad_dot_sums<scalar_t>(gp, {yp}, M, C);
      const A* ip = is.const_data_ptr<A>();
      std::vector<A> a(ip, ip + C), b(C), shift(C);
      for (int64_t c = 0; c < C; ++c) {
        b[c] = -ip[c] * sums[C + c] / static_cast<A>(M);
        shift[c] = -ip[c] * sums[c] / static_cast<A>(M);
      }
      per_channel_affine_grad<scalar_t>(gp, yp, a.data(), b.data(), shift.data(), gx.data_ptr<scalar_t>(), M, C);
    });
  }
  return prefers_channels_last(y) ? gx : gx.contiguous();
}

// ------------------------------------------------------------------------------------------------ normalized sum
// A node sum whose first num_normalized inputs pass through affine-free training-mode batch norms (batch_norm.h's
// kernels): the normalised inputs are never written.

std::tuple<Tensor, Tensor, Tensor> normalized_mixed_sum(at::TensorList zs, const Tensor& weights,
                                                        int64_t num_normalized, at::TensorList running_means,
                                                        at::TensorList running_vars, double momentum, double eps) {
  const char* op = "normalized_mixed_sum";
  check_mixed_sum(zs, weights);
  check_device_type(op, "zs[0]", zs[0], kDev);
  check_4d(op, "zs[0]", zs[0]);
  const int64_t K = static_cast<int64_t>(zs.size()), Kn = num_normalized;
  TORCH_CHECK_VALUE(0 <= Kn && Kn <= K, "fastnas.", op, ": num_normalized must be in [0, ", K, "], got ", Kn);
  TORCH_CHECK_VALUE(static_cast<int64_t>(running_means.size()) == Kn && static_cast<int64_t>(running_vars.size()) == Kn,
                    "fastnas.", op, ": expected ", Kn, " running_means and running_vars, got ", running_means.size(),
                    " and ", running_vars.size());
  const Tensor& z0 = zs[0];
  const int64_t C = z0.size(1), M = z0.numel() / std::max<int64_t>(1, C);
  TORCH_CHECK_VALUE(Kn == 0 || M > 1, "fastnas.", op,
                    ": batch norm in training needs more than one value per channel, got inputs of shape ",
                    shape_str(z0.sizes()));
  for (int64_t k = 0; k < Kn; ++k) {
    check_running_stat(op, "running_means[" + std::to_string(k) + "]", running_means[k], z0, C);
    check_running_stat(op, "running_vars[" + std::to_string(k) + "]", running_vars[k], z0, C);
  }
  const c10::ScalarType acc = acc_dtype(z0.scalar_type());
  Tensor means = at::empty({Kn, C}, z0.options().dtype(acc)), vars = at::empty({Kn, C}, z0.options().dtype(acc));
  Tensor invstds = at::empty({Kn, C}, z0.options().dtype(acc));
  std::vector<Tensor> zc;
  for (const Tensor& z : zs) zc.push_back(z.contiguous(c10::MemoryFormat::ChannelsLast));
  Tensor out = at::empty_like(zc[0], c10::MemoryFormat::ChannelsLast);
  Tensor w = as_acc(weights, z0.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z0.scalar_type(), "fastnas::normalized_mixed_sum", [&] {
    using A = at::opmath_type<scalar_t>;
    const A* wp = w.const_data_ptr<A>();
    // out = sum_k<Kn w_k invstd_k (z_k - mean_k) + sum_k>=Kn w_k z_k: the normalised inputs about their means
    std::vector<A> coef(K * C), bias(C, A(0)), shift(K * C, A(0));
    for (int64_t k = 0; k < K; ++k) {
      if (k < Kn) {
        A* mp = means.data_ptr<A>() + k * C;
        A* vp = vars.data_ptr<A>() + k * C;
        A* ip = invstds.data_ptr<A>() + k * C;
        bn_stats<scalar_t>(zc[k].const_data_ptr<scalar_t>(), M, C, mp, vp);
        for (int64_t c = 0; c < C; ++c) {
          ip[c] = A(1) / std::sqrt(vp[c] + static_cast<A>(eps));
          coef[k * C + c] = wp[k] * ip[c];
          shift[k * C + c] = mp[c];
        }
      } else {
        for (int64_t c = 0; c < C; ++c) coef[k * C + c] = wp[k];
      }
    }
    std::vector<const scalar_t*> ptrs;
    for (const Tensor& z : zc) ptrs.push_back(z.const_data_ptr<scalar_t>());
    if (M > 0) {
      per_channel_weighted_sum<scalar_t>(ptrs, coef.data(), bias.data(), out.data_ptr<scalar_t>(), M, C,
                                         Kn > 0 ? shift.data() : nullptr);
    }
  });
  for (int64_t k = 0; k < Kn; ++k)
    update_running_stats(running_means[k], running_vars[k], means[k], vars[k], momentum, M);
  return {prefers_channels_last(z0) ? out : out.contiguous(), means, invstds};
}

// (grad of every zs[k] (empty unless need_zs_grad), grad of weights (empty unless need_weights_grad)); zs holds every
// input when the weights need a gradient, else at least the normalised ones
std::tuple<std::vector<Tensor>, Tensor> normalized_mixed_sum_backward(const Tensor& grad, at::TensorList zs,
                                                                      const Tensor& weights, const Tensor& means,
                                                                      const Tensor& invstds, bool need_zs_grad,
                                                                      bool need_weights_grad) {
  const char* op = "normalized_mixed_sum";
  check_cpu_4d_float(op, "grad", grad);
  const int64_t K = weights.numel(), Kn = means.size(0);
  const int64_t C = grad.size(1), M = grad.numel() / std::max<int64_t>(1, C);
  TORCH_CHECK_VALUE(means.dim() == 2 && means.size(1) == C && invstds.sizes().equals(means.sizes()) && Kn <= K,
                    "fastnas.", op, ": backward expects means and invstds of one shape [num_normalized, ", C, "], got ",
                    shape_str(means.sizes()), " and ", shape_str(invstds.sizes()));
  const int64_t used = need_weights_grad ? K : Kn;
  TORCH_CHECK_VALUE(static_cast<int64_t>(zs.size()) >= used, "fastnas.", op, ": backward expects ", used,
                    " inputs, got ", zs.size());
  for (int64_t k = 0; k < used; ++k) check_grad(op, grad, zs[k]);
  const c10::ScalarType acc = acc_dtype(grad.scalar_type());
  Tensor gw = at::zeros({need_weights_grad ? K : 0}, grad.options().dtype(acc));
  std::vector<Tensor> gzs;
  if (M == 0 || (!need_zs_grad && !need_weights_grad)) {
    if (need_zs_grad)
      for (int64_t k = 0; k < K; ++k) gzs.push_back(at::zeros_like(grad));
    return {gzs, gw};
  }
  Tensor gc = grad.contiguous(c10::MemoryFormat::ChannelsLast);
  std::vector<Tensor> zc;
  for (int64_t k = 0; k < used; ++k) zc.push_back(zs[k].contiguous(c10::MemoryFormat::ChannelsLast));
  Tensor w = as_acc(weights, grad.scalar_type());
  Tensor mc = means.to(acc).contiguous(), ic = invstds.to(acc).contiguous();
  const bool cl = prefers_channels_last(grad) || (zs.size() > 0 && prefers_channels_last(zs[0]));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(),
                                  "fastnas::normalized_mixed_sum_backward",
                                  [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> ptrs;
    for (const Tensor& z : zc) ptrs.push_back(z.const_data_ptr<scalar_t>());
    // the normalised inputs' sums about their means (the others' shifts 0)
    std::vector<A> shift(used * C, A(0));
    std::copy(mc.const_data_ptr<A>(), mc.const_data_ptr<A>() + Kn * C, shift.begin());
    const std::vector<A> sums = grad_dot_sums<scalar_t>(gc.const_data_ptr<scalar_t>(), ptrs, M, C, shift.data());
    const A* sg = sums.data();
    const A* wp = w.const_data_ptr<A>();
    const A inv_m = A(1) / static_cast<A>(M);
    std::vector<A> a(C), b(C), cc(C);
    for (int64_t k = 0; k < K; ++k) {
      const A* t = k < used ? sums.data() + (k + 1) * C : nullptr;
      if (k < Kn) {
        const A* mu = mc.const_data_ptr<A>() + k * C;
        const A* is = ic.const_data_ptr<A>() + k * C;
        A dot = 0;
        for (int64_t c = 0; c < C; ++c) {
          const A sgy = is[c] * t[c];  // sum over rows of g * y_k
          dot += sgy;
          a[c] = wp[k] * is[c];
          b[c] = -wp[k] * is[c] * is[c] * sgy * inv_m;
          cc[c] = -a[c] * sg[c] * inv_m;
        }
        if (need_weights_grad) gw.data_ptr<A>()[k] = dot;
        if (need_zs_grad) {  // gz = a g + b (z - mean) + cc
          Tensor gz = at::empty_like(gc, c10::MemoryFormat::ChannelsLast);
          per_channel_affine_grad<scalar_t>(gc.const_data_ptr<scalar_t>(), ptrs[k], a.data(), b.data(), cc.data(),
                                            gz.data_ptr<scalar_t>(), M, C, mu);
          gzs.push_back(cl ? gz : gz.contiguous());
        }
      } else {
        if (need_weights_grad) {
          A dot = 0;
          for (int64_t c = 0; c < C; ++c) dot += t[c];
          gw.data_ptr<A>()[k] = dot;
        }
        if (need_zs_grad) {
          Tensor gz = gc.mul(static_cast<double>(wp[k]));
          gzs.push_back(cl ? gz : gz.contiguous());
        }
      }
    }
  });
  return {gzs, gw};
}

// ------------------------------------------------------------------------------------------------ single-channel conv
// A stride-1 convolution of x [N, C, H, W] to one channel (weight [1, C, kh, kw], zero padding p < k, no bias): the
// convolution of a CBAM spatial gate.

SingleConvGeometry single_conv_geometry(const char* op, const Tensor& x, const Tensor& weight,
                                        at::IntArrayRef padding) {
  check_cpu_4d_float(op, "x", x);
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

// the CPU kernels of this capability
void register_impls(torch::Library& m) {
  m.impl("mixed_sum", &mixed_sum);
  m.impl("mixed_sum_backward", &mixed_sum_backward);
  m.impl("mixed_sum_backward_xs", &mixed_sum_backward_xs);
  m.impl("channel_pool", &channel_pool);
  m.impl("channel_pool_backward", &channel_pool_backward);
  m.impl("spatial_pool", &spatial_pool);
  m.impl("spatial_pool_backward", &spatial_pool_backward);
  m.impl("channel_scale", &channel_scale);
  m.impl("channel_scale_backward", &channel_scale_backward);
  m.impl("spatial_scale", &spatial_scale);
  m.impl("spatial_scale_backward", &spatial_scale_backward);
  m.impl("channel_gate", &channel_gate);
  m.impl("channel_gate_backward", &channel_gate_backward);
  m.impl("depthwise_conv2d_weight_grad", &depthwise_conv2d_weight_grad);
  m.impl("batch_norm_train", &batch_norm_train);
  m.impl("batch_norm_affine_train", &batch_norm_affine_train);
  m.impl("batch_norm_affine_backward", &batch_norm_affine_backward);
  m.impl("normalized_mixed_sum", &normalized_mixed_sum);
  m.impl("normalized_mixed_sum_backward", &normalized_mixed_sum_backward);
  m.impl("batch_norm_backward", &batch_norm_backward);
  m.impl("single_channel_conv2d", &single_channel_conv2d);
  m.impl("single_channel_conv2d_backward", &single_channel_conv2d_backward);
  m.impl("max_pool2d", &max_pool2d);
  m.impl("max_pool2d_backward", &max_pool2d_backward);
  m.impl("avg_pool2d", &avg_pool2d);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward);
}

}  // namespace CPU_CAPABILITY

}  // namespace fastnas::cpu
