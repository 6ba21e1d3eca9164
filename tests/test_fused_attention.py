"""nmt.models.fused_attention: the compiled attention against the explicit tensor-op path."""

from __future__ import annotations

import pytest
import torch

from nmt import cpu_kernels
from nmt.models import fused_attention
from nmt.models import heads as heads_module
from nmt.models.multihead import MultiHeadAttention, attend

needs_kernels = pytest.mark.skipif(cpu_kernels.extension() is None,
                                   reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason}")


def heads(batch: int, heads_: int, queries: int, keys: int, size: int, seed: int = 0):
    """q, k, v as the projections lay them out (strided [B, heads, len, D] views), a key mask with padding
    in the first sentence, and a gradient for the context."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads_, size, generator=gen).bfloat16().transpose(1, 2)
    k, v = torch.randn(batch, keys, 2, heads_, size, generator=gen).bfloat16().permute(2, 0, 3, 1, 4)
    key_mask = torch.ones(batch, keys, dtype=torch.bool)
    key_mask[0, keys - 3:] = False
    grad = torch.randn(batch, heads_, queries, size, generator=gen).bfloat16()
    return q, k, v, key_mask, grad


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def reference(q, k, v, key_mask, causal, grad, keep=None, drop_scale=1.0):
    """Context and gradients of the explicit path in fp32 (keep: a 0/1 dropout mask of the weights)."""
    inputs = leaves(*(t.float() for t in (q, k, v)))
    if keep is None:
        context, _ = attend(*inputs, key_mask, causal, use_sdpa=False)
    else:
        _, weights = attend(*inputs, key_mask, causal, use_sdpa=False, need_weights=True)
        context = (weights * keep * drop_scale) @ inputs[2]
    context.backward(grad.float())
    return [context, *(t.grad for t in inputs)]


def assert_close_to(ours: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for mine, ref in zip(ours, expected, strict=True):
        assert mine.dtype == torch.bfloat16
        torch.testing.assert_close(mine.float(), ref, rtol=2e-2, atol=1e-2 * ref.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("queries, keys, size", [(5, 5, 8), (7, 40, 8), (13, 13, 64), (1, 33, 64), (25, 17, 64),
                                                 (70, 70, 16), (3, 9, 2), (40, 70, 32), (33, 18, 96), (33, 5, 96)])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_values_and_gradients_match_the_explicit_path(queries, keys, size, masked, causal):
    """Sizes that are multiples of 32, with 17 or more queries and keys, take the AMX products where the CPU
    has AMX, queries and keys padded to whole 32 x 32 tiles; the others AVX512-BF16 dot products."""
    if causal and queries > keys:
        pytest.skip("the first queries would see no key: NaN in the explicit path (see the empty-row test)")
    q, k, v, key_mask, grad = heads(3, 2, queries, keys, size)
    key_mask = key_mask if masked else None
    inputs = leaves(q, k, v)
    assert fused_attention.applies(*inputs, 0.0)
    context = fused_attention.fused_attention(*inputs, key_mask, causal, size ** -0.5, 0.0)
    context.backward(grad)
    assert_close_to([context, *(t.grad for t in inputs)], reference(q, k, v, key_mask, causal, grad))


@needs_kernels
@pytest.mark.parametrize("causal", [True, False])
def test_dropout_drops_weights_at_the_rate_and_the_backward_uses_the_same_mask(causal):
    size = keys = 64
    q, _, _, key_mask, grad = heads(4, 2, 64, keys, size)
    k = torch.randn(4, 2, keys, size).bfloat16()
    v = torch.eye(keys).bfloat16().expand(4, 2, keys, size)  # context = the dropped weights themselves
    torch.manual_seed(3)
    inputs = leaves(q, k, v)
    context = fused_attention.fused_attention(*inputs, key_mask, causal, 0.125, 0.1)
    context.backward(grad)
    _, weights = attend(q.float(), k.float(), v.float(), key_mask, causal, use_sdpa=False, need_weights=True)
    allowed = weights > 0
    keep = (context.float() != 0) & allowed
    assert abs(1 - keep.sum().item() / allowed.sum().item() - 26 / 256) < 0.01  # p' = 26/256 for p = 0.1
    assert_close_to([context, *(t.grad for t in inputs)],
                    reference(q, k, v, key_mask, causal, grad, keep.float(), 256 / 230))
    torch.manual_seed(3)
    again = fused_attention.fused_attention(q, k, v, key_mask, causal, 0.125, 0.1)
    assert torch.equal(again, context.detach())  # the masks follow torch's generator


@needs_kernels
def test_a_query_without_keys_gets_zero_context_and_gradients():
    q, k, v, key_mask, grad = heads(2, 2, 3, 6, 8)
    key_mask[1] = False
    inputs = leaves(q, k, v)
    context = fused_attention.fused_attention(*inputs, key_mask, False, 0.3, 0.0)
    context.backward(grad)
    assert torch.all(context[1] == 0) and torch.all(inputs[1].grad[1] == 0) and torch.all(inputs[2].grad[1] == 0)
    assert context[0].abs().sum() > 0


@needs_kernels
def test_projection_gradients_match_with_the_kernel_and_without(monkeypatch):
    """Through MultiHeadAttention: the kernel's K|V gradient buffer passes _SplitKV unchanged."""
    torch.manual_seed(0)
    attention = MultiHeadAttention(16, 16, 16, 2)
    query, memory = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    key_mask = torch.ones(3, 7, dtype=torch.bool)
    key_mask[2, 4:] = False
    results = []
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(fused_attention, "applies", lambda *_: False)
        attention.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = attention(query, *attention.project_memory(memory), key_mask=key_mask)
        out.float().square().sum().backward()
        results.append([out.float(), *(p.grad.clone() for p in attention.parameters())])
    for ours, expected in zip(*results, strict=True):
        torch.testing.assert_close(ours, expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())


