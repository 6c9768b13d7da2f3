// Shared by the CPU and CUDA implementations of the fastnas ops: argument checks (same exception types and messages
// as fastnas/ops/checks.py) and the layout rules that the fakes (fastnas/ops/layout.py) mirror.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/TensorUtils.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace fastnas {

using at::Tensor;

// ---------------------------------------------------------------------------------------------------------------
// Checks. TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError in Python.

inline std::string dtype_name(c10::ScalarType t) {
  return std::string("torch.") + std::string(c10::getDtypeNames(t).first);
}

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

inline bool is_float(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_float(const char* op, const std::string& arg, const Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), "fastnas.", op, ": ", arg, " is an undefined tensor");
  TORCH_CHECK_TYPE(is_float(t.scalar_type()), "fastnas.", op, ": ", arg, " has dtype ", dtype_name(t.scalar_type()),
                   ", expected one of float32, float64, bfloat16, float16");
}

inline void check_4d(const char* op, const std::string& arg, const Tensor& t) {
  check_float(op, arg, t);
  TORCH_CHECK_VALUE(t.dim() == 4, "fastnas.", op, ": ", arg, " must be 4-D [N, C, H, W], got shape ",
                    shape_str(t.sizes()));
}

inline void check_same_device(const char* op, const std::string& arg, const Tensor& t, const std::string& ref_arg,
                              const Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "fastnas.", op, ": ", arg, " is on ", t.device(), ", expected ",
                    ref.device(), " (the device of ", ref_arg, ")");
}

inline void check_device_type(const char* op, const std::string& arg, const Tensor& t, c10::DeviceType type) {
  TORCH_CHECK_VALUE(t.device().type() == type, "fastnas.", op, ": ", arg, " is on ", t.device(), ", expected a ",
                    c10::DeviceTypeName(type, /*lower_case=*/true), " tensor");
}

// A 4-D floating-point tensor on a device of the given type.
inline void check_4d_on(const char* op, const std::string& arg, const Tensor& t, c10::DeviceType type) {
  check_4d(op, arg, t);
  check_device_type(op, arg, t, type);
}

// Sizes and window arguments are below 2^31: their sums and products then cannot overflow int64.
constexpr int64_t kMaxArg = (int64_t(1) << 31) - 1;

// Each of the named int[2] arguments holds two integers in [its minimum, kMaxArg].
inline void check_int_pairs(const char* op,
                            std::initializer_list<std::tuple<const char*, at::IntArrayRef, int64_t>> args) {
  for (const auto& [name, v, lo] : args) {
    TORCH_CHECK_VALUE(v.size() == 2 && v[0] >= lo && v[1] >= lo && v[0] <= kMaxArg && v[1] <= kMaxArg, "fastnas.",
                      op, ": ", name, " must be two integers in [", lo, ", 2^31), got ", shape_str(v));
  }
}

// A size argument of a backward op (the forward input's H, W or C): in [0, 2^31).
inline void check_size_arg(const char* op, const char* arg, int64_t v) {
  TORCH_CHECK_VALUE(v >= 0 && v <= kMaxArg, "fastnas.", op, ": ", arg, " must be in [0, 2^31), got ", v);
}

// An index tensor (a saved argmax, which a caller may have altered): of the given dtype, on the device of `ref`, with
// every value in [0, end). One pass over it (a min/max reduction; a device sync on CUDA), cheap beside the backward
// that reads it: an index outside would read or write out of bounds.
inline void check_index_tensor(const char* op, const char* arg, const Tensor& t, c10::ScalarType dtype, int64_t end,
                               const char* ref_arg, const Tensor& ref) {
  TORCH_CHECK_TYPE(t.defined() && t.scalar_type() == dtype, "fastnas.", op, ": ", arg, " has dtype ",
                   t.defined() ? dtype_name(t.scalar_type()) : std::string("undefined"), ", expected ",
                   dtype_name(dtype));
  check_same_device(op, arg, t, ref_arg, ref);
  if (t.numel() == 0) return;
  const auto [lo, hi] = t.aminmax();
  const int64_t min = lo.item<int64_t>(), max = hi.item<int64_t>();
  TORCH_CHECK_INDEX(min >= 0 && max < end, "fastnas.", op, ": ", arg, " holds indices in [", min, ", ", max,
                    "], expected indices in [0, ", end, ")");
}

