"""Dropout with cheaper masks on the CPU, and dropout fused with the residual addition.

torch's CPU dropout draws one Bernoulli sample per element (`bernoulli_`), about 5 ms per million
elements on one Sapphire Rapids core, more than the matmuls of a small Transformer layer. Here the
mask comes from raw random bits instead: one 64-bit draw of torch's generator (`random_`) gives eight
8-bit lanes (or four 15-bit ones, see below), and a lane u keeps its element when u >= p * 2^bits. The
keep/drop decision is turned into the bit pattern of 1.0 or 0.0 in the data's own dtype with integer
ops (a subtraction whose sign bit says "drop", an arithmetic shift that spreads it, an AND with the
bits of 1.0), so the mask is a 0/1 tensor of the input's dtype, built in about a sixth of the time, and
dropout is one `addcmul` (x * mask * 1/(1-p')) forward and backward. Drawing the random bits is most
of the cost, so the fewest bits that represent p closely are used.

Semantics: each element is kept independently with probability 1 - p', where p' = round(p * R) / R is p
rounded to the lanes' resolution R: 2^8 when that moves p by at most 2% of p (p = 0.1 -> 26/256 =
0.1016, p = 0.3 -> 77/256 = 0.3008), else 2^15 (p' - p at most 1.5e-5). Kept elements are scaled by
1 / (1 - p'), so E[dropout(x)] = x exactly as with `torch.nn.functional.dropout`. Masks come from
torch's default CPU generator: `torch.manual_seed` makes them reproducible and checkpointed RNG states
resume them. On other devices (and in eval mode, or with p = 0) these functions are torch's own
dropout (or the identity). For bf16 tensors with 8-bit lanes, `nmt/models/fused_dropout.py` does the
same in one compiled pass where the machine can build it (same keep rule; other random draws).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmt.models import fused_dropout

# dtype size in bytes -> the integer dtype of the same size (the mask is built in its bit patterns)
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}
# random bits per element, fewest first, and how far (relative to p) the rounded p' may be from p
_LANE_BITS = (8, 15)
_MAX_RELATIVE_ROUNDING = 0.02


def _one_bits(dtype: torch.dtype, int_dtype: torch.dtype) -> int:
    return int(torch.ones((), dtype=dtype).view(int_dtype))


def _lane_bits_and_threshold(p: float) -> tuple[int, int]:
    """(bits, threshold): the fewest random bits per element whose resolution rounds p to within 2% of
    it (the last choice otherwise), and the drop threshold round(p * 2^bits) for them."""
    for bits in _LANE_BITS:
        resolution = 1 << bits
        threshold = min(max(round(p * resolution), 0), resolution - 1)
        if abs(threshold / resolution - p) <= _MAX_RELATIVE_ROUNDING * p:
            break
    return bits, threshold


def _random_lanes(numel: int, bits: int, int_dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """numel independent uniform integers in [0, 2^bits) as `int_dtype`, cut from 64-bit draws."""
    lane_dtype = torch.uint8 if bits <= 8 else torch.int16
    lanes_per_word = 8 // lane_dtype.itemsize
    words = torch.empty(-(-numel // lanes_per_word), dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1)  # the full 64-bit range: every lane uniform
    lanes = words.view(lane_dtype)[:numel]
    if lane_dtype != torch.uint8:
        lanes.bitwise_and_((1 << bits) - 1)  # uint8 lanes are already in [0, 2^8)
    return lanes.to(int_dtype)  # no copy when the lanes already have the mask's width


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """(mask, scale): a 0/1 tensor of `shape` and `dtype` whose elements are 1 with probability 1 - p'
    (see the module docstring), and scale = 1 / (1 - p'). CPU floating dtypes of 2, 4 or 8 bytes."""
    int_dtype = _INT_OF_SIZE[torch.empty((), dtype=dtype).element_size()]
    numel = 1
    for size in shape:
        numel *= size
    bits, threshold = _lane_bits_and_threshold(p)
    lanes = _random_lanes(numel, bits, int_dtype, device)
    # u - threshold < 0 (drop) sets the sign bit; >> bits spreads it over the lane (all ones = drop,
    # 0 = keep: |u - threshold| < 2^bits); NOT turns it into the keep mask; AND gives 1.0 or 0.0.
    lanes.sub_(threshold).bitwise_right_shift_(bits)
    lanes.bitwise_not_().bitwise_and_(_one_bits(dtype, int_dtype))
    return lanes.view(dtype).view(shape), _scale(bits, threshold)


def _scale(bits: int, threshold: int) -> float:
    """1 / (1 - p') for the keep rule lane >= threshold over `bits`-bit lanes."""
    resolution = 1 << bits
    return resolution / (resolution - threshold)


def byte_lane_rule(p: float) -> tuple[int, float] | None:
    """(threshold, scale) of the compiled kernels' keep rule (8-bit lanes) when it is this module's rule
    for p (p rounded to within 2% by 8 bits), else None."""
    bits, threshold = _lane_bits_and_threshold(p)
    return (threshold, _scale(bits, threshold)) if bits == 8 else None


def _kernel_rule(x: torch.Tensor, residual: torch.Tensor | None, p: float) -> tuple[int, float] | None:
    """(threshold, scale) for `fused_dropout`'s kernels when they apply to x (and residual), else None."""
    rule = byte_lane_rule(p)
    return rule if rule and fused_dropout.usable(x, residual) else None


def _fast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.is_floating_point() and x.element_size() in _INT_OF_SIZE


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
    rule = _kernel_rule(x, None, p)
    if rule:
        return fused_dropout.fused_dropout(x, None, *rule)
    mask, scale = dropout_mask(x.shape, p, x.dtype, x.device)
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
    rule = _kernel_rule(x, residual, p)
    if rule:
        return fused_dropout.fused_dropout(x, residual, *rule)
    mask, scale = dropout_mask(x.shape, p, x.dtype, x.device)
    if residual.shape != x.shape:
        residual = residual.expand(torch.broadcast_shapes(residual.shape, x.shape))
    return _MaskedScale.apply(residual, x, mask, scale)


def relu_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`dropout(relu(x), p, training)`, one compiled pass for bf16 where `fused_dropout` is usable."""
    rule = _kernel_rule(x, None, p) if training and 0.0 < p < 1.0 and _fast(x) else None
    if rule:
        return fused_dropout.fused_relu_dropout(x, *rule)
    return dropout(F.relu(x), p, training)


class Dropout(nn.Dropout):
    """Drop-in replacement for `torch.nn.Dropout` (same constructor, no parameters or buffers, so
    checkpoints are unaffected) using `dropout` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)
