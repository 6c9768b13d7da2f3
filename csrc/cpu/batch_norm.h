// Per-channel kernels on channels_last data [M, C] (M = N*H*W rows), vectorised over the channels, for the
// training-mode batch norms (affine-free and affine) and for the search-cell node sum that applies its candidates'
// batch norms:
//   bn_stats:                 per-channel mean and biased variance in one pass over x (each block of rows is summed
//                             twice while it is in L1, then the blocks are merged with Chan's formula);
//   per_channel_weighted_sum: out = bias + sum_k coef_k * (z_k - shift_k) (the batch norm's y = invstd (x - mean) is
//                             K = 1);
//   grad_dot_sums:            sum_r g and sum_r g * (z_k - shift_k), in one pass over g and every z_k;
//   per_channel_affine_grad:  gz = a g + b (z - shift) + c (the batch norm's input gradient, and the fused node sum's
//                             input gradients, are per-channel affine in the gradient and one tensor).
// The shifts are per channel (a batch norm's mean; none where not given): sums and products taken about the mean
// lose no precision to cancellation when |mean| >> std.
// Deterministic: row blocks depend on M and C only and are merged in order.
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

// rows per block: about 4096 elements (16 KiB of fp32), at least one row
inline int64_t bn_block_rows(int64_t C) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C)); }

// Per-channel sums over rows [r0, r1) of a [M, C] matrix: s[c] = sum f(row values); vectorised over c.
template <typename T, typename Body, typename Tail>
C10_ALWAYS_INLINE void bn_channel_loop(int64_t C, Body body, Tail tail) {
  constexpr int64_t Wv = VecT<T>::W;
  int64_t c = 0;
  for (; c + Wv <= C; c += Wv) body(c);
  for (; c < C; ++c) tail(c);
}

// The channels in chunks of vectors (vector_chunks: independent add chains for the row reductions, which are
// otherwise bound by the latency of one chain), then one by one: body(std::integral_constant<int64_t, U>, c), tail(c).
template <typename T, typename Body, typename Tail>
C10_ALWAYS_INLINE void bn_channel_chunks(int64_t C, Body body, Tail tail) {
  for (int64_t c = vector_chunks<VecT<T>::W>(0, C, body); c < C; ++c) tail(c);
}

// mean and biased variance of every channel; writes mean[C], var[C] (accumulation type)
template <typename T>
void bn_stats(const T* x, int64_t M, int64_t C, at::opmath_type<T>* mean, at::opmath_type<T>* var) {
  using A = at::opmath_type<T>;
  using VT = VecT<T>;
  using V = typename VT::V;
  const int64_t R = bn_block_rows(C);
  const int64_t nblocks = (M + R - 1) / R;
  std::vector<A> bmean(nblocks * C), bm2(nblocks * C);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * R, r1 = std::min(M, r0 + R);
      const A n_rows = static_cast<A>(r1 - r0);
      A* mu = bmean.data() + b * C;
      A* m2 = bm2.data() + b * C;
      bn_channel_chunks<T>(
          C,
          [&](auto u_count, int64_t c) {
            constexpr int64_t U = decltype(u_count)::value;
            constexpr int64_t Wv = VT::W;
            // the sum is taken about the block's first row (exact differences when the spread is small against
            // the mean), so the mean keeps its precision when |mean| >> std
            V s[U], m[U], q[U], first[U];
            for (int64_t u = 0; u < U; ++u) {
              s[u] = q[u] = V(A(0));
              first[u] = VT::load(x + r0 * C + c + u * Wv);
            }
            for (int64_t r = r0; r < r1; ++r) {
              for (int64_t u = 0; u < U; ++u) s[u] = s[u] + (VT::load(x + r * C + c + u * Wv) - first[u]);
            }
            for (int64_t u = 0; u < U; ++u) m[u] = first[u] + s[u] / V(n_rows);
            for (int64_t r = r0; r < r1; ++r) {
              for (int64_t u = 0; u < U; ++u) {
                const V d = VT::load(x + r * C + c + u * Wv) - m[u];
                q[u] = at::vec::fmadd(d, d, q[u]);
              }
            }
            for (int64_t u = 0; u < U; ++u) {
              m[u].store(mu + c + u * Wv);
              q[u].store(m2 + c + u * Wv);
            }
          },
          [&](int64_t c) {
            A s = 0;
            const A first = static_cast<A>(x[r0 * C + c]);
            for (int64_t r = r0; r < r1; ++r) s += static_cast<A>(x[r * C + c]) - first;
            const A m = first + s / n_rows;
            A q = 0;
            for (int64_t r = r0; r < r1; ++r) {
              const A d = static_cast<A>(x[r * C + c]) - m;
              q += d * d;
            }
            mu[c] = m;
            m2[c] = q;
          });
    }
  });
  // merge the blocks in order (Chan et al.): n = na + nb, delta = mb - ma, m = ma + delta nb / n,
  // M2 = M2a + M2b + delta^2 na nb / n
  for (int64_t c = 0; c < C; ++c) {
    A m = bmean[c], q = bm2[c], n = static_cast<A>(std::min(M, R));
    for (int64_t b = 1; b < nblocks; ++b) {
      const A nb = static_cast<A>(std::min(M, (b + 1) * R) - b * R);
      const A delta = bmean[b * C + c] - m;
      const A tot = n + nb;
      m += delta * nb / tot;
      q += bm2[b * C + c] + delta * delta * n * nb / tot;
      n = tot;
    }
    mean[c] = m;
    var[c] = q / static_cast<A>(M);
  }
}