inline void check_mixed_sum(at::TensorList xs, const Tensor& weights) {
  const char* op = "mixed_sum";
  TORCH_CHECK_VALUE(!xs.empty(), "fastnas.mixed_sum: xs must hold at least one tensor");
  check_float(op, "xs[0]", xs[0]);
  const Tensor& x0 = xs[0];
  for (size_t k = 1; k < xs.size(); ++k) {
    const std::string arg = "xs[" + std::to_string(k) + "]";
    check_float(op, arg, xs[k]);
    TORCH_CHECK_VALUE(xs[k].sizes().equals(x0.sizes()), "fastnas.mixed_sum: ", arg, " has shape ",
                      shape_str(xs[k].sizes()), ", expected ", shape_str(x0.sizes()), " (the shape of xs[0])");
    TORCH_CHECK_TYPE(xs[k].scalar_type() == x0.scalar_type(), "fastnas.mixed_sum: ", arg, " has dtype ",
                     dtype_name(xs[k].scalar_type()), ", expected ", dtype_name(x0.scalar_type()),
                     " (the dtype of xs[0])");
    check_same_device(op, arg, xs[k], "xs[0]", x0);
  }
  check_float(op, "weights", weights);
  const int64_t K = static_cast<int64_t>(xs.size());
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == K, "fastnas.mixed_sum: weights must have shape [", K,
                    "] (one per input), got ", shape_str(weights.sizes()));
  check_same_device(op, "weights", weights, "xs[0]", x0);
}

inline void check_scale(const char* op, const Tensor& x, const Tensor& logits, at::IntArrayRef expected) {
  check_4d(op, "x", x);
  check_float(op, "logits", logits);
  TORCH_CHECK_VALUE(logits.sizes().equals(expected), "fastnas.", op, ": logits must have shape ", shape_str(expected),
                    " for x of shape ", shape_str(x.sizes()), ", got ", shape_str(logits.sizes()));
  check_same_device(op, "logits", logits, "x", x);
}

inline void check_channel_scale(const Tensor& x, const Tensor& logits) {
  check_4d("channel_scale", "x", x);
  check_scale("channel_scale", x, logits, {x.size(0), x.size(1)});
}

inline void check_spatial_scale(const Tensor& x, const Tensor& logits) {
  check_4d("spatial_scale", "x", x);
  check_scale("spatial_scale", x, logits, {x.size(0), 1, x.size(2), x.size(3)});
}

inline void check_channel_pool(const Tensor& x) {
  check_4d("channel_pool", "x", x);
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) > 0, "fastnas.channel_pool: x has no spatial elements (shape ",
                    shape_str(x.sizes()), "), the max is undefined");
}

inline void check_spatial_pool(const Tensor& x) {
  check_4d("spatial_pool", "x", x);
  TORCH_CHECK_VALUE(x.size(1) > 0, "fastnas.spatial_pool: x has no channels (shape ", shape_str(x.sizes()),
                    "), the max is undefined");
}

// a backward's incoming gradient: float, and of the shape, dtype and device of the tensor it is the gradient of
inline void check_grad(const char* op, const Tensor& grad, const Tensor& like) {
  check_float(op, "grad", grad);
  TORCH_CHECK_VALUE(grad.sizes().equals(like.sizes()), "fastnas.", op, ": grad has shape ", shape_str(grad.sizes()),
                    ", expected ", shape_str(like.sizes()));
  TORCH_CHECK_TYPE(grad.scalar_type() == like.scalar_type(), "fastnas.", op, ": grad has dtype ",
                   dtype_name(grad.scalar_type()), ", expected ", dtype_name(like.scalar_type()));
  check_same_device(op, "grad", grad, "the input", like);
}

inline void check_mixed_sum_backward(const Tensor& grad, at::TensorList xs, const Tensor& weights,
                                     c10::DeviceType device_type) {
  check_mixed_sum(xs, weights);
  check_device_type("mixed_sum", "xs[0]", xs[0], device_type);
  check_grad("mixed_sum", grad, xs[0]);
}

