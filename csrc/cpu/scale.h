// channel_scale and spatial_scale: x times the sigmoid of per-channel or per-position gate logits, and their
// backward ops. The row kernels are shared with the channel gate.
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

// One row: o[i] = x[i] * s (+ shift when given).
template <typename T>
C10_ALWAYS_INLINE void scale_row_by_scalar(const T* x, at::opmath_type<T> s, T* o, int64_t len,
                                           const at::opmath_type<T>* shift) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  const V vs(s);
  int64_t i = 0;
  if (shift) {
    const A a = *shift;
    const V va(a);
    for (; i + W <= len; i += W) VT::store(o + i, at::vec::fmadd(VT::load(x + i), vs, va));
    for (; i < len; ++i) o[i] = T(A(x[i]) * s + a);
  } else {
    for (; i + W <= len; i += W) VT::store(o + i, VT::load(x + i) * vs);
    for (; i < len; ++i) o[i] = T(A(x[i]) * s);
  }
}

// One row: o[i] = x[i] * s[i] (+ shift[i] when given).
template <typename T>
C10_ALWAYS_INLINE void scale_row_by_vector(const T* x, const at::opmath_type<T>* s, T* o, int64_t len,
                                           const at::opmath_type<T>* shift) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  int64_t i = 0;
  if (shift) {
    for (; i + W <= len; i += W)
      VT::store(o + i, at::vec::fmadd(VT::load(x + i), V::loadu(s + i), V::loadu(shift + i)));
    for (; i < len; ++i) o[i] = T(A(x[i]) * s[i] + shift[i]);
  } else {
    for (; i + W <= len; i += W) VT::store(o + i, VT::load(x + i) * V::loadu(s + i));
    for (; i < len; ++i) o[i] = T(A(x[i]) * s[i]);
  }
}

// Backward of one scale_row_by_scalar row: gx[i] = g[i] * s (if gx); returns sum_i g[i] * x[i].
template <typename T>
C10_ALWAYS_INLINE at::opmath_type<T> scale_row_by_scalar_bwd(const T* g, const T* x, at::opmath_type<T> s, T* gx,
                                                             int64_t len) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  const V vs(s);
  V acc(A(0));
  A tail = 0;
  int64_t i = 0;
  if (gx) {
    for (; i + W <= len; i += W) {
      V gv = VT::load(g + i);
      VT::store(gx + i, gv * vs);
      acc = at::vec::fmadd(gv, VT::load(x + i), acc);
    }
    for (; i < len; ++i) {
      A gi = A(g[i]);
      gx[i] = T(gi * s);
      tail += gi * A(x[i]);
    }
  } else {
    for (; i + W <= len; i += W) acc = at::vec::fmadd(VT::load(g + i), VT::load(x + i), acc);
    for (; i < len; ++i) tail += A(g[i]) * A(x[i]);
  }
  return hsum(acc) + tail;
}

// Backward of one scale_row_by_vector row: gx[i] = g[i] * s[i] (if gx), d[i] += g[i] * x[i].
template <typename T>
C10_ALWAYS_INLINE void scale_row_by_vector_bwd(const T* g, const T* x, const at::opmath_type<T>* s, T* gx,
                                               at::opmath_type<T>* d, int64_t len) {
  using VT = VecT<T>;
  using A = typename VT::A;
  using V = typename VT::V;
  constexpr int64_t W = VT::W;
  int64_t i = 0;
  if (gx) {
    for (; i + W <= len; i += W) {
      V gv = VT::load(g + i);
      VT::store(gx + i, gv * V::loadu(s + i));
      at::vec::fmadd(gv, VT::load(x + i), V::loadu(d + i)).store(d + i);
    }
    for (; i < len; ++i) {
      A gi = A(g[i]);
      gx[i] = T(gi * s[i]);
      d[i] += gi * A(x[i]);
    }
  } else {
    for (; i + W <= len; i += W) at::vec::fmadd(VT::load(g + i), VT::load(x + i), V::loadu(d + i)).store(d + i);
    for (; i < len; ++i) d[i] += A(g[i]) * A(x[i]);
  }
}

