"""nmt.models.layer_norm: the compiled bf16 LayerNorm against torch's, values and gradients."""

from __future__ import annotations

import pytest
import torch

from nmt import cpu_kernels
from nmt.models.layer_norm import LayerNorm

needs_kernels = pytest.mark.skipif(cpu_kernels.extension() is None,
                                   reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason}")


def norms(size: int, seed: int = 0) -> tuple[LayerNorm, torch.nn.LayerNorm]:
    ours, reference = LayerNorm(size), torch.nn.LayerNorm(size)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (ours, reference):
            module.weight.copy_(1 + 0.3 * torch.randn(size, generator=torch.Generator().manual_seed(seed)))
            module.bias.copy_(0.1 * torch.randn(size, generator=torch.Generator().manual_seed(seed + 1)))
    x = (3 + 2 * torch.randn(7, 5, size, generator=gen)).bfloat16()
    return ours, reference, x


@needs_kernels
@pytest.mark.parametrize("size", [256, 37, 64, 300])  # whole and partial 32-lane blocks
def test_bf16_values_and_gradients_match_fp32_arithmetic(size):
    """Against torch's LayerNorm run in fp32 on the same (bf16) values: outputs one bf16 rounding apart,
    parameter gradients to fp32 rounding (torch's own bf16 path is off by up to 0.1 in them here)."""
    ours, reference, x = norms(size)
    grad = torch.randn(7, 5, size, generator=torch.Generator().manual_seed(3)).bfloat16()
    x_ours, x_ref = x.clone().requires_grad_(), x.float().requires_grad_()
    y = ours(x_ours)
    y.backward(grad)
    ry = reference(x_ref)
    ry.backward(grad.float())
    assert y.dtype == x_ours.grad.dtype == torch.bfloat16 and ours.weight.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), ry, rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(x_ours.grad.float(), x_ref.grad, rtol=8e-3, atol=1e-3 * x_ref.grad.abs().max().item())
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("size", [256, 37])
@pytest.mark.parametrize("uses", ["both", "norm only", "residual only"])
def test_fork_adds_the_residual_gradient_inside_the_norms_backward(size, uses):
    """fork(x) = (norm(x), x); x's gradient is the sum of both paths' (each alone when the other is unused),
    as autograd sums them for norm(x) and x used separately, up to one bf16 rounding (ours rounds once)."""
    ours, _, x = norms(size)
    gen = torch.Generator().manual_seed(5)
    g_norm, g_residual = (torch.randn(7, 5, size, generator=gen).bfloat16() for _ in range(2))

    def gradients(fork: bool) -> list[torch.Tensor]:
        ours.zero_grad()
        x_in = x.clone().requires_grad_()
        y, residual = ours.fork(x_in) if fork else (ours(x_in), x_in)
        outputs = {"both": [(y, g_norm), (residual, g_residual)], "norm only": [(y, g_norm)],
                   "residual only": [(residual, g_residual)]}[uses]
        torch.autograd.backward([o for o, _ in outputs], [g for _, g in outputs])
        return [x_in.grad, *(p.grad if p.grad is not None else torch.zeros_like(p) for p in ours.parameters())]

    fused, separate = gradients(True), gradients(False)
    assert fused[0].dtype == torch.bfloat16
    scale = separate[0].abs().max().item()
    torch.testing.assert_close(fused[0].float(), separate[0].float(), rtol=8e-3, atol=8e-3 * scale)
    for a, b in zip(fused[1:], separate[1:], strict=True):
        torch.testing.assert_close(a, b)


def test_fork_without_the_kernels_or_grad_is_the_norm_and_x(monkeypatch):
    ours, reference, x = norms(16)
    y, residual = ours.fork(x.float())
    assert residual is not None and torch.equal(residual, x.float()) and torch.equal(y, reference(x.float()))
    with torch.no_grad():
        y, residual = ours.fork(x)
    assert residual is x


@needs_kernels
def test_used_for_bf16_under_autocast_like_torchs_layer_norm(monkeypatch):
    ours, reference, x = norms(256)
    calls = []
    kernel_forward = cpu_kernels.extension().layer_norm_forward
    monkeypatch.setattr(cpu_kernels, "extension", lambda: type("E", (), {
        "layer_norm_forward": staticmethod(lambda *a: calls.append(a) or kernel_forward(*a))})())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ry = ours(x), reference(x)
    assert len(calls) == 1 and y.dtype == ry.dtype
    torch.testing.assert_close(y, ry, rtol=8e-3, atol=8e-3)


def test_other_cases_are_torchs_layer_norm(monkeypatch):
    ours, reference, x = norms(16)
    monkeypatch.setattr(cpu_kernels, "extension", lambda: pytest.fail("the kernels were asked for"))
    assert torch.equal(ours(x.float()), reference(x.float()))  # fp32
    no_affine = LayerNorm(16, elementwise_affine=False)
    assert torch.equal(no_affine(x), torch.nn.LayerNorm(16, elementwise_affine=False)(x))
    state = ours.state_dict()
    assert set(state) == {"weight", "bias"}


def test_without_the_kernels_bf16_is_torchs_layer_norm(monkeypatch):
    ours, reference, x = norms(16)
    monkeypatch.setattr(cpu_kernels, "extension", lambda: None)
    assert torch.equal(ours(x), reference(x))
