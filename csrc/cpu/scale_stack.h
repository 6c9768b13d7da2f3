// scale_stack: one input x [N, C, H, W] scaled by U gates at once (fastnas/ops/defs/scale_stack.py): output unit u
// (channels [u C, u C + C)) is x times the sigmoid of gate u's logits, per channel (logits [N, U C]) or per position
// (logits [N, U, H, W]). The attention candidates of every stride-1 edge leaving a search-cell state are such a stack:
// x read once, no copy of it per edge, and one backward that sums the input gradient over the gates.
//
// Channels_last data (other layouts are made so first); the row kernels are scale.h's.
//
// Compiled once per CPU capability (cpu_ops.h), in a namespace named after it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common.h"
#include "scale.h"
#include "vec.h"

namespace fastnas::cpu {
inline namespace CPU_CAPABILITY {

struct StackGates {
  int64_t N, C, HW, U;
  bool channel;  // per-channel logits [N, U C] (else per-position [N, U, HW])
};

// out [N HW, U C] from x [N HW, C]: s the sigmoids ([N, U C] or [N, U, HW])
template <typename T>
void scale_stack_forward(const T* x, const at::opmath_type<T>* s, T* out, const StackGates& g) {
  const int64_t UC = g.U * g.C;
  at::parallel_for(0, g.N * g.HW, std::max<int64_t>(1, kGrain / std::max<int64_t>(UC, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / g.HW, hw = r % g.HW;
      for (int64_t u = 0; u < g.U; ++u) {
        if (g.channel) {
          scale_row_by_vector<T>(x + r * g.C, s + n * UC + u * g.C, out + r * UC + u * g.C, g.C, nullptr);
        } else {
          scale_row_by_scalar<T>(x + r * g.C, s[(n * g.U + u) * g.HW + hw], out + r * UC + u * g.C, g.C, nullptr);
        }
      }
    }
  });
}

// gx [N HW, C] = sum over u of grad [N HW, U C] times the sigmoids (if gx); d (zeros, like s) += the sums of
// grad times x that the logits' gradient scales: over the positions (channel gates, one task per image, in order)
// or over the channels (spatial gates)
template <typename T>
void scale_stack_backward_rows(const T* grad, const T* x, const at::opmath_type<T>* s, T* gx, at::opmath_type<T>* d,
                               const StackGates& g) {
  using A = at::opmath_type<T>;
  const int64_t UC = g.U * g.C;
  auto input_grad = [&](int64_t r, std::vector<A>& acc) {
    const int64_t n = r / g.HW, hw = r % g.HW;
    std::fill(acc.begin(), acc.end(), A(0));
    for (int64_t u = 0; u < g.U; ++u) {
      const T* gr = grad + r * UC + u * g.C;
      for (int64_t c = 0; c < g.C; ++c)
        acc[c] += static_cast<A>(gr[c]) * (g.channel ? s[n * UC + u * g.C + c] : s[(n * g.U + u) * g.HW + hw]);
    }
    for (int64_t c = 0; c < g.C; ++c) gx[r * g.C + c] = static_cast<T>(acc[c]);
  };
  if (g.channel) {
    at::parallel_for(0, g.N, 1, [&](int64_t b, int64_t e) {
      std::vector<A> acc(g.C);
      for (int64_t n = b; n < e; ++n)
        for (int64_t hw = 0; hw < g.HW; ++hw) {
          const int64_t r = n * g.HW + hw;
          for (int64_t u = 0; u < g.U; ++u) {
            const T* gr = grad + r * UC + u * g.C;
            A* dn = d + n * UC + u * g.C;
            for (int64_t c = 0; c < g.C; ++c) dn[c] += static_cast<A>(gr[c]) * static_cast<A>(x[r * g.C + c]);
          }
          if (gx) input_grad(r, acc);
        }
    });
    return;
  }
  at::parallel_for(0, g.N * g.HW, std::max<int64_t>(1, kGrain / std::max<int64_t>(UC, 1)), [&](int64_t b, int64_t e) {
    std::vector<A> acc(g.C);
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / g.HW, hw = r % g.HW;
      for (int64_t u = 0; u < g.U; ++u) {
        const T* gr = grad + r * UC + u * g.C;
        A sum = 0;
        for (int64_t c = 0; c < g.C; ++c) sum += static_cast<A>(gr[c]) * static_cast<A>(x[r * g.C + c]);
        d[(n * g.U + u) * g.HW + hw] = sum;
      }
      if (gx) input_grad(r, acc);
    }
  });
}

namespace {

StackGates stack_gates(const char* op, const Tensor& x, const Tensor& logits) {
  check_4d_on(op, "x", x, at::kCPU);
  check_float(op, "logits", logits);
  check_same_device(op, "logits", logits, "x", x);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const bool channel = logits.dim() == 2;
  TORCH_CHECK_VALUE((channel && logits.size(0) == N && C > 0 && logits.size(1) % C == 0 && logits.size(1) > 0) ||
                        (logits.dim() == 4 && logits.size(0) == N && logits.size(1) > 0 &&
                         logits.size(2) == x.size(2) && logits.size(3) == x.size(3)),
                    "fastnas.", op, ": logits must have shape [N, U*C] (channel gates) or [N, U, H, W] (spatial "
                    "gates) for x of shape ", shape_str(x.sizes()), ", got ", shape_str(logits.sizes()));
  return {N, C, HW, channel ? logits.size(1) / C : logits.size(1), channel};
}

Tensor stacked_output(const Tensor& x, const StackGates& g) {
  return at::empty({g.N, g.U * g.C, x.size(2), x.size(3)},
                   x.options().memory_format(c10::MemoryFormat::ChannelsLast));
}

Tensor scale_stack(const Tensor& x_in, const Tensor& logits) {
  const StackGates g = stack_gates("scale_stack", x_in, logits);
  Tensor out = stacked_output(x_in, g);
  if (out.numel() == 0) return in_rule_layout(out, x_in);
  const Tensor x = in_layout(x_in, Layout::NHWC);
  const Tensor l = as_acc(logits, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastnas::scale_stack", [&] {
    using A = at::opmath_type<scalar_t>;
    const Tensor s = sigmoid_of<A>(l);
    scale_stack_forward<scalar_t>(x.const_data_ptr<scalar_t>(), s.const_data_ptr<A>(), out.data_ptr<scalar_t>(), g);
  });
  return in_rule_layout(out, x_in);
}

std::tuple<Tensor, Tensor> scale_stack_backward(const Tensor& grad, const Tensor& x_in, const Tensor& logits,
                                                bool need_x_grad) {
  const char* op = "scale_stack_backward";
  const StackGates g = stack_gates(op, x_in, logits);
  check_float(op, "grad", grad);
  check_same_device(op, "grad", grad, "x", x_in);
  TORCH_CHECK_TYPE(grad.scalar_type() == x_in.scalar_type(), "fastnas.", op, ": grad has dtype ",
                   dtype_name(grad.scalar_type()), ", expected the dtype of x (", dtype_name(x_in.scalar_type()), ")");
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == g.N && grad.size(1) == g.U * g.C &&
                        grad.size(2) == x_in.size(2) && grad.size(3) == x_in.size(3),
                    "fastnas.", op, ": grad must have shape [", g.N, ", ", g.U * g.C, ", ", x_in.size(2), ", ",
                    x_in.size(3), "], got ", shape_str(grad.sizes()));
  const Tensor l = as_acc(logits, x_in.scalar_type());
  Tensor d = at::zeros(l.sizes(), l.options());
  Tensor gx = at::empty({0}, x_in.options()), glog;
  Tensor buf = need_x_grad ? at::empty(x_in.sizes(), x_in.options().memory_format(c10::MemoryFormat::ChannelsLast))
                           : gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "fastnas::scale_stack_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    const Tensor s = sigmoid_of<A>(l);
    if (x_in.numel() > 0) {
      const Tensor gc = in_layout(grad, Layout::NHWC), x = in_layout(x_in, Layout::NHWC);
      scale_stack_backward_rows<scalar_t>(gc.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                          s.const_data_ptr<A>(), need_x_grad ? buf.data_ptr<scalar_t>() : nullptr,
                                          d.data_ptr<A>(), g);
    }
    glog = logits_grad<A>(s, d, logits);
  });
  if (need_x_grad) gx = with_strides_of(buf, at::empty_like(x_in));
  return {gx, glog};
}

}  // namespace

// the CPU kernels of scale_stack
inline void register_scale_stack(torch::Library& m) {
  m.impl("scale_stack", &scale_stack);
  m.impl("scale_stack_backward", &scale_stack_backward);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
