"""The compiled bf16 dropout kernel: its documented random draws, values, gradients and the fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nmt import cpu_kernels
from nmt.models import dropout as dropout_module
from nmt.models import fused_dropout
from nmt.models.dropout import dropout, dropout_add
from nmt.models.transformer import FeedForward, TransformerOptions

needs_kernel = pytest.mark.skipif(cpu_kernels.extension() is None,
                                  reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason}")


def splitmix64(words: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = words + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def count_calls(monkeypatch, module, name: str) -> list:
    """Replace module.name with a wrapper that records each call; returns the record."""
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: calls.append(args) or original(*args))
    return calls


def keep_from_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    words = bits.numpy().view(np.uint64)
    keep = (words[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    return torch.from_numpy(keep.reshape(-1)[:n].astype(np.float32))


@needs_kernel
@pytest.mark.parametrize("n", [64, 130, 37_000])
def test_element_i_keeps_byte_i_mod_8_of_splitmix64_of_seed_plus_i_div_8(n):
    seed, threshold = 123_456_789, 77
    x = torch.randn(n).bfloat16()
    _, bits = cpu_kernels.extension().dropout_forward(x, None, threshold, 1.0, seed)
    words = splitmix64(np.uint64(seed) + np.arange((n + 7) // 8, dtype=np.uint64))
    lanes = words.view(np.uint8)[:n]  # little endian: byte j of word w is element 8w + j
    expected = torch.from_numpy((lanes >= threshold).astype(np.float32))
    assert torch.equal(keep_from_bits(bits, n), expected)


@needs_kernel
@pytest.mark.parametrize("with_residual", [True, False])
def test_values_and_gradient_are_residual_plus_x_times_keep_times_scale(with_residual):
    n, threshold, scale = 1000 * 37, 26, 256 / 230
    x, residual, grad = (torch.randn(1000, 37).bfloat16() for _ in range(3))
    out, bits = cpu_kernels.extension().dropout_forward(x, residual if with_residual else None, threshold, scale, 5)
    keep = keep_from_bits(bits, n).view(1000, 37)
    dropped = x.float() * keep * scale
    expected = (residual.float() + dropped) if with_residual else dropped
    assert torch.equal(out, expected.bfloat16())
    grad_x = cpu_kernels.extension().dropout_backward(grad, bits, scale)
    assert torch.equal(grad_x, (grad.float() * keep * scale).bfloat16())


@needs_kernel
def test_keep_rate_and_independent_lanes():
    _, bits = cpu_kernels.extension().dropout_forward(torch.zeros(1 << 20).bfloat16(), None, 128, 2.0, 99)
    keep = keep_from_bits(bits, 1 << 20).view(-1, 8)
    torch.testing.assert_close(keep.mean(0), torch.full((8,), 0.5), atol=5e-3, rtol=0)
    pairs = (keep[:, :-1] * keep[:, 1:]).mean(0)
    torch.testing.assert_close(pairs, torch.full((7,), 0.25), atol=5e-3, rtol=0)


@needs_kernel
def test_bf16_dropout_goes_through_the_kernel_and_follows_torch_manual_seed(monkeypatch):
    calls = count_calls(monkeypatch, fused_dropout, "fused_dropout")
    x = torch.randn(64, 50).bfloat16().requires_grad_()
    residual = torch.randn(64, 50).bfloat16().requires_grad_()
    torch.manual_seed(3)
    a = dropout_add(residual, x, 0.3)
    torch.manual_seed(3)
    b = dropout_add(residual, x, 0.3)
    c = dropout(x, 0.1)
    assert len(calls) == 3 and torch.equal(a, b) and not torch.equal(a - residual, c)
    grad = torch.randn(64, 50).bfloat16()
    a.backward(grad)
    assert torch.equal(residual.grad, grad)
    x.grad = None
    c.backward(grad)
    kept = c.detach() != 0  # x is never 0 here
    assert torch.equal(x.grad, torch.where(kept, grad.float() * 256 / 230, 0.0).bfloat16())
    # fp32, broadcast residuals and 15-bit lanes keep the tensor-op path
    dropout(torch.randn(8, 8), 0.3)
    dropout_add(torch.randn(8, 1).bfloat16(), torch.randn(8, 8).bfloat16(), 0.3)
    dropout(torch.randn(8, 8).bfloat16(), 0.01)
    assert len(calls) == 3


def test_without_the_kernel_bf16_dropout_uses_the_tensor_ops(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "extension", lambda: None)
    masks = count_calls(monkeypatch, dropout_module, "dropout_mask")
    y = dropout(torch.ones(32, 32).bfloat16(), 0.3)
    assert len(masks) == 1 and torch.equal(y.unique(), torch.tensor([0.0, 256 / 179]).bfloat16())


@needs_kernel
def test_relu_dropout_keeps_the_same_draws_and_its_output_gives_the_gradient():
    n, threshold, scale, seed = 1000 * 37, 26, 256 / 230, 77
    x, grad = torch.randn(1000, 37).bfloat16(), torch.randn(1000, 37).bfloat16()
    out = cpu_kernels.extension().relu_dropout_forward(x, threshold, scale, seed)
    _, bits = cpu_kernels.extension().dropout_forward(x, None, threshold, scale, seed)  # the same draws
    keep = keep_from_bits(bits, n).view(1000, 37)
    assert torch.equal(out, (x.float().clamp(min=0) * keep * scale).bfloat16())
    grad_x = cpu_kernels.extension().relu_dropout_backward(grad, out, scale)
    assert torch.equal(grad_x, (grad.float() * keep * (x > 0) * scale).bfloat16())


@pytest.mark.parametrize("with_kernel", [True, False])
def test_feed_forward_relu_dropout_in_training_and_eval(monkeypatch, with_kernel):
    if with_kernel and cpu_kernels.extension() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.unavailable_reason}")
    if not with_kernel:
        monkeypatch.setattr(cpu_kernels, "extension", lambda: None)
    calls = count_calls(monkeypatch, fused_dropout, "fused_relu_dropout")
    torch.manual_seed(0)
    ff = FeedForward(TransformerOptions(d_model=16, ff_size=64, activation_dropout=0.1)).bfloat16()
    x = torch.randn(4, 5, 16).bfloat16()
    hidden = torch.relu(ff.inner(x))
    ff.eval()
    assert torch.equal(ff(x), ff.outer(hidden))
    ff.train()
    y = ff(x)
    assert len(calls) == int(with_kernel) and y.shape == (4, 5, 16)
    y.sum().backward()
    assert ff.inner.weight.grad is not None and torch.isfinite(ff.inner.weight.grad.float()).all()
