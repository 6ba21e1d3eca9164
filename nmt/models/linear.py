"""`linear(layer, x)`: a Linear layer of a bf16 CPU training step with its bias added inside the matmul.

Under bf16 autocast torch's CPU `addmm` adds the bias by first copying it into every row of the output
and then running the matmul with beta = 1, so the output is written and read once more (in profiles of
the d256 recipe's training step on 2 Sapphire Rapids cores, `aten::copy_` took 24 ms per update before
this path and 10 ms after; docs/benchmarks.md, seventh round).
oneDNN's linear primitive, which torch exposes as `torch.ops.mkldnn._linear_pointwise` (the op its own
compiler emits for CPU linears), adds the bias in the matmul's epilogue; it has no backward, so
`_FusedBiasLinear` gives it addmm's, with one difference: with nmt's compiled kernels the bias gradient
is an fp32 sum where addmm's backward rounds it to bf16 (`_bias_grad`), and with AMX the weight gradient
too, both from one pass over the output gradient (`weight_bias_grad`; else `weight_gradient`).
Measured in the d256 recipe's training step (docs/benchmarks.md, seventh and eighth rounds): outputs
and input gradients equal, the step 3-4% faster with the fused bias, another 3-6% with the AMX weight
gradients and 1-5% with their shared pass. Every other case (fp32, fp16, no grad, GPUs, quantized
layers, a torch without that op) calls the layer itself.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from nmt import cpu_kernels


@functools.cache
def _fused_op() -> Any | None:
    """oneDNN's linear op, when this torch has it and this CPU runs oneDNN's bf16 kernels (the check torch
    makes before its own bf16 matmuls go to oneDNN), tried once on a small input."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        x, w, b = (torch.ones(shape, dtype=torch.bfloat16) for shape in ((2, 32), (16, 32), (16,)))
        if not torch.equal(op(x, w, b, "none", [], ""), torch.nn.functional.linear(x, w, b)):
            return None
    except (AttributeError, RuntimeError):
        return None
    return op


def _applies(weight: torch.Tensor, x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and torch.is_grad_enabled()
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and weight.dtype == torch.float32 and torch.backends.mkldnn.enabled
            and _fused_op() is not None)


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`; a float `nn.Linear` in a bf16-autocast CPU step with grad goes through oneDNN's
    linear with the bias in its epilogue (see the module docstring)."""
    if type(layer) is not nn.Linear:
        return layer(x)
    return linear_with(layer.weight, layer.bias, x)


def linear_with(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`torch.nn.functional.linear(x, weight, bias)`, through oneDNN's linear with the bias in its epilogue
    in a bf16-autocast CPU step with grad (see the module docstring)."""
    if not _applies(weight, x):
        return torch.nn.functional.linear(x, weight, bias)
    with torch.autocast("cpu", enabled=False):
        return _FusedBiasLinear.apply(x.to(torch.bfloat16), weight, bias)


def _amx_applies(rows: torch.Tensor, x: torch.Tensor) -> bool:
    return (rows.size(1) % 32 == 0 and x.size(1) % 32 == 0 and cpu_kernels.usable_on(rows, x)
            and cpu_kernels.amx_usable())


def weight_gradient(rows: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """rows^T x [N, K] in fp32 from an output gradient [M, N] and an input [M, K], added onto `out` (fp32
    [N, K]) when given. bf16 operands on a CPU with AMX go through `nmt.cpu_kernels`' weight_grad (N, K
    multiples of 32; the sums stay in fp32: no matmul library has this layout's fp32 output on the CPU);
    anything else through torch's matmul (its result in the operands' dtype, as addmm's backward)."""
    if _amx_applies(rows, x):
        return cpu_kernels.extension().weight_grad(rows.contiguous(), x.contiguous(), out)
    part = torch.mm(rows.t(), x).float()
    return part if out is None else out.add_(part)


def _bias_grad(rows: torch.Tensor) -> torch.Tensor:
    """The fp32 column sums of the bf16 output gradient [rows, N]: `nmt.cpu_kernels`' one pass over the rows
    when available (sums kept in fp32), else torch's sum (rounded to bf16 as addmm's backward does)."""
    if cpu_kernels.usable_on(rows):
        return cpu_kernels.extension().column_sums(rows.contiguous())
    return rows.sum(0).float()


class _FusedBiasLinear(torch.autograd.Function):
    """x @ weight.T + bias in bf16 (fp32 weight and bias cast as autocast would); addmm's gradients, those of
    the weight and bias kept in fp32."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = weight.to(torch.bfloat16)
        b = None if bias is None else bias.to(torch.bfloat16)
        x = x.contiguous()
        ctx.save_for_backward(x, w)
        return _fused_op()(x, w, b, "none", [], "")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        rows = grad.reshape(-1, grad.size(-1))
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(rows, w).view(*grad.shape[:-1], w.size(1))
        x = x.reshape(-1, x.size(-1))
        if ctx.needs_input_grad[1] and ctx.needs_input_grad[2] and _amx_applies(rows, x):
            # both from one pass over the output gradient
            grad_w, grad_b = cpu_kernels.extension().weight_bias_grad(rows.contiguous(), x.contiguous())
            return grad_x, grad_w, grad_b
        if ctx.needs_input_grad[1]:
            grad_w = weight_gradient(rows, x)
        if ctx.needs_input_grad[2]:
            grad_b = _bias_grad(rows)
        return grad_x, grad_w, grad_b
