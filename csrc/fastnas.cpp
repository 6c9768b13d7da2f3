// The operator schemas of fastnas, defined once. Each op's kernels, host wrapper and registration live in
// cpu/<op>.h (listed in cpu/cpu_ops.h) and cuda/<op>.cu; the fake (meta) implementations and the autograd formulas
// are registered from Python (fastnas/ops/_cpp.py). A new op adds its schema here, those files, and its include and
// register call in cpu_ops.h.
#include <torch/library.h>

#include <cstdint>
#include <vector>

#ifdef FASTNAS_WITH_CUDA
namespace fastnas::cuda {
std::vector<int64_t> arch_list();  // cuda/arch_list.cu
}
#endif

namespace {
std::vector<int64_t> cuda_arch_list() {
#ifdef FASTNAS_WITH_CUDA
  return fastnas::cuda::arch_list();
#else
  return {};
#endif
}
}  // namespace

TORCH_LIBRARY(fastnas, m) {
  // sum_k weights[k] * xs[k]
  m.def("mixed_sum(Tensor[] xs, Tensor weights) -> Tensor");
  // weights need a gradient: (grad of every xs[k] (empty list unless need_xs_grad), grad of weights) in one pass
  m.def("mixed_sum_backward(Tensor grad, Tensor[] xs, Tensor weights, bool need_xs_grad) -> (Tensor[], Tensor)");
  // only the xs need a gradient: weights[k] * grad for every k (the inputs are not needed)
  m.def("mixed_sum_backward_xs(Tensor grad, Tensor weights) -> Tensor[]");

  // (mean over H*W, max over H*W, int32 index of the first maximum in H*W)
  m.def("channel_pool(Tensor x) -> (Tensor, Tensor, Tensor)");
  m.def("channel_pool_backward(Tensor grad_avg, Tensor grad_max, Tensor argmax, SymInt H, SymInt W, "
        "bool channels_last) -> Tensor");

  // ([N, 2, H, W] with the max over C in channel 0 and the mean in channel 1, int32 index of the first maximal channel)
  m.def("spatial_pool(Tensor x) -> (Tensor, Tensor)");
  m.def("spatial_pool_backward(Tensor grad, Tensor argmax, SymInt C, bool channels_last) -> Tensor");

  // x * sigmoid(logits)[:, :, None, None]
  m.def("channel_scale(Tensor x, Tensor logits) -> Tensor");
  // (grad x (an empty tensor unless need_x_grad), grad logits)
  m.def("channel_scale_backward(Tensor grad, Tensor x, Tensor logits, bool need_x_grad) -> (Tensor, Tensor)");

  // x * sigmoid(logits), logits [N, 1, H, W]
  m.def("spatial_scale(Tensor x, Tensor logits) -> Tensor");
  m.def("spatial_scale_backward(Tensor grad, Tensor x, Tensor logits, bool need_x_grad) -> (Tensor, Tensor)");

  // the whole CBAM channel gate, x * sigmoid(MLP(mean_hw x) + MLP(max_hw x)) with the shared MLP
  // p -> relu(p w1^T + b1) w2^T + b2 (w1 [hid, C], w2 [C, hid], x's dtype): (out, pooled [2N, C] (means, then maxima),
  // hidden [2N, hid], logits [N, C], int32 argmax [N, C]) (CPU kernel)
  m.def("channel_gate(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // its backward: (grad x (an empty tensor unless need_x_grad), grad logits [N, C], grad hidden [2N, hid])
  m.def("channel_gate_backward(Tensor grad, Tensor x, Tensor argmax, Tensor logits, Tensor hidden, Tensor w1, "
        "Tensor w2, bool need_x_grad) -> (Tensor, Tensor, Tensor)");

  // the weight gradient [C, 1, kh, kw] of a depthwise convolution (groups = C) of x [N, C, H, W] (CPU kernel)
  m.def("depthwise_conv2d_weight_grad(Tensor grad, Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation) -> Tensor");

  // affine-free batch norm in training mode: (y = (x - mean) * invstd, invstd [C] in float32 (float64 for float64));
  // updates the running statistics as nn.BatchNorm2d does (CPU kernels)
  m.def("batch_norm_train(Tensor x, Tensor(a!) running_mean, Tensor(b!) running_var, float momentum, float eps) "
        "-> (Tensor, Tensor)");
  // its input gradient from the output: invstd * (grad - mean(grad) - y * mean(grad * y)) per channel
  m.def("batch_norm_backward(Tensor grad, Tensor y, Tensor invstd) -> Tensor");
  // the affine one: (y = weight (x - mean) invstd + bias, mean [C], invstd [C]), running statistics as above
  m.def("batch_norm_affine_train(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  // its gradients from the input: (grad x (an empty tensor unless need_x_grad), grad weight, grad bias)
  m.def("batch_norm_affine_backward(Tensor grad, Tensor x, Tensor weight, Tensor mean, Tensor invstd, "
        "bool need_x_grad) -> (Tensor, Tensor, Tensor)");

  // a node sum whose first num_normalized inputs pass through affine-free training-mode batch norms:
  // (sum_k<n w_k (zs[k] - mean_k) invstd_k + sum_k>=n w_k zs[k], means [n, C], invstds [n, C]); updates the
  // running statistics (CPU kernels)
  m.def("normalized_mixed_sum(Tensor[] zs, Tensor weights, int num_normalized, Tensor(a!)[] running_means, "
        "Tensor(b!)[] running_vars, float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  // (grad of every zs[k] (empty unless need_zs_grad), grad of weights (empty unless need_weights_grad)); zs holds
  // every input when the weights need a gradient, else at least the normalised ones
  m.def("normalized_mixed_sum_backward(Tensor grad, Tensor[] zs, Tensor weights, Tensor means, Tensor invstds, "
        "bool need_zs_grad, bool need_weights_grad) -> (Tensor[], Tensor)");

  // stride-1 convolution of x [N, C, H, W] to one channel, weight [1, C, kh, kw], zero padding < kernel size, no
  // bias (a CBAM spatial gate's convolution) (CPU kernels)
  m.def("single_channel_conv2d(Tensor x, Tensor weight, int[2] padding) -> Tensor");
  // (grad x (empty unless need_x_grad), grad weight (empty unless need_weight_grad))
  m.def("single_channel_conv2d_backward(Tensor grad, Tensor x, Tensor weight, int[2] padding, bool need_x_grad, "
        "bool need_weight_grad) -> (Tensor, Tensor)");

  // kh x kw max pooling with zero-size padding ignored: (the pooled tensor, uint8 window position kh_i * kw + kw_i
  // of each first maximum) (CPU kernels)
  m.def("max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding) -> (Tensor, Tensor)");
  m.def("max_pool2d_backward(Tensor grad, Tensor argmax, SymInt H, SymInt W, int[2] kernel_size, int[2] stride, "
        "int[2] padding, bool channels_last) -> Tensor");
  // kh x kw average pooling over the window elements inside the input (count_include_pad=False) (CPU kernels)
  m.def("avg_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor");
  m.def("avg_pool2d_backward(Tensor grad, SymInt H, SymInt W, int[2] kernel_size, int[2] stride, int[2] padding, "
        "bool channels_last) -> Tensor");

  // build facts: the CUDA architectures compiled in (empty without CUDA)
  m.def("cuda_arch_list() -> int[]", &cuda_arch_list);
}