def test_only_bf16_cpu_training_uses_the_kernel(monkeypatch):
    monkeypatch.setattr(fused_attention, "fused_attention", lambda *a: pytest.fail("kernel path taken"))
    q, k, v, key_mask, _ = heads(2, 2, 4, 4, 8)
    attend(*leaves(q.float(), k.float(), v.float()), key_mask, True, use_sdpa=False)  # fp32
    attend(q, k, v, key_mask, True, use_sdpa=False)  # no backward to come
    _, weights = attend(*leaves(q, k, v), key_mask, True, use_sdpa=False, need_weights=True)  # weights asked for
    assert weights.dtype == torch.float32
    attend(*leaves(q, k, v), key_mask, True, dropout=0.01, use_sdpa=False)  # p needs more than 8-bit lanes
    odd = heads(2, 2, 4, 4, 7)
    attend(*leaves(*odd[:3]), odd[3], True, use_sdpa=False)  # an odd head size


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "tensor-ops"])
def test_self_attention_from_the_joint_projection_equals_the_two_projections(kernel, monkeypatch):
    """project_self in training: one Q|K|V product; values and gradients as from project_query + project_memory
    (with the kernel, its Q|K|V gradient buffer passes split_heads unchanged)."""
    if kernel and cpu_kernels.extension() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.unavailable_reason}")
    if not kernel:
        monkeypatch.setattr(fused_attention, "applies", lambda *_: False)
    torch.manual_seed(0)
    attention = MultiHeadAttention(16, 16, 16, 2)
    x = torch.randn(3, 5, 16)
    key_mask = torch.ones(3, 5, dtype=torch.bool)
    key_mask[2, 3:] = False
    results = []
    for joint in (True, False):
        attention.zero_grad()
        x_in = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q, k, v = attention.project_self(x_in) if joint else (attention.project_query(x_in),
                                                                  *attention.project_memory(x_in))
            assert heads_module.in_joint_layout((q, k, v)) == joint
            out, _ = attention.attend_projected(q, k, v, key_mask=key_mask, causal=True)
        out.float().square().sum().backward()
        results.append([out.float(), x_in.grad, *(p.grad.clone() for p in attention.parameters())])
    for ours, expected in zip(*results, strict=True):
        torch.testing.assert_close(ours, expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())
    with torch.no_grad():  # decoding: the two projections as they are
        assert not heads_module.in_joint_layout(attention.project_self(x))


def test_joint_layout_of_heads_and_their_gradient_buffers():
    rows = torch.randn(2, 5, 3 * 16, requires_grad=True)
    q, k, v = heads_module.heads_of(rows.detach(), 3, 4)
    assert q.shape == (2, 4, 5, 4) and heads_module.in_joint_layout((q, k, v))
    assert not heads_module.in_joint_layout((k, q, v)) and not heads_module.in_joint_layout((q, k))
    assert heads_module.parts_of_one_buffer((q, k, v)).data_ptr() == rows.data_ptr()
    grads = heads_module.gradient_buffer(q, 3)
    buffer = heads_module.parts_of_one_buffer(grads)
    assert buffer.shape == (2, 5, 3, 4, 4) and buffer.is_contiguous()
    assert heads_module.parts_of_one_buffer(tuple(g.clone() for g in grads)) is None
    for g in grads:
        g.copy_(torch.randn_like(g))
    parts = heads_module.split_heads(rows, 3, 4)
    torch.autograd.backward(parts, grads)
    reference = torch.stack([g.transpose(1, 2) for g in grads], dim=2).reshape(2, 5, 48)
    assert torch.equal(rows.grad, reference)
    rows.grad = None
    torch.autograd.backward(parts, [g.clone() for g in grads])  # separate tensors: assembled by copies
    assert torch.equal(rows.grad, reference)
