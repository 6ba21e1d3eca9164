"""Dropout with cheaper masks on the CPU, and dropout fused with the residual addition.

torch's CPU dropout draws one Bernoulli sample per element (`bernoulli_`), about 5 ms per million
elements on one Sapphire Rapids core, more than the matmuls of a small Transformer layer. Here the
mask comes from raw random bits instead: one 64-bit draw of torch's generator (`random_`) gives four
16-bit lanes, and a lane keeps its element when its low 15 bits are >= p * 2^15. The keep/drop
decision is turned into the bit pattern of 1.0 or 0.0 in the data's own dtype with integer ops
(a subtraction whose sign bit says "drop", an arithmetic shift that spreads it, an AND with the bits of
1.0), so the mask is a 0/1 tensor of the input's dtype, built in about a quarter of the time, and
dropout is one `addcmul` (x * mask * 1/(1-p')) forward and backward.

Semantics: each element is kept independently with probability 1 - p', where p' = round(p * R) / R is p
rounded to the lane's resolution R (2^15 for 16-bit dtypes, 2^31 for fp32, 2^63 for fp64; p' - p is at
most 1.5e-5), and kept elements are scaled by 1 / (1 - p'), so E[dropout(x)] = x exactly as with
`torch.nn.functional.dropout`. Masks come from torch's default CPU generator: `torch.manual_seed`
makes them reproducible and checkpointed RNG states resume them. On other devices (and in eval mode,
or with p = 0) these functions are torch's own dropout (or the identity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# dtype size in bytes -> (integer dtype of the same size, number of random bits used per element)
_LANES = {2: (torch.int16, 15), 4: (torch.int32, 31), 8: (torch.int64, 63)}


def _one_bits(dtype: torch.dtype, int_dtype: torch.dtype) -> int:
    return int(torch.ones((), dtype=dtype).view(int_dtype))


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """(mask, scale): a 0/1 tensor of `shape` and `dtype` whose elements are 1 with probability 1 - p'
    (see the module docstring), and scale = 1 / (1 - p'). CPU floating dtypes of 2, 4 or 8 bytes."""
    int_dtype, bits = _LANES[torch.empty((), dtype=dtype).element_size()]
    numel = 1
    for size in shape:
        numel *= size
    lanes_per_word = 8 // int_dtype.itemsize
    words = torch.empty(-(-numel // lanes_per_word), dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1)  # the full 64-bit range: every lane uniform
    lanes = words.view(int_dtype)[:numel]
    resolution = 1 << bits
    threshold = min(max(round(p * resolution), 0), resolution - 1)
    # low `bits` bits u in [0, 2^bits); u - threshold < 0 (drop) sets the sign bit; >> spreads it over the
    # lane (all ones = drop, 0 = keep); NOT turns it into the keep mask; AND gives 1.0 or 0.0.
    lanes.bitwise_and_(resolution - 1).sub_(threshold).bitwise_right_shift_(bits)
    lanes.bitwise_not_().bitwise_and_(_one_bits(dtype, int_dtype))
    return lanes.view(dtype).view(shape), resolution / (resolution - threshold)


def _fast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.is_floating_point() and x.element_size() in _LANES


def cpu_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """dropout_mask for x's shape and dtype; fp32/fp64 masks are made from 16-bit lanes and converted
    (exact 0/1, half the random bits: faster than 32-bit lanes)."""
    if x.element_size() > 2:
        mask, scale = dropout_mask(x.shape, p, torch.bfloat16, x.device)
        return mask.to(x.dtype), scale
    return dropout_mask(x.shape, p, x.dtype, x.device)


class _MaskedScale(torch.autograd.Function):
    """residual + x * mask * scale (residual None: x * mask * scale); one addcmul forward and backward."""

    @staticmethod
    def forward(ctx, residual: torch.Tensor | None, x: torch.Tensor, mask: torch.Tensor,
                scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        ctx.residual_shape = None if residual is None else residual.shape
        base = residual if residual is not None else x.new_zeros(())
        return torch.addcmul(base, x, mask, value=scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        grad_x = torch.addcmul(grad.new_zeros(()), grad, mask, value=ctx.scale) if ctx.needs_input_grad[1] else None
        grad_residual = None
        if ctx.needs_input_grad[0]:
            grad_residual = grad if grad.shape == ctx.residual_shape else grad.sum_to_size(ctx.residual_shape)
        return grad_residual, grad_x, None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`torch.nn.functional.dropout(x, p, training)` with the cheaper CPU masks."""
    if not training or p == 0.0:
        return x
    if not _fast(x) or p >= 1.0:
        return F.dropout(x, p, training=True)
    mask, scale = cpu_mask(x, p)
    return _MaskedScale.apply(None, x, mask, scale)


def dropout_add(residual: torch.Tensor, x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """residual + dropout(x, p), fused on the CPU.

    x is first converted to the residual's dtype when they differ (a bf16 sublayer output under
    autocast, an fp32 residual stream): mixed-dtype elementwise ops take a slow path on the CPU, 3-8x
    slower than converting and adding. The result has the residual's dtype.
    """
    if x.dtype != residual.dtype and x.device.type == "cpu":
        x = x.to(residual.dtype)
    if not training or p == 0.0:
        return residual + x
    if not _fast(x) or p >= 1.0:
        return residual + F.dropout(x, p, training=True)
    mask, scale = cpu_mask(x, p)
    if residual.shape != x.shape:
        residual = residual.expand(torch.broadcast_shapes(residual.shape, x.shape))
    return _MaskedScale.apply(residual, x, mask, scale)


class Dropout(nn.Dropout):
    """Drop-in replacement for `torch.nn.Dropout` (same constructor, no parameters or buffers, so
    checkpoints are unaffected) using `dropout` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)
