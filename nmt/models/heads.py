"""The attention heads of a joint projection: [B, S, parts * hidden] rows (K|V, or Q|K|V for self-attention)
read as `parts` views [B, heads, S, d_head] of the layout [B, S, parts, heads, d_head], and their gradients
written back into that layout in one buffer.

`nmt/csrc/attention.cpp` reads the heads in place from such rows and its backward writes their gradients
into the given strided tensors; when those are the parts of one buffer in this layout (`parts_of_one_buffer`),
the buffer is the projection's output gradient as it stands, and `split_heads`' backward hands it on without
a copy (`unbind`'s backward would stack the parts and copy the stack into the layout: two passes and a
concatenation).
"""

from __future__ import annotations

from typing import Any

import torch


def heads_of(rows: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """[B, S, parts * heads * d_head] -> `parts` views [B, heads, S, d_head] (no autograd function)."""
    b, s, size = rows.shape
    return tuple(rows.view(b, s, parts, heads, size // (parts * heads)).permute(2, 0, 3, 1, 4).unbind(0))


def gradient_buffer(like: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
    """`parts` uninitialised [B, heads, S, d_head] tensors (the shape of `like`) that are the parts of one new
    [B, S, parts, heads, d_head] buffer."""
    b, h, s, d = like.shape
    return tuple(like.new_empty(b, s, parts, h, d).permute(2, 0, 3, 1, 4).unbind(0))


def in_joint_layout(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether the [B, heads, S, d_head] tensors are, in order, the parts of one [B, S, parts, heads, d_head]
    layout (as `heads_of` splits joint rows)."""
    first = tensors[0]
    if first.dim() != 4:
        return False
    b, h, s, d = first.shape
    p = len(tensors)
    strides = (s * p * h * d, d, p * h * d, 1)
    step = h * d * first.element_size()
    return all(t.shape == first.shape and t.stride() == strides and t.data_ptr() == first.data_ptr() + i * step
               for i, t in enumerate(tensors))


def parts_of_one_buffer(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The contiguous [B, S, len(tensors), heads, d_head] buffer whose parts the tensors are, in order (as
    `gradient_buffer` makes them); None when they are not."""
    base = tensors[0]._base
    if base is None or not in_joint_layout(tensors) or not base.is_contiguous():
        return None
    first = tensors[0]
    if base.data_ptr() != first.data_ptr() or base.numel() != first.numel() * len(tensors):
        return None
    return base


class _SplitHeads(torch.autograd.Function):
    """rows [B, S, parts * hidden] -> `parts` views [B, heads, S, d_head]; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
        ctx.shape = rows.shape
        return heads_of(rows, parts, heads)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # autograd materialises the gradient of an unused output as zeros: all are tensors
        buffer = parts_of_one_buffer(grads)
        if buffer is None:  # not written so by the attention kernel's backward: assemble the layout
            buffer = grads[0].new_empty(ctx.shape[0], ctx.shape[1], len(grads), grads[0].size(1), grads[0].size(3))
            for i, grad in enumerate(grads):
                buffer[:, :, i].copy_(grad.transpose(1, 2))
        return buffer.reshape(ctx.shape), None, None


def split_heads(rows: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """rows [B, S, parts * hidden] -> `parts` views [B, heads, S, d_head] (`heads_of`), whose backward passes
    a gradient buffer in the rows' layout on without a copy."""
    return _SplitHeads.apply(rows, parts, heads)