// Row-wise product: out[r, :] = x[r, :] * s[r] (+ shift[r] when shift is given) (channel_scale NCHW) for rows of
// length len.
template <typename T>
void scale_rows_by_scalar(const T* x, const at::opmath_type<T>* s, T* out, int64_t rows, int64_t len,
                          const at::opmath_type<T>* shift = nullptr) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(len, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      scale_row_by_scalar<T>(x + r * len, s[r], out + r * len, len, shift ? shift + r : nullptr);
    }
  });
}

// Row-wise product with a vector: out[r, :] = x[r, :] * s[(r / group) % ngroups, :] (+ the same row of shift when
// given) for rows of length len.
// channel_scale NHWC: rows = N*HW, group = HW, s [N, C]; spatial_scale NCHW: rows = N*C, group = C, s [N, HW].
template <typename T>
void scale_rows_by_vector(const T* x, const at::opmath_type<T>* s, T* out, int64_t rows, int64_t len, int64_t group,
                          const at::opmath_type<T>* shift = nullptr) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(len, 1)), [&](int64_t b, int64_t e) {
    int64_t grp = b / group, left = group - b % group;  // the row's group, and its rows from here on
    for (int64_t r = b; r < e; ++r) {
      const int64_t off = grp * len;
      scale_row_by_vector<T>(x + r * len, s + off, out + r * len, len, shift ? shift + off : nullptr);
      if (--left == 0) {
        ++grp;
        left = group;
      }
    }
  });
}

// Backward of scale_rows_by_scalar: gx[r, :] = g[r, :] * s[r] (if gx), d[r] = sum_i g[r, i] * x[r, i].
template <typename T>
void scale_rows_by_scalar_bwd(const T* g, const T* x, const at::opmath_type<T>* s, T* gx, at::opmath_type<T>* d,
                              int64_t rows, int64_t len) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(len, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      d[r] = scale_row_by_scalar_bwd<T>(g + r * len, x + r * len, s[r], gx ? gx + r * len : nullptr, len);
    }
  });
}

// Backward of scale_rows_by_vector, reducing over the rows of each group:
// gx[r, :] = g[r, :] * s[grp, :] (if gx), d[grp, :] = sum over the rows r of group grp of g[r, :] * x[r, :].
// One task per group: its rows are summed in order.
template <typename T>
void scale_rows_by_vector_bwd(const T* g, const T* x, const at::opmath_type<T>* s, T* gx, at::opmath_type<T>* d,
                              int64_t groups, int64_t group, int64_t len) {
  using A = at::opmath_type<T>;
  at::parallel_for(0, groups, std::max<int64_t>(1, kGrain / std::max<int64_t>(len * group, 1)), [&](int64_t b,
                                                                                                    int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      A* dn = d + n * len;
      std::fill(dn, dn + len, A(0));
      for (int64_t j = 0; j < group; ++j) {
        const int64_t r = n * group + j;
        scale_row_by_vector_bwd<T>(g + r * len, x + r * len, s + n * len, gx ? gx + r * len : nullptr, dn, len);
      }
    }
  });
}

namespace {

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
  check_device_type("channel_scale", "x", x, at::kCPU);
  return scale_forward(Gate::Channel, x, logits);
}

std::tuple<Tensor, Tensor> channel_scale_backward(const Tensor& grad, const Tensor& x, const Tensor& logits,
                                                  bool need_x_grad) {
  check_channel_scale(x, logits);
  check_device_type("channel_scale", "x", x, at::kCPU);
  return scale_backward(Gate::Channel, "channel_scale", grad, x, logits, need_x_grad);
}

Tensor spatial_scale(const Tensor& x, const Tensor& logits) {
  check_spatial_scale(x, logits);
  check_device_type("spatial_scale", "x", x, at::kCPU);
  return scale_forward(Gate::Spatial, x, logits);
}

std::tuple<Tensor, Tensor> spatial_scale_backward(const Tensor& grad, const Tensor& x, const Tensor& logits,
                                                  bool need_x_grad) {
  check_spatial_scale(x, logits);
  check_device_type("spatial_scale", "x", x, at::kCPU);
  return scale_backward(Gate::Spatial, "spatial_scale", grad, x, logits, need_x_grad);
}

}  // namespace

// the CPU kernels of scale
inline void register_scale(torch::Library& m) {
  m.impl("channel_scale", &channel_scale);
  m.impl("channel_scale_backward", &channel_scale_backward);
  m.impl("spatial_scale", &spatial_scale);
  m.impl("spatial_scale_backward", &spatial_scale_backward);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
