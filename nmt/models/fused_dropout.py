"""Dropout (+ residual) on bf16 CPU tensors as one compiled kernel, where `nmt.cpu_kernels` is available.

`nmt/models/dropout.py` builds a 0/1 mask with a few tensor ops and applies it with `addcmul`; drawing
and building the mask is most of the cost (3.5 ms of 4 ms for a [4096, 1024] bf16 tensor on 2 Sapphire
Rapids cores). `nmt/csrc/dropout.cpp` draws the random bits with a counter-based generator (splitmix64
of a seed + the element's index) inside the same pass that applies them, keeps the mask as bits for the
backward, and writes `residual + x * keep * scale` directly; the feed-forward's ReLU + activation
dropout is a second kernel whose backward needs only its output. Same keep rule and probability as the
tensor-op path (8-bit lanes, p' = threshold / 256); the seed of every call is drawn from torch's default
CPU generator, so `torch.manual_seed` and checkpointed RNG states still make the masks reproducible
(they differ from the tensor-op path's masks, and do not depend on the thread count). Where the
extension cannot be built (see `nmt.cpu_kernels`), callers keep the tensor-op path.
"""

from __future__ import annotations

from typing import Any

import torch

from nmt import cpu_kernels


def draw_seed() -> int:
    """The kernel's seed for one call, from torch's default CPU generator (manual_seed, resume)."""
    return int(torch.randint(-(2**62), 2**62, (), dtype=torch.int64))


def usable(x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether `fused_dropout(x, residual, ...)` applies: bf16 CPU tensors of one shape (with 8-bit lanes:
    `dropout.byte_lane_rule`)."""
    if residual is not None and residual.shape != x.shape:
        return False
    return cpu_kernels.usable_on(x, *([] if residual is None else [residual]))


class _FusedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, residual: torch.Tensor | None, x: torch.Tensor, threshold: int,
                scale: float) -> torch.Tensor:
        seed = draw_seed()
        residual = None if residual is None else residual.contiguous()
        out, bits = cpu_kernels.extension().dropout_forward(x.contiguous(), residual, threshold, scale, seed)
        ctx.save_for_backward(bits)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        (bits,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = cpu_kernels.extension().dropout_backward(grad.contiguous(), bits, ctx.scale)
        return (grad if ctx.needs_input_grad[0] else None), grad_x, None, None


def fused_dropout(x: torch.Tensor, residual: torch.Tensor | None, threshold: int, scale: float) -> torch.Tensor:
    """residual + x * keep * scale (residual None: x * keep * scale), keep = lane >= threshold; see `usable`."""
    return _FusedDropout.apply(residual, x, threshold, scale)


class _FusedReluDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
        seed = draw_seed()
        out = cpu_kernels.extension().relu_dropout_forward(x.contiguous(), threshold, scale, seed)
        ctx.save_for_backward(out)  # the next layer keeps it anyway: no extra memory
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (out,) = ctx.saved_tensors
        return cpu_kernels.extension().relu_dropout_backward(grad.contiguous(), out, ctx.scale), None, None


def fused_relu_dropout(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """relu(x) * keep * scale in one pass; see `usable`."""
    return _FusedReluDropout.apply(x, threshold, scale)
