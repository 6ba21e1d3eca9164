"""nmt.cpu_kernels: the build switch, and the cross-entropy kernels against the PyTorch-op path they replace.

(The dropout kernels are tested in test_fused_dropout.py.)"""

from __future__ import annotations

import pytest
import torch

import nmt.training.loss as loss_module
from nmt import cpu_kernels

needs_kernels = pytest.mark.skipif(cpu_kernels.extension() is None,
                                   reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason}")


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("NMT_CPU_KERNELS", "0")
    cpu_kernels.extension.cache_clear()
    try:
        assert cpu_kernels.status() == "not used"  # asking for the status builds nothing
        assert cpu_kernels.extension() is None and cpu_kernels.unavailable_reason == "NMT_CPU_KERNELS=0"
        assert cpu_kernels.status() == "off: NMT_CPU_KERNELS=0"
        assert not cpu_kernels.usable_on(torch.ones(2).bfloat16())
        cpu_kernels.amx_usable.cache_clear()
        assert not cpu_kernels.amx_usable()
    finally:
        cpu_kernels.extension.cache_clear()
        cpu_kernels.amx_usable.cache_clear()


def test_only_bf16_cpu_tensors_use_them():
    assert not cpu_kernels.usable_on(torch.ones(2), torch.ones(2).bfloat16())
    assert not cpu_kernels.usable_on(torch.ones(2).half())


def logits_batch(rows: int, vocab: int, spread: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, vocab, generator=gen) * spread).bfloat16()
    target = torch.randint(0, vocab, (rows, 1), generator=gen)
    return z, target


@needs_kernels
@pytest.mark.parametrize("vocab", [1, 31, 32, 300, 8000])  # whole and partial 32-lane blocks
@pytest.mark.parametrize("spread", [0.01, 3.0, 40.0])  # up to e^-100 terms (zero, denormal)
def test_row_terms_match_log_softmax(vocab, spread):
    z, target = logits_batch(19, vocab, spread)
    ours = loss_module._row_terms(z, target, cpu_kernels.extension())
    reference = loss_module._row_terms(z, target, None)
    names = ("lse", "sum of -log p", "-log p(target)")
    for name, a, b in zip(names, ours, reference, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-5 * max(1.0, vocab * spread / 100), msg=name)


@needs_kernels
@pytest.mark.parametrize("vocab", [31, 300])
@pytest.mark.parametrize("scale, k", [(1.0, 0.9), (1.0, 0.0), (0.0, -0.25)])
def test_softmax_minus_target_matches_the_tensor_ops(vocab, scale, k):
    z, target = logits_batch(23, vocab, 3.0, seed=1)
    keep = torch.rand(23, generator=torch.Generator().manual_seed(2)) > 0.3
    lse = loss_module._row_terms(z, target, None)[0]
    ours, reference = torch.full_like(z, 7.0), torch.full_like(z, 7.0)
    loss_module._softmax_minus_target(z, lse, target, keep, scale, k, ours, cpu_kernels.extension())
    loss_module._softmax_minus_target(z, lse, target, keep, scale, k, reference, None)
    assert torch.all(ours[~keep] == 0)
    # e^x to about 2e-7 against torch's softmax: at most one bf16 rounding step apart
    torch.testing.assert_close(ours.float(), reference.float(), rtol=8e-3, atol=1e-6)
    assert (ours != reference).float().mean() < 0.01