// out[r, c] = bias[c] + sum_k coef[k * C + c] (z_k[r, c] - shifts[k * C + c]) (shifts 0 when not given)
template <typename T>
void per_channel_weighted_sum(const std::vector<const T*>& zs, const at::opmath_type<T>* coef,
                              const at::opmath_type<T>* bias, T* out, int64_t M, int64_t C,
                              const at::opmath_type<T>* shifts = nullptr) {
  using A = at::opmath_type<T>;
  using VT = VecT<T>;
  using V = typename VT::V;
  const int64_t K = static_cast<int64_t>(zs.size());
  const T* const* zp = zs.data();
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    if (K == 1) {  // a batch norm's normalisation: one input, no loop over inputs in the hot loop
      const T* z = zp[0];
      for (int64_t r = r0; r < r1; ++r) {
        bn_channel_loop<T>(
            C,
            [&](int64_t c) {
              V zv = VT::load(z + r * C + c);
              if (shifts) zv = zv - V::loadu(shifts + c);
              VT::store(out + r * C + c, at::vec::fmadd(V::loadu(coef + c), zv, V::loadu(bias + c)));
            },
            [&](int64_t c) {
              const A zv = static_cast<A>(z[r * C + c]) - (shifts ? shifts[c] : A(0));
              out[r * C + c] = static_cast<T>(bias[c] + coef[c] * zv);
            });
      }
      return;
    }
    for (int64_t r = r0; r < r1; ++r) {
      bn_channel_loop<T>(
          C,
          [&](int64_t c) {
            V acc = V::loadu(bias + c);
            for (int64_t k = 0; k < K; ++k) {
              V zv = VT::load(zp[k] + r * C + c);
              if (shifts) zv = zv - V::loadu(shifts + k * C + c);
              acc = at::vec::fmadd(V::loadu(coef + k * C + c), zv, acc);
            }
            VT::store(out + r * C + c, acc);
          },
          [&](int64_t c) {
            A acc = bias[c];
            for (int64_t k = 0; k < K; ++k) {
              acc += coef[k * C + c] * (static_cast<A>(zp[k][r * C + c]) - (shifts ? shifts[k * C + c] : A(0)));
            }
            out[r * C + c] = static_cast<T>(acc);
          });
    }
  });
}

