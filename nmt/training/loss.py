"""Label-smoothed cross-entropy, summed over real (non-pad) target tokens, computed in fp32.

With smoothing `eps` over a vocabulary of `V` classes (the padding class included), the target
distribution of a token whose reference is `y` is

    q(v) = (1 - eps) * [v == y] + eps / V

(Szegedy et al. 2016; the same convention as `torch.nn.functional.cross_entropy(label_smoothing=eps)`),
so the loss of one token is

    loss = -sum_v q(v) * log p(v) = (1 - eps) * nll + (eps / V) * sum_v -log p(v),   nll = -log p(y).

With `log p(v) = z_v - lse(z)` (z the logits, lse their log-sum-exp) both terms are per-row sums,

    nll = lse - z_y            sum_v -log p(v) = V * lse - sum_v z_v,

so neither a one-hot nor the [N, V] log-probabilities are stored: the backward keeps only the logits
(bf16 stays bf16) and writes the gradient `softmax(z) - q` directly. On the CPU the [N, V] work goes
in blocks of rows that stay in cache (fresh [N, V] fp32 temporaries cost more than the arithmetic);
on a GPU it is done in one block.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from nmt.vocab import PAD_ID

# Logits per block of rows on the CPU (8 MiB in fp32). On a 2-core CPU, [4000, 8000] logits take about
# half the time (fp32) to a third (bf16) of torch's log_softmax + autograd, and of one [N, V] block.
CPU_BLOCK_ELEMENTS = 1 << 21


def label_smoothed_nll(logits: torch.Tensor, target: torch.Tensor, smoothing: float,
                       ignore_index: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed label-smoothed loss, summed nll and the number of real target tokens.

    logits [N, V] or [B, T, V] (any float dtype; the arithmetic is fp32), target [N] or [B, T] ids.
    Positions whose target is `ignore_index` contribute nothing (value and gradient). Returns
    (loss_sum, nll_sum) as fp32 scalars, both differentiable, and n_tokens as an int; the caller
    divides by the tokens it normalises by. With smoothing 0 the loss equals the nll.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    logits = logits.reshape(-1, logits.size(-1))
    target = target.reshape(-1)
    keep = target != ignore_index
    loss, nll = _SmoothedCrossEntropy.apply(logits, target, keep, smoothing)
    return loss, nll, int(keep.sum())


def _row_blocks(logits: torch.Tensor) -> Iterator[slice]:
    """Slices of rows to process together: cache-sized on the CPU, everything at once elsewhere."""
    rows, vocab = logits.shape
    step = max(1, CPU_BLOCK_ELEMENTS // vocab if logits.device.type == "cpu" else rows)
    for start in range(0, rows, step):
        yield slice(start, start + step)


class _SmoothedCrossEntropy(torch.autograd.Function):
    """(loss_sum, nll_sum) of [N, V] logits; backward writes softmax - q without autograd's temporaries."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor,
                smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        rows, vocab = logits.shape
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        logit_sum = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for block in _row_blocks(logits):
            z = logits[block].float()
            lse[block] = torch.logsumexp(z, dim=-1)
            logit_sum[block] = z.sum(dim=-1)
        safe_target = target.masked_fill(~keep, 0).unsqueeze(1)  # any valid index; masked out below
        nll = (lse - logits.gather(1, safe_target).squeeze(1).float()).masked_fill(~keep, 0.0).sum()
        uniform_nll = (vocab * lse - logit_sum).masked_fill(~keep, 0.0).sum()
        loss = (1.0 - smoothing) * nll + (smoothing / vocab) * uniform_nll
        ctx.save_for_backward(logits, safe_target, keep)
        ctx.smoothing = smoothing
        ctx.set_materialize_grads(False)
        return loss, nll

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor | None,
                 grad_nll: torch.Tensor | None) -> tuple[torch.Tensor, None, None, None]:
        logits, safe_target, keep = ctx.saved_tensors
        eps, vocab = ctx.smoothing, logits.size(-1)
        zero = torch.zeros((), device=logits.device)
        g_loss = zero if grad_loss is None else grad_loss.float()
        g_nll = zero if grad_nll is None else grad_nll.float()
        # d loss/dz = g_loss * (softmax - q) + g_nll * (softmax - onehot(y)), zero on padding rows:
        #   = softmax * scale - uniform_part - onehot(y) * target_part
        real = keep.float().unsqueeze(1)
        scale = real * (g_loss + g_nll)
        uniform_part = real * (g_loss * eps / vocab)
        target_part = real * (g_loss * (1.0 - eps) + g_nll)

        def grad_of(rows: slice) -> torch.Tensor:
            p = torch.softmax(logits[rows], dim=-1, dtype=torch.float32)
            p.mul_(scale[rows]).sub_(uniform_part[rows])
            return p.scatter_add_(1, safe_target[rows], -target_part[rows])

        blocks = list(_row_blocks(logits))
        if len(blocks) == 1:
            return grad_of(blocks[0]).to(logits.dtype), None, None, None
        grad = torch.empty_like(logits)
        for rows in blocks:
            grad[rows] = grad_of(rows)
        return grad, None, None, None