@needs_kernels
@pytest.mark.parametrize("vocab", [31, 300, 8000])
@pytest.mark.parametrize("k", [0.9, 0.0])
def test_row_stats_with_out_write_the_softmax_gradient_up_to_a_factor_per_row(vocab, k):
    """factor * out = softmax(z) - k * onehot(target) on kept rows, 0 on the others; the statistics as without out."""
    z, target = logits_batch(23, vocab, 3.0, seed=3)
    keep = torch.rand(23, generator=torch.Generator().manual_seed(4)) > 0.3
    kernels = cpu_kernels.extension()
    out = torch.full_like(z, 7.0)
    *stats, factor = kernels.logit_row_stats(z, target.reshape(-1), out, keep, k)
    for ours, reference in zip(stats, kernels.logit_row_stats(z, target.reshape(-1)), strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert torch.all(out[~keep] == 0) and torch.all(factor[~keep] == 0)
    expected = torch.softmax(z.double(), dim=-1)
    expected[torch.arange(23), target[:, 0]] -= k
    expected[~keep] = 0
    # e^(z - max) rounded to bf16 once, then scaled in fp32
    torch.testing.assert_close(out.double() * factor.double()[:, None], expected, rtol=8e-3, atol=1e-7)


@needs_kernels
def test_target_ids_outside_the_vocabulary_are_refused():
    z, target = logits_batch(4, 10, 1.0)
    target[2] = 10
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        cpu_kernels.extension().logit_row_stats(z, target.reshape(-1))
    with pytest.raises(RuntimeError, match="bf16"):
        cpu_kernels.extension().logit_row_stats(z.float(), target.reshape(-1))


@needs_kernels
@pytest.mark.parametrize("rows, width", [(0, 16), (1, 64), (7, 5), (300, 100), (513, 256), (1000, 1030)])
def test_column_sums_are_the_fp32_sums_of_the_rows(rows, width):
    x = torch.randn(rows, width).bfloat16()
    sums = cpu_kernels.extension().column_sums(x)
    assert sums.dtype == torch.float32 and sums.shape == (width,)
    torch.testing.assert_close(sums, x.double().sum(0).float(), rtol=1e-6, atol=1e-5)


@needs_kernels
def test_column_sums_refuse_what_they_cannot_read():
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        cpu_kernels.extension().column_sums(torch.ones(4, 8))
    with pytest.raises(RuntimeError, match="rows, N"):
        cpu_kernels.extension().column_sums(torch.ones(2, 4, 8).bfloat16())


@needs_kernels
@pytest.mark.parametrize("rows, cols", [(0, 16), (32, 16), (96, 48), (8000, 256)])
def test_transpose_is_the_row_major_transpose(rows, cols):
    x = torch.randn(rows, cols).bfloat16()
    assert torch.equal(cpu_kernels.extension().transpose_bf16(x), x.t().contiguous())


@needs_kernels
def test_transpose_refuses_what_it_cannot_move():
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_kernels.extension().transpose_bf16(torch.ones(31, 16).bfloat16())
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        cpu_kernels.extension().transpose_bf16(torch.ones(32, 16))


needs_amx = pytest.mark.skipif(not cpu_kernels.amx_usable(), reason="no AMX kernels on this machine")


@needs_amx
@pytest.mark.parametrize("rows, n, k", [(0, 32, 32), (1, 32, 64), (100, 64, 32), (1000, 256, 1024),
                                        (1000, 256, 256), (300, 8000, 64), (700, 96, 160)])
def test_weight_grad_is_the_fp32_product(rows, n, k):
    grad, x = torch.randn(rows, n).bfloat16(), torch.randn(rows, k).bfloat16()
    exact = grad.double().t() @ x.double()
    result = cpu_kernels.extension().weight_grad(grad, x)
    assert result.dtype == torch.float32 and result.shape == (n, k)
    torch.testing.assert_close(result.double(), exact, rtol=1e-5, atol=1e-4)
    out = torch.randn(n, k)
    start = out.clone()
    assert cpu_kernels.extension().weight_grad(grad, x, out).data_ptr() == out.data_ptr()  # added onto out
    torch.testing.assert_close(out.double(), start.double() + exact, rtol=1e-5, atol=1e-4)


@needs_amx
@pytest.mark.parametrize("rows, n, k", [(0, 32, 32), (33, 96, 64), (1000, 1024, 256), (300, 8000, 64)])
def test_weight_bias_grad_adds_the_column_sums(rows, n, k):
    grad, x = torch.randn(rows, n).bfloat16(), torch.randn(rows, k).bfloat16()
    weight, bias = cpu_kernels.extension().weight_bias_grad(grad, x)
    torch.testing.assert_close(weight.double(), grad.double().t() @ x.double(), rtol=1e-5, atol=1e-4)
    assert bias.dtype == torch.float32 and bias.shape == (n,)
    torch.testing.assert_close(bias.double(), grad.double().sum(0), rtol=1e-6, atol=1e-5)


@needs_amx
def test_weight_grad_shared_out_on_demand_does_not_depend_on_the_threads():
    """dY wider than X: the threads take panels of dY's columns as they finish (parallel.h); every element is
    still summed by one thread in row order, so the result is the same bit for bit whatever the threads and
    from call to call (training stays reproducible)."""
    grad, x = torch.randn(1000, 1024).bfloat16(), torch.randn(1000, 256).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = cpu_kernels.extension().weight_bias_grad(grad, x)
        shared = []
        for count in (2, 2, 5):  # 5: more threads than cores
            torch.set_num_threads(count)
            shared.append(cpu_kernels.extension().weight_bias_grad(grad, x))
    finally:
        torch.set_num_threads(threads)
    for weight, bias in shared:
        assert torch.equal(weight, alone[0]) and torch.equal(bias, alone[1])


@needs_amx
def test_weight_grad_refuses_what_it_cannot_compute():
    ext = cpu_kernels.extension()
    with pytest.raises(RuntimeError, match="multiples of 32"):
        ext.weight_grad(torch.ones(4, 48).bfloat16(), torch.ones(4, 32).bfloat16())
    with pytest.raises(RuntimeError, match="share M"):
        ext.weight_grad(torch.ones(4, 32).bfloat16(), torch.ones(5, 32).bfloat16())
    with pytest.raises(RuntimeError, match="out must be"):
        ext.weight_grad(torch.ones(4, 32).bfloat16(), torch.ones(4, 32).bfloat16(), torch.ones(32, 32).bfloat16())
