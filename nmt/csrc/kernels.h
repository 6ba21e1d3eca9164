// nmt's CPU kernels (bf16, AVX-512 with AVX512-BF16); bound to Python in bindings.cpp.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace nmt {

// dropout.cpp: residual + dropout(x) with the mask as bits; dropout(relu(x)); their gradients
std::vector<at::Tensor> dropout_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                        int64_t threshold, double scale, int64_t seed);
at::Tensor dropout_backward(const at::Tensor& grad, const at::Tensor& bits, double scale);
at::Tensor relu_dropout_forward(const at::Tensor& x, int64_t threshold, double scale, int64_t seed);
at::Tensor relu_dropout_backward(const at::Tensor& grad, const at::Tensor& out, double scale);

// loss.cpp: per-row statistics of bf16 logits for the cross-entropy (+ its gradient up to a factor per
// row), and its softmax gradient
std::vector<at::Tensor> logit_row_stats(const at::Tensor& logits, const at::Tensor& target,
                                        const std::optional<at::Tensor>& out, const std::optional<at::Tensor>& keep,
                                        double k);
void softmax_minus_target(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& target,
                          const at::Tensor& keep, double scale, double k, at::Tensor& out);

// layer_norm.cpp: LayerNorm of bf16 rows with fp32 weight and bias -> (y, mean, rstd); its gradients
// (grad_x (+ residual when given), grad_weight, grad_bias)
std::vector<at::Tensor> layer_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                           double eps);
std::vector<at::Tensor> layer_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                            const at::Tensor& rstd, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& residual);

// column_sums.cpp: fp32 sums over the rows of a bf16 [rows, N] matrix (a Linear layer's bias gradient)
at::Tensor column_sums(const at::Tensor& x);

// squared_norm.cpp: the sum of squares of all elements of contiguous fp32 CPU tensors (gradient clipping)
double squared_norm(const std::vector<at::Tensor>& tensors);

// transpose.cpp: a row-major copy of x^T for bf16 x [R, C] (R a multiple of 32, C of 16)
at::Tensor transpose_bf16(const at::Tensor& x);

// weight_grad.cpp: dY^T X in fp32 from bf16 dY [M, N], X [M, K] with AMX (N, K multiples of 32), added
// onto `out` when given; whether this process may use AMX
at::Tensor weight_grad(const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& out);
std::vector<at::Tensor> weight_bias_grad(const at::Tensor& grad, const at::Tensor& x);  // (dW, its bias's)
bool amx_available();

// attention.cpp: multi-head attention of strided bf16 [B, heads, len, D] views -> (context as a
// [B, heads, T, D] view of [B, T, heads, D], bf16 softmax weights [B, heads, T, S]); its gradients,
// written into the given (strided) tensors
std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& key_mask, bool causal, double scale,
                                          int64_t threshold, double drop_scale, int64_t seed);
void attention_backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& probs, double scale, int64_t threshold, double drop_scale, int64_t seed,
                        at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v);

}  // namespace nmt
