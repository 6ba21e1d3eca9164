"""nmt.models.attention_softmax: the compiled masked softmax against the explicit tensor-op attention."""

from __future__ import annotations

import pytest
import torch

from nmt import cpu_kernels
from nmt.models import attention_softmax
from nmt.models.multihead import attend

needs_kernels = pytest.mark.skipif(cpu_kernels.extension() is None,
                                   reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason}")


def qkv(batch: int, queries: int, keys: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, 2, n, 8, generator=gen).bfloat16() for n in (queries, keys, keys))
    key_mask = torch.ones(batch, keys, dtype=torch.bool)
    key_mask[0, keys - 3:] = False  # padding keys in the first sentence
    return q, k, v, key_mask


@needs_kernels
@pytest.mark.parametrize("queries, keys", [(5, 5), (7, 40), (1, 33), (3, 9)])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_values_and_gradients_match_the_tensor_op_path(monkeypatch, queries, keys, masked, causal):
    q, k, v, key_mask = qkv(3, queries, keys)
    grad = torch.randn(3, 2, queries, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
    results = []
    for with_kernels in (True, False):
        if not with_kernels:
            monkeypatch.setattr(attention_softmax, "applies", lambda _: False)
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        context, _ = attend(*inputs, key_mask if masked else None, causal, use_sdpa=False)
        context.backward(grad)
        results.append([context, *(t.grad for t in inputs)])
    for ours, reference in zip(*results, strict=True):
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours, reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())


@needs_kernels
def test_weights_are_a_masked_softmax_and_empty_rows_are_zero():
    scores = torch.randn(2, 1, 3, 35).bfloat16()
    key_mask = torch.ones(2, 35, dtype=torch.bool)
    key_mask[1] = False  # nothing to attend to in the second sentence
    key_mask[0, 30:] = False
    weights = attention_softmax.attention_softmax(scores, key_mask, True, 0.5)
    expected = torch.softmax((scores[0].float() * 0.5).masked_fill(~torch.ones(3, 35, dtype=torch.bool).tril(32)
                                                                   | ~key_mask[0], float("-inf")), -1)
    torch.testing.assert_close(weights[0].float(), expected, rtol=8e-3, atol=1e-6)
    assert torch.all(weights[1] == 0) and weights.dtype == torch.bfloat16


def test_only_bf16_cpu_training_uses_the_kernel(monkeypatch):
    monkeypatch.setattr(attention_softmax, "attention_softmax", lambda *a: pytest.fail("kernel path taken"))
    q, k, v, key_mask = qkv(2, 4, 4)
    attend(q.float(), k.float(), v.float(), key_mask, True, use_sdpa=False)  # fp32
    _, weights = attend(q, k, v, key_mask, True, use_sdpa=False, need_weights=True)  # the weights asked for
    assert weights.dtype == torch.float32