// sums[c] = sum_r g[r, c] and sums[(1 + k) C + c] = sum_r g[r, c] (z_k[r, c] - shifts[k * C + c]) (shifts 0 when
// not given), deterministic
template <typename T>
std::vector<at::opmath_type<T>> grad_dot_sums(const T* g, const std::vector<const T*>& zs, int64_t M, int64_t C,
                                              const at::opmath_type<T>* shifts = nullptr) {
  using A = at::opmath_type<T>;
  using VT = VecT<T>;
  using V = typename VT::V;
  const int64_t K = static_cast<int64_t>(zs.size());
  const int64_t width = (K + 1) * C;
  const int64_t R = bn_block_rows(C);
  const int64_t nblocks = (M + R - 1) / R;
  std::vector<A> partial(nblocks * width, A(0));
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * R, r1 = std::min(M, r0 + R);
      A* p = partial.data() + b * width;
      // the block of g stays in L1 while every z_k is read against it; sum(g) rides along with the first
      for (int64_t k = 0; k < std::max<int64_t>(K, 1); ++k) {
        const T* z = k < K ? zs[k] : nullptr;
        A* dot = p + (k + 1) * C;
        bn_channel_chunks<T>(
            C,
            [&](auto u_count, int64_t c) {
              constexpr int64_t U = decltype(u_count)::value;
              constexpr int64_t Wv = VT::W;
              V s[U], d[U], sh[U];
              for (int64_t u = 0; u < U; ++u) {
                s[u] = d[u] = V(A(0));
                sh[u] = (z != nullptr && shifts) ? V::loadu(shifts + k * C + c + u * Wv) : V(A(0));
              }
              if (k > 0) {
                for (int64_t r = r0; r < r1; ++r) {
                  for (int64_t u = 0; u < U; ++u) {
                    const int64_t i = r * C + c + u * Wv;
                    d[u] = at::vec::fmadd(VT::load(g + i), VT::load(z + i) - sh[u], d[u]);
                  }
                }
              } else if (z != nullptr) {
                for (int64_t r = r0; r < r1; ++r) {
                  for (int64_t u = 0; u < U; ++u) {
                    const int64_t i = r * C + c + u * Wv;
                    const V gv = VT::load(g + i);
                    s[u] = s[u] + gv;
                    d[u] = at::vec::fmadd(gv, VT::load(z + i) - sh[u], d[u]);
                  }
                }
              } else {
                for (int64_t r = r0; r < r1; ++r) {
                  for (int64_t u = 0; u < U; ++u) s[u] = s[u] + VT::load(g + r * C + c + u * Wv);
                }
              }
              for (int64_t u = 0; u < U; ++u) {
                if (k == 0) s[u].store(p + c + u * Wv);
                if (z != nullptr) d[u].store(dot + c + u * Wv);
              }
            },
            [&](int64_t c) {
              A s = 0, d = 0;
              const A sh = (z != nullptr && shifts) ? shifts[k * C + c] : A(0);
              for (int64_t r = r0; r < r1; ++r) {
                s += static_cast<A>(g[r * C + c]);
                if (z != nullptr) d += static_cast<A>(g[r * C + c]) * (static_cast<A>(z[r * C + c]) - sh);
              }
              if (k == 0) p[c] = s;
              if (z != nullptr) dot[c] = d;
            });
      }
    }
  });
  std::vector<A> total(width, A(0));
  for (int64_t b = 0; b < nblocks; ++b)
    for (int64_t i = 0; i < width; ++i) total[i] += partial[b * width + i];
  return total;
}

// gz[r, c] = a[c] g[r, c] + b[c] (z[r, c] - shift[c]) + cc[c] (shift 0 when not given)
template <typename T>
void per_channel_affine_grad(const T* g, const T* z, const at::opmath_type<T>* a, const at::opmath_type<T>* b,
                             const at::opmath_type<T>* cc, T* gz, int64_t M, int64_t C,
                             const at::opmath_type<T>* shift = nullptr) {
  using A = at::opmath_type<T>;
  using VT = VecT<T>;
  using V = typename VT::V;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      bn_channel_loop<T>(
          C,
          [&](int64_t c) {
            V v = at::vec::fmadd(V::loadu(a + c), VT::load(g + r * C + c), V::loadu(cc + c));
            V zv = VT::load(z + r * C + c);
            if (shift) zv = zv - V::loadu(shift + c);
            VT::store(gz + r * C + c, at::vec::fmadd(V::loadu(b + c), zv, v));
          },
          [&](int64_t c) {
            const A zv = static_cast<A>(z[r * C + c]) - (shift ? shift[c] : A(0));
            gz[r * C + c] = static_cast<T>(a[c] * static_cast<A>(g[r * C + c]) + b[c] * zv + cc[c]);
          });
    }
  });
}

namespace {

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
  check_4d_on(op, "x", x, at::kCPU);
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
  check_4d_on(op, "x", x, at::kCPU);
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
  check_4d_on(op, "y", y, at::kCPU);
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

}  // namespace

// the CPU kernels of batch_norm
inline void register_batch_norm(torch::Library& m) {
  m.impl("batch_norm_train", &batch_norm_train);
  m.impl("batch_norm_backward", &batch_norm_backward);
  m.impl("batch_norm_affine_train", &batch_norm_affine_train);
  m.impl("batch_norm_affine_backward", &batch_norm_affine_backward);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastnas::cpu