inline void check_mixed_sum_backward_xs(const Tensor& grad, const Tensor& weights, c10::DeviceType device_type) {
  check_float("mixed_sum", "grad", grad);
  check_float("mixed_sum", "weights", weights);
  check_device_type("mixed_sum", "grad", grad, device_type);
  check_same_device("mixed_sum", "weights", weights, "grad", grad);
  TORCH_CHECK_VALUE(weights.dim() == 1, "fastnas.mixed_sum: weights must be 1-D, got shape ",
                    shape_str(weights.sizes()));
}

// channel_pool_backward: grad_avg, grad_max [N, C] of one float dtype, an int32 argmax [N, C] in [0, H*W).
inline void check_channel_pool_backward(const Tensor& grad_avg, const Tensor& grad_max, const Tensor& argmax,
                                        int64_t H, int64_t W, c10::DeviceType device_type) {
  const char* op = "channel_pool";
  check_float(op, "grad_avg", grad_avg);
  check_device_type(op, "grad_avg", grad_avg, device_type);
  check_float(op, "grad_max", grad_max);
  check_same_device(op, "grad_max", grad_max, "grad_avg", grad_avg);
  TORCH_CHECK_VALUE(grad_avg.dim() == 2 && grad_max.sizes().equals(grad_avg.sizes()) && argmax.defined() &&
                        argmax.sizes().equals(grad_avg.sizes()),
                    "fastnas.channel_pool: backward expects grad_avg, grad_max and argmax of one shape [N, C]");
  TORCH_CHECK_TYPE(grad_max.scalar_type() == grad_avg.scalar_type() && argmax.scalar_type() == at::kInt,
                   "fastnas.channel_pool: backward expects grad_max of the dtype of grad_avg and an int32 argmax");
  check_size_arg(op, "H", H);
  check_size_arg(op, "W", W);
  TORCH_CHECK_VALUE(H * W <= kMaxArg, "fastnas.channel_pool: H*W must be below 2^31, got ", H, "x", W);
  if (H * W > 0) check_index_tensor(op, "argmax", argmax, at::kInt, H * W, "grad_avg", grad_avg);
}

// spatial_pool_backward: grad [N, 2, H, W] (float), an int32 argmax [N, H, W] in [0, C).
inline void check_spatial_pool_backward(const Tensor& grad, const Tensor& argmax, int64_t C,
                                        c10::DeviceType device_type) {
  const char* op = "spatial_pool";
  check_4d(op, "grad", grad);
  check_device_type(op, "grad", grad, device_type);
  const int64_t N = grad.size(0), H = grad.size(2), W = grad.size(3);
  TORCH_CHECK_VALUE(grad.size(1) == 2 && argmax.defined() && argmax.dim() == 3 && argmax.size(0) == N &&
                        argmax.size(1) == H && argmax.size(2) == W,
                    "fastnas.spatial_pool: backward expects grad [N, 2, H, W] and argmax [N, H, W]");
  TORCH_CHECK_TYPE(argmax.scalar_type() == at::kInt, "fastnas.spatial_pool: backward expects an int32 argmax");
  check_size_arg(op, "C", C);
  if (C > 0) check_index_tensor(op, "argmax", argmax, at::kInt, C, "grad", grad);
}

// ---------------------------------------------------------------------------------------------------------------
// Layouts. Kernels have two fast paths for 4-D tensors: NCHW (contiguous) and NHWC (channels_last). Anything else is
// copied into one of them first. Outputs that have the shape of an input are allocated with empty_like (which keeps
// a dense input's strides); if that is neither NCHW nor NHWC, the kernel writes a contiguous temporary and copies.

enum class Layout { NCHW, NHWC };

inline c10::MemoryFormat memory_format(Layout l) {
  return l == Layout::NHWC ? c10::MemoryFormat::ChannelsLast : c10::MemoryFormat::Contiguous;
}

// The fast path an existing 4-D tensor can use without a copy (NCHW when it can use neither).
inline Layout layout_of(const Tensor& t) {
  if (t.is_contiguous()) return Layout::NCHW;
  if (t.is_contiguous(c10::MemoryFormat::ChannelsLast)) return Layout::NHWC;
  return Layout::NCHW;
}

