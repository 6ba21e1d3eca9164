// The Python module of nmt's CPU kernels (loaded by nmt/cpu_kernels.py).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dropout_forward", &nmt::dropout_forward, "residual + dropout(x), bf16, mask as bits");
  m.def("dropout_backward", &nmt::dropout_backward, "gradient of dropout(x) from its bits");
  m.def("relu_dropout_forward", &nmt::relu_dropout_forward, "dropout(relu(x)), bf16");
  m.def("relu_dropout_backward", &nmt::relu_dropout_backward, "gradient of dropout(relu(x)) from its output");
  m.def("logit_row_stats", &nmt::logit_row_stats,
        "(log-sum-exp, sum, target logit) of each row of bf16 logits; with out, keep: + the softmax gradient "
        "up to a factor per row, written into out, and the factors",
        py::arg("logits"), py::arg("target"), py::arg("out") = py::none(), py::arg("keep") = py::none(),
        py::arg("k") = 0.0);
  m.def("softmax_minus_target", &nmt::softmax_minus_target,
        "out = scale * softmax(logits) - k * onehot(target) on kept rows, 0 on the others (bf16)");
  m.def("layer_norm_forward", &nmt::layer_norm_forward, "LayerNorm of bf16 rows (fp32 weight, bias): y, mean, rstd");
  m.def("layer_norm_backward", &nmt::layer_norm_backward,
        "gradients of layer_norm_forward: x (+ residual when given), weight, bias", py::arg("grad"), py::arg("x"),
        py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("residual") = py::none());
  m.def("column_sums", &nmt::column_sums, "fp32 sums over the rows of a bf16 [rows, N] matrix");
  m.def("squared_norm", &nmt::squared_norm, "sum of squares of all elements of contiguous fp32 CPU tensors");
  m.def("transpose_bf16", &nmt::transpose_bf16, "row-major copy of x^T, bf16 [R, C] (R % 32 == 0, C % 16 == 0)");
  m.def("weight_grad", &nmt::weight_grad, "dY^T X in fp32 from bf16 dY [M, N] and X [M, K], with AMX (+ out)",
        py::arg("grad"), py::arg("x"), py::arg("out") = py::none());
  m.def("weight_bias_grad", &nmt::weight_bias_grad, "(dY^T X, dY's column sums) in fp32, with AMX");
  m.def("amx_available", &nmt::amx_available, "whether this process may use AMX (asks Linux once)");
  m.def("attention_forward", &nmt::attention_forward,
        "softmax(scale * q k^T) over the allowed keys, dropped, times v: (context, weights), bf16");
  m.def("attention_backward", &nmt::attention_backward, "gradients of attention_forward into grad_q/k/v");
}
