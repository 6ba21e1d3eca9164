"""The cheaper CPU dropout masks and the fused dropout + residual addition, against their definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmt.models.dropout import Dropout, dropout, dropout_add, dropout_mask

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_mask_is_zero_one_with_the_keep_rate_and_an_unbiased_scale(dtype, p):
    torch.manual_seed(0)
    mask, scale = dropout_mask((1000, 400), p, dtype)
    assert mask.dtype == dtype and mask.shape == (1000, 400)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    kept = mask.double().mean().item()
    assert kept == pytest.approx(1 - p, abs=5e-3)  # 400k Bernoulli draws: std 7e-4
    p_used = 1 - 1 / scale
    assert abs(p_used - p) <= 0.02 * p  # p rounded to the lanes' resolution, at most 2% off
    assert (p_used * 256).is_integer()  # these p are close enough to a multiple of 1/256 for 8-bit lanes


@pytest.mark.parametrize("p", [0.01, 0.003, 0.015])
def test_p_that_8_bit_lanes_would_round_by_over_2_percent_gets_15_bit_lanes(p):
    torch.manual_seed(0)
    mask, scale = dropout_mask((1000, 1000), p, torch.bfloat16)
    p_used = 1 - 1 / scale
    assert abs(p_used - p) <= 2.0 ** -15 and (p_used * 2**15).is_integer()
    assert 1 - mask.double().mean().item() == pytest.approx(p, abs=5e-4)  # 1M draws: std <= 1e-4


def test_lanes_are_independent_and_uniform():
    torch.manual_seed(1)
    mask, _ = dropout_mask((1 << 20,), 0.5, torch.bfloat16)
    lanes = mask.float().view(-1, 8)  # the eight 8-bit lanes of each 64-bit draw
    torch.testing.assert_close(lanes.mean(0), torch.full((8,), 0.5), atol=5e-3, rtol=0)
    pairs = (lanes[:, :-1] * lanes[:, 1:]).mean(0)  # P(both kept) = 1/4 for independent lanes
    torch.testing.assert_close(pairs, torch.full((7,), 0.25), atol=5e-3, rtol=0)


def test_masks_follow_torch_manual_seed():
    torch.manual_seed(5)
    a = dropout(torch.ones(64, 64), 0.3)
    torch.manual_seed(5)
    b = dropout(torch.ones(64, 64), 0.3)
    c = dropout(torch.ones(64, 64), 0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_values_and_gradient_are_x_times_mask_times_scale(dtype):
    torch.manual_seed(2)
    x = (torch.rand(50, 30) + 0.5).to(dtype).requires_grad_()
    y = dropout(x, 0.25)
    kept = y != 0
    scale = (y.double()[kept] / x.detach().double()[kept])
    assert scale.max() / scale.min() < 1 + 2e-2  # one scale for every kept element (bf16 rounding)
    assert scale.mean().item() == pytest.approx(1 / 0.75, rel=1e-2)
    grad = torch.randn(50, 30).to(dtype)
    y.backward(grad)
    expected = (grad.double() * kept.double() * (1 / 0.75)).to(dtype)
    torch.testing.assert_close(x.grad, expected, atol=0, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert x.grad.dtype == dtype


def test_dropout_is_unbiased_like_torch():
    torch.manual_seed(3)
    x = torch.ones(2000, 500)
    assert dropout(x, 0.1).mean().item() == pytest.approx(F.dropout(x, 0.1).mean().item(), abs=3e-3)
    assert dropout(x, 0.1).mean().item() == pytest.approx(1.0, abs=3e-3)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_dropout_add_is_residual_plus_dropout(x_dtype):
    """bf16 sublayer output + fp32 residual stream (autocast): fp32 result, gradients in each input's
    dtype, equal to residual + mask * scale * x with the same mask."""
    torch.manual_seed(4)
    residual = torch.randn(8, 6, 32, requires_grad=True)
    x = torch.randn(8, 6, 32).to(x_dtype).requires_grad_()
    torch.manual_seed(9)
    y = dropout_add(residual, x, 0.2)
    torch.manual_seed(9)
    mask, scale = dropout_mask(x.shape, 0.2, torch.bfloat16)
    mask = mask.float()
    torch.testing.assert_close(y, residual.detach() + x.detach().float() * mask * scale)
    assert y.dtype == torch.float32
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(residual.grad, grad)
    assert x.grad.dtype == x_dtype
    torch.testing.assert_close(x.grad.float(), (grad * mask * scale).to(x_dtype).float())


def test_identity_in_eval_mode_and_at_p_zero_and_torch_elsewhere():
    x = torch.randn(5, 7)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    torch.testing.assert_close(dropout_add(x, x, 0.5, training=False), 2 * x)
    assert torch.all(dropout(x, 1.0) == 0)  # p = 1: torch's dropout
    integer = torch.arange(6)
    assert dropout(integer, 0.0) is integer


def test_module_is_a_drop_in_replacement():
    module = Dropout(0.3)
    assert isinstance(module, torch.nn.Dropout) and module.state_dict() == {}
    x = torch.ones(100, 100)
    assert torch.equal(module.eval()(x), x)
    y = module.train()(x)
    values = y.unique().tolist()
    # p = 0.3 is rounded to 77/256
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.7, rel=2e-3)