// True when t is not plain contiguous and its channels are its innermost dimension: channels_last-contiguous, or a
// channel slice of such a tensor (channel stride 1, pixels at least C apart). Results then keep channels_last.
// fastnas/ops/layout.py (prefers_channels_last) must agree.
inline bool prefers_channels_last(const Tensor& t) {
  if (t.dim() != 4 || t.is_contiguous()) return false;
  if (t.is_contiguous(c10::MemoryFormat::ChannelsLast)) return true;
  const int64_t xs = t.stride(3);
  return t.stride(1) == 1 && xs > t.size(1) && t.stride(2) == t.size(3) * xs &&
         (t.size(0) <= 1 || t.stride(0) == t.size(2) * t.size(3) * xs);
}

inline Tensor in_layout(const Tensor& t, Layout l) { return t.contiguous(memory_format(l)); }

// A result computed channels_last, in the layout the ops' rule gives: channels_last when x prefers it, else NCHW.
inline Tensor in_rule_layout(const Tensor& result, const Tensor& x) {
  return prefers_channels_last(x) ? result : result.contiguous();
}

// x as the kernels that walk channels_last pixel rows read it, and the distance between its pixels (elements):
// channels_last data or a channel slice of it as it is, anything else made channels_last first.
inline std::pair<Tensor, int64_t> channels_last_rows(const Tensor& x) {
  if (x.is_contiguous(c10::MemoryFormat::ChannelsLast)) return {x, x.size(1)};
  if (prefers_channels_last(x)) return {x, x.stride(3)};
  return {x.contiguous(c10::MemoryFormat::ChannelsLast), x.size(1)};
}

// A same-shape output for `like` (empty_like semantics) and the buffer the kernel writes: the output itself when it
// is NCHW or NHWC, else a contiguous temporary that finish_output copies back.
struct Output {
  Tensor out;
  Tensor buffer;
  Layout layout;
  void finish() {
    if (!buffer.is_same(out)) out.copy_(buffer);
  }
};

inline Output make_output(const Tensor& like, c10::optional<c10::ScalarType> dtype = c10::nullopt) {
  Output o;
  o.out = dtype ? at::empty_like(like, like.options().dtype(*dtype)) : at::empty_like(like);
  if (o.out.is_contiguous()) {
    o.layout = Layout::NCHW;
    o.buffer = o.out;
  } else if (o.out.dim() == 4 && o.out.is_contiguous(c10::MemoryFormat::ChannelsLast)) {
    o.layout = Layout::NHWC;
    o.buffer = o.out;
  } else {
    o.layout = Layout::NCHW;
    o.buffer = at::empty(o.out.sizes(), o.out.options().memory_format(c10::MemoryFormat::Contiguous));
  }
  return o;
}

// t with exactly the strides of `ref` (same shape and dtype; ref is non-overlapping and dense).
inline Tensor with_strides_of(const Tensor& t, const Tensor& ref) {
  if (t.strides().equals(ref.strides()) && t.storage_offset() >= 0) return t;
  Tensor r = at::empty_like(ref);
  r.copy_(t);
  return r;
}

// The gradient of spatial_pool's [N, 2, H, W] output, element (n, k, hw) at g + n * s_n + k * s_c + hw * s_hw:
// channels_last (the layout spatial_pool produces) and NCHW are used as they are, anything else is made
// channels_last first.
struct SpatialPoolGrad {
  Tensor t;
  int64_t s_n;
  int64_t s_c;
  int64_t s_hw;
};

inline SpatialPoolGrad spatial_pool_grad_view(const Tensor& g) {
  const int64_t HW = g.size(2) * g.size(3);
  if (g.is_contiguous(c10::MemoryFormat::ChannelsLast)) return {g, 2 * HW, 1, 2};
  if (g.is_contiguous()) return {g, 2 * HW, HW, 1};
  return {g.contiguous(c10::MemoryFormat::ChannelsLast), 2 * HW, 1, 2};
}

// Accumulation dtype: float64 for float64, else float32.
inline c10::ScalarType acc_dtype(c10::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// weights / logits as a contiguous tensor of the accumulation type of `like`
inline Tensor as_acc(const Tensor& t, c10::ScalarType like) { return t.to(acc_dtype(like)).contiguous(); }

}  // namespace fastnas
