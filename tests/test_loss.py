"""Label-smoothed loss: values, gradients, padding and dtypes against straightforward references."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nmt.training.loss as loss_module
from nmt import cpu_kernels
from nmt.training.loss import label_smoothed_nll
from nmt.vocab import PAD_ID


def dense_reference(logits: torch.Tensor, target: torch.Tensor, eps: float, ignore_index: int = PAD_ID):
    """The documented formula spelled out with an explicit [N, V] target distribution q."""
    logits = logits.reshape(-1, logits.size(-1)).float()
    target = target.reshape(-1)
    vocab = logits.size(-1)
    keep = target != ignore_index
    log_p = torch.log_softmax(logits, dim=-1)
    onehot = F.one_hot(target.clamp(min=0), vocab).float()
    q = (1 - eps) * onehot + eps / vocab
    per_token = -(q * log_p).sum(-1)
    nll = -(onehot * log_p).sum(-1)
    return per_token[keep].sum(), nll[keep].sum(), int(keep.sum())


def batch(seed: int = 0, b: int = 3, t: int = 5, v: int = 11, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, t, v, generator=gen)).to(dtype)
    target = torch.randint(4, v, (b, t), generator=gen)
    target[0, 3:] = PAD_ID
    target[2, 1:] = PAD_ID
    return logits, target


@pytest.fixture(params=[1 << 40, 2 * 11 + 1], ids=["one-block", "blocks-of-2-rows"])
def blocks(request, monkeypatch):
    """Run each test with the whole batch in one block and split into blocks (last one partial)."""
    monkeypatch.setattr(loss_module, "CPU_BLOCK_ELEMENTS", request.param)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_values_match_the_dense_formula_and_torch_cross_entropy(eps, blocks):
    logits, target = batch()
    loss, nll, n = label_smoothed_nll(logits, target, eps)
    ref_loss, ref_nll, ref_n = dense_reference(logits, target, eps)
    torch_loss = F.cross_entropy(logits.reshape(-1, 11), target.reshape(-1), ignore_index=PAD_ID,
                                 label_smoothing=eps, reduction="sum")
    assert n == ref_n == 9
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(loss, torch_loss)
    torch.testing.assert_close(nll, ref_nll)
    if eps == 0:
        torch.testing.assert_close(loss, nll)
    else:
        assert loss.item() > nll.item() * (1 - eps)  # the uniform part adds a positive term


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (0.7, -2.0)], ids=["loss", "nll", "both"])
def test_gradients_match_autograd_through_the_dense_formula(eps, weights, blocks):
    logits, target = batch(seed=1)
    mine = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    loss, nll, _ = label_smoothed_nll(mine, target, eps)
    (weights[0] * loss + weights[1] * nll).backward()
    ref_loss, ref_nll, _ = dense_reference(ref, target, eps)
    (weights[0] * ref_loss + weights[1] * ref_nll).backward()
    torch.testing.assert_close(mine.grad, ref.grad)
    assert mine.grad.abs().sum() > 0


def test_gradient_is_softmax_minus_smoothed_target_on_real_tokens():
    logits = torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([[4, PAD_ID]])
    x = logits.clone().requires_grad_()
    loss, _, _ = label_smoothed_nll(x, target, 0.1)
    loss.backward()
    q = torch.full((5,), 0.1 / 5)
    q[target[0, 0]] += 0.9
    torch.testing.assert_close(x.grad[0, 0], torch.softmax(logits[0, 0], -1) - q)
    assert torch.equal(x.grad[0, 1], torch.zeros(5))


def test_padding_positions_contribute_nothing(blocks):
    logits, target = batch(seed=3)
    pad = target == PAD_ID
    changed = logits.clone()
    changed[pad] = 100 * torch.randn(int(pad.sum()), 11)
    x1, x2 = logits.clone().requires_grad_(), changed.clone().requires_grad_()
    loss1, nll1, _ = label_smoothed_nll(x1, target, 0.1)
    loss2, nll2, _ = label_smoothed_nll(x2, target, 0.1)
    (loss1 + nll1).backward()
    (loss2 + nll2).backward()
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(nll1, nll2)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert torch.all(x1.grad[pad] == 0)


def test_other_ignore_index():
    logits, target = batch(seed=4)
    target[1, 0] = -100
    loss, nll, n = label_smoothed_nll(logits, target, 0.1, ignore_index=-100)
    ref_loss, ref_nll, ref_n = dense_reference(logits, target, 0.1, ignore_index=-100)
    assert n == ref_n == 14  # PAD_ID counts as a real class when it is not the ignored index
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(nll, ref_nll)


def test_all_padding_gives_zero_loss_and_zero_gradient():
    logits, _ = batch()
    target = torch.full((3, 5), PAD_ID)
    x = logits.clone().requires_grad_()
    loss, nll, n = label_smoothed_nll(x, target, 0.1)
    loss.backward()
    assert (loss.item(), nll.item(), n) == (0.0, 0.0, 0)
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_give_an_fp32_loss_and_a_gradient_in_their_dtype(dtype, blocks):
    logits, target = batch(seed=5, v=300, dtype=dtype)
    x = logits.clone().requires_grad_()
    loss, nll, _ = label_smoothed_nll(x, target, 0.1)
    assert loss.dtype == nll.dtype == torch.float32
    # fp32 arithmetic on the half-precision values: equal to the reference on the upcast logits
    ref = logits.float().requires_grad_()
    ref_loss, _, _ = dense_reference(ref, target, 0.1)
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), ref.grad, atol=1e-2 * ref.grad.abs().max().item(), rtol=0)


def test_flat_and_batched_logits_agree():
    logits, target = batch(seed=6)
    flat = label_smoothed_nll(logits.reshape(-1, 11), target.reshape(-1), 0.1)
    batched = label_smoothed_nll(logits, target, 0.1)
    torch.testing.assert_close(flat[0], batched[0])
    assert flat[2] == batched[2]


def test_invalid_smoothing_is_rejected():
    logits, target = batch()
    with pytest.raises(ValueError, match="smoothing"):
        label_smoothed_nll(logits, target, 1.0)


# -- output layer + loss fused ----------------------------------------------------------------------


def output_batch(seed: int = 7, rows: int = 37, hidden: int = 12, vocab: int = 29, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(hidden, vocab, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(vocab, hidden, generator=gen))
        if bias:
            layer.bias.copy_(torch.randn(vocab, generator=gen))
    h = torch.randn(rows, hidden, generator=gen)
    target = torch.randint(4, vocab, (rows,), generator=gen)
    target[::5] = PAD_ID
    return layer, h, target


@pytest.fixture(params=[(1 << 20, 4), (8, 1), (8, 2), (5, 3)], ids=["one-block", "8-rows", "8-rows-x2", "5-rows-x3"])
def fused_blocks(request, monkeypatch):
    """The whole batch in one block, and blocks (the last one partial) with the weight gradient taken
    over 1, 2 or 3 blocks at once."""
    rows, group = request.param
    monkeypatch.setattr(loss_module, "FUSED_BLOCK_ROWS", rows)
    monkeypatch.setattr(loss_module, "WEIGHT_GRAD_BLOCKS", group)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fused_output_layer_loss_equals_linear_then_loss(eps, bias, fused_blocks):
    layer, h, target = output_batch(bias=bias)
    ours_h, ref_h = h.clone().requires_grad_(), h.clone().requires_grad_()
    loss, nll, n = loss_module.output_label_smoothed_nll(ours_h, layer.weight, layer.bias, target, eps)
    (0.7 * loss - 2.0 * nll).backward()
    ours_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    ref_loss, ref_nll, ref_n = label_smoothed_nll(layer(ref_h), target, eps)
    (0.7 * ref_loss - 2.0 * ref_nll).backward()
    assert n == ref_n
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(nll, ref_nll)
    torch.testing.assert_close(ours_h.grad, ref_h.grad)
    for ours, param in zip(ours_grads, layer.parameters(), strict=True):
        torch.testing.assert_close(ours, param.grad)


def test_fused_loss_gradients_when_the_softmax_terms_cancel(fused_blocks):
    """d(loss - nll): the softmax terms of the two cancel (grad_loss + grad_nll = 0), leaving the
    label-smoothing and target terms, which the backward handles as a special case."""
    layer, h, target = output_batch()
    ours_h, ref_h = h.clone().requires_grad_(), h.clone().requires_grad_()
    loss, nll, _ = loss_module.output_label_smoothed_nll(ours_h, layer.weight, layer.bias, target, 0.1)
    (loss - nll).backward()
    ours_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    ref_loss, ref_nll, _ = label_smoothed_nll(layer(ref_h), target, 0.1)
    (ref_loss - ref_nll).backward()
    torch.testing.assert_close(ours_h.grad, ref_h.grad)
    for ours, param in zip(ours_grads, layer.parameters(), strict=True):
        torch.testing.assert_close(ours, param.grad)


def test_fused_loss_with_a_frozen_output_layer_gives_the_hidden_gradient_only(fused_blocks):
    layer, h, target = output_batch()
    layer.requires_grad_(False)
    ours_h, ref_h = h.clone().requires_grad_(), h.clone().requires_grad_()
    loss_module.output_label_smoothed_nll(ours_h, layer.weight, layer.bias, target, 0.1)[0].backward()
    label_smoothed_nll(layer(ref_h), target, 0.1)[0].backward()
    torch.testing.assert_close(ours_h.grad, ref_h.grad)
    assert layer.weight.grad is None and layer.bias.grad is None


def test_fused_loss_accepts_batched_hidden_and_tied_weights(fused_blocks):
    embedding = torch.nn.Embedding(29, 12)
    _, h, target = output_batch(rows=36)
    h3, t3 = h.view(4, 9, 12).clone().requires_grad_(), target.view(4, 9)
    loss, nll, n = loss_module.output_label_smoothed_nll(h3, embedding.weight, None, t3, 0.1)
    loss.backward()
    ref = h.clone().requires_grad_()
    ref_loss, _, _ = label_smoothed_nll(ref @ embedding.weight.detach().T, target, 0.1)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(h3.grad.view(36, 12), ref.grad)
    assert embedding.weight.grad.shape == (29, 12) and embedding.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("with_kernels", [True, False], ids=["cpu-kernels", "tensor-ops"])
def test_fused_loss_under_bf16_autocast_matches_the_autocast_linear(fused_blocks, with_kernels, monkeypatch):
    """Under autocast the logits are bf16 matmuls in both paths: same loss, gradients within bf16 rounding
    (the fused weight gradient sums per-group bf16 partial products in fp32). The per-row passes over the
    logits run in nmt/csrc/loss.cpp where it is available, else as tensor ops."""
    if with_kernels and cpu_kernels.extension() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.unavailable_reason}")
    if not with_kernels:
        monkeypatch.setattr(cpu_kernels, "extension", lambda: None)
    layer, h, target = output_batch(rows=40, hidden=64, vocab=300)
    ours_h, ref_h = h.clone().requires_grad_(), h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, nll, _ = loss_module.output_label_smoothed_nll(ours_h, layer.weight, layer.bias, target, 0.1)
    loss.backward()
    ours_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(ref_h)
    ref_loss, ref_nll, _ = label_smoothed_nll(logits, target, 0.1)
    ref_loss.backward()
    assert loss.dtype == torch.float32 and ours_h.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=0)
    refs = [p.grad for p in layer.parameters()]
    for ours, ref in [(ours_h.grad, ref_h.grad), *zip(ours_grads, refs, strict=True)]:
        torch.testing.assert_close(ours, ref, atol=1e-2 * ref.abs().max().item(), rtol=0)


def test_fused_loss_all_padding_and_invalid_smoothing():
    layer, h, _ = output_batch()
    x = h.clone().requires_grad_()
    loss, nll, n = loss_module.output_label_smoothed_nll(x, layer.weight, layer.bias, torch.zeros(37, dtype=torch.long),
                                                         0.1)
    loss.backward()
    assert (loss.item(), nll.item(), n) == (0.0, 0.0, 0) and torch.all(x.grad == 0)
    with pytest.raises(ValueError, match="smoothing"):
        loss_module.output_label_smoothed_nll(h, layer.weight, None, torch.ones(37, dtype=torch.long), 1.0)


def test_fused_loss_runs_whole_blocks_on_the_cpu(monkeypatch):
    """37 rows in blocks of 8: padded to 40 (ignored targets), so every matmul has the same shape (oneDNN
    builds a matmul per new shape); values and gradients as without padding."""
    monkeypatch.setattr(loss_module, "FUSED_BLOCK_ROWS", 8)
    block_rows = []
    block_logits = loss_module._block_logits

    def recording_block_logits(h, w, b):
        block_rows.append(h.size(0))
        return block_logits(h, w, b)

    monkeypatch.setattr(loss_module, "_block_logits", recording_block_logits)
    layer, h, target = output_batch(rows=37)
    ours_h, ref_h = h.clone().requires_grad_(), h.clone().requires_grad_()
    loss, nll, n = loss_module.output_label_smoothed_nll(ours_h, layer.weight, layer.bias, target, 0.1)
    loss.backward()
    assert block_rows == [8] * 5  # 5 blocks in the forward; the backward scales the forward's sums
    ours_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    ref_loss, _, ref_n = label_smoothed_nll(layer(ref_h), target, 0.1)
    ref_loss.backward()
    assert n == ref_n and ours_h.grad.shape == (37, 12)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(ours_h.grad, ref_h.grad)
    for ours, param in zip(ours_grads, layer.parameters(), strict=True):
        torch.testing.assert_close(ours, param.grad)


def test_the_device_check_script_passes_on_the_cpu():
    """scripts/cuda_loss_check.py (run by scripts/cuda_smoke.sh on a GPU) compares the same two paths;
    on the CPU it must pass too, so that a GPU failure points at the device."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "cuda_loss_check.py"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--no-timing"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 7 and all(r["ok"] for r in records[:-1]) and records[-1]["failed"] == 0


