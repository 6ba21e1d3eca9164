"""nmt.models.linear: oneDNN's linear (bias in the epilogue, fp32 bias gradient) against the layer's own
autocast path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nmt import cpu_kernels
from nmt.models import linear as linear_module
from nmt.models.linear import linear

needs_op = pytest.mark.skipif(linear_module._fused_op() is None, reason="torch without a usable mkldnn linear op")


def outputs_and_gradients(layer: nn.Linear, x: torch.Tensor, grad: torch.Tensor, call) -> list[torch.Tensor]:
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call(layer, x)
    y.backward(grad)
    grads = [x.grad, layer.weight.grad] + ([] if layer.bias is None else [layer.bias.grad])
    return [y, *grads]


@needs_op
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_equal_the_layers_autocast_path(bias, x_dtype):
    torch.manual_seed(0)
    layer = nn.Linear(48, 80, bias=bias)
    x = torch.randn(3, 37, 48).to(x_dtype)
    grad = torch.randn(3, 37, 80).bfloat16()
    fused = outputs_and_gradients(layer, x, grad, linear)
    plain = outputs_and_gradients(layer, x, grad, lambda module, inputs: module(inputs))
    assert fused[0].dtype == plain[0].dtype == torch.bfloat16
    for a, b in zip(fused, plain, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
    for a, b in zip(fused[:3], plain[:3], strict=True):  # output, input and weight gradients: equal
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)
    if bias:  # the bias gradient: the fp32 sums of the bf16 output gradient (addmm's rounds them to bf16)
        exact = grad.double().sum((0, 1)).float()
        torch.testing.assert_close(plain[3], exact, rtol=2 ** -8, atol=1e-6)
        if cpu_kernels.usable_on(grad):
            torch.testing.assert_close(fused[3], exact, rtol=1e-6, atol=1e-5)
        else:
            torch.testing.assert_close(fused[3], plain[3], rtol=0, atol=0)
    assert fused[0].grad_fn.name().endswith("_FusedBiasLinearBackward")


@needs_op
def test_weight_gradient_in_fp32_where_the_amx_kernel_applies():
    torch.manual_seed(0)
    layer = nn.Linear(64, 96)  # both sizes multiples of 32: the AMX kernel's shapes
    x = torch.randn(3, 37, 64)
    grad = torch.randn(3, 37, 96).bfloat16()
    fused = outputs_and_gradients(layer, x, grad, linear)
    plain = outputs_and_gradients(layer, x, grad, lambda module, inputs: module(inputs))
    for a, b in zip(fused[:2], plain[:2], strict=True):  # output and input gradient: equal
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)
    x_bf16 = x.bfloat16().double().reshape(-1, 64)
    exact = grad.double().reshape(-1, 96).t() @ x_bf16
    assert fused[2].dtype == torch.float32
    if cpu_kernels.amx_usable():  # weight and bias gradients from one pass (weight_bias_grad)
        torch.testing.assert_close(fused[2].double(), exact, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(fused[3].double(), grad.double().sum((0, 1)), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(plain[2].double(), exact, rtol=2 ** -7, atol=1e-2)  # rounded to bf16


@needs_op
def test_frozen_input_and_weight():
    layer = nn.Linear(16, 8)
    layer.weight.requires_grad_(False)
    x = torch.randn(5, 16)  # no grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(layer, x)
    y.float().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None


def test_other_cases_call_the_layer():
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    assert linear(layer, x).grad_fn.name() == "AddmmBackward0"  # fp32: no autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(linear(layer, x), layer(x), rtol=0, atol=0)
    quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(linear(quantized, x), quantized(x), rtol=0, atol=0)
