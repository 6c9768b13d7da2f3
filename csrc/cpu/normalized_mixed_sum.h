// normalized_mixed_sum: a node sum whose first num_normalized inputs pass through affine-free training-mode batch
// norms (batch_norm.h's kernels), and its backward; the normalised inputs are never written.
//
// Compiled once per CPU capability (cpu_ops.h), in a namespace named after it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "batch_norm.h"

namespace fastnas::cpu {
inline namespace CPU_CAPABILITY {

namespace {

// A node sum whose first num_normalized inputs pass through affine-free training-mode batch norms (batch_norm.h's
// kernels): the normalised inputs are never written.

std::tuple<Tensor, Tensor, Tensor> normalized_mixed_sum(at::TensorList zs, const Tensor& weights,
                                                        int64_t num_normalized, at::TensorList running_means,
                                                        at::TensorList running_vars, double momentum, double eps) {
  const char* op = "normalized_mixed_sum";
  check_mixed_sum(zs, weights);
  check_device_type(op, "zs[0]", zs[0], at::kCPU);
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
  check_4d_on(op, "grad", grad, at::kCPU);
  check_float(op, "weights", weights);
  check_same_device(op, "weights", weights, "grad", grad);
  TORCH_CHECK_VALUE(weights.dim() == 1, "fastnas.", op, ": weights must be 1-D, got shape ", shape_str(weights.sizes()));
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"means", means}, {"invstds", invstds}}) {
    check_float(op, name, t);
    check_same_device(op, name, t, "grad", grad);
  }
  const int64_t K = weights.numel(), C = grad.size(1), M = grad.numel() / std::max<int64_t>(1, C);
  TORCH_CHECK_VALUE(means.dim() == 2 && means.size(1) == C && invstds.sizes().equals(means.sizes()) &&
                        means.size(0) <= K,
                    "fastnas.", op, ": backward expects means and invstds of one shape [num_normalized, ", C,
                    "] with num_normalized <= ", K, " (the number of weights), got ", shape_str(means.sizes()), " and ",
                    shape_str(invstds.sizes()));
  const int64_t Kn = means.size(0);
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

}  // namespace

// the CPU kernels of normalized_mixed_sum
inline void register_normalized_mixed_sum(torch::Library& m) {
  m.impl("normalized_mixed_sum", &normalized_mixed_sum);
  m.impl("normalized_mixed_sum_backward", &normalized_mixed_sum_backward);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