def test_fused_loss_takes_the_gradient_sums_in_the_forward_only_when_they_can_be_used(monkeypatch):
    """loss.backward() (the training step) reuses the forward's sums; a backward through nll recomputes the
    logits; without grad mode the forward takes no sums."""
    monkeypatch.setattr(loss_module, "FUSED_BLOCK_ROWS", 8)
    calls = {"logits": 0, "gradient": 0}
    block_logits, softmax_minus_target = loss_module._block_logits, loss_module._softmax_minus_target

    def counting(name, function):
        return lambda *args: calls.__setitem__(name, calls[name] + 1) or function(*args)

    monkeypatch.setattr(loss_module, "_block_logits", counting("logits", block_logits))
    monkeypatch.setattr(loss_module, "_softmax_minus_target", counting("gradient", softmax_minus_target))
    layer, h, target = output_batch(rows=40)
    x = h.clone().requires_grad_()
    loss, nll, _ = loss_module.output_label_smoothed_nll(x, layer.weight, layer.bias, target, 0.1)
    loss.backward(retain_graph=True)
    assert calls == {"logits": 5, "gradient": 5}
    nll.backward()
    assert calls == {"logits": 10, "gradient": 10}
    with torch.no_grad():
        loss_module.output_label_smoothed_nll(x, layer.weight, layer.bias, target, 0.1)
    assert calls == {"logits": 15, "gradient": 10}
