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

from nmt import cpu_kernels
from nmt.models.linear import weight_gradient
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


# ----------------------------------------------------------------------------------------------
# Output layer + loss in one op

# Rows per block of the fused output layer + loss. At 256 x 8000 a bf16 matmul of 512-1024 rows runs at
# 5x the speed of one [4000 x 256] x [256 x 8000] matmul on these CPUs (1.3 vs 0.26 TFLOP/s per core),
# and the forward's [256, 8000] fp32 log-probabilities are the largest temporary. On the CPU the rows are
# padded (as ignored targets) to whole blocks: a partial last block has a new row count in nearly every
# batch, and oneDNN builds a matmul for every new shape (18-20 ms for the [rows, 8000] x [8000, 256]
# gradient on a 2-core Sapphire Rapids, more than the padding rows' arithmetic).
FUSED_BLOCK_ROWS = 256
WEIGHT_GRAD_BLOCKS = 4  # row blocks per matmul of the weight gradient (CPU)


def output_label_smoothed_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              target: torch.Tensor, smoothing: float,
                              ignore_index: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`label_smoothed_nll(hidden @ weight.T + bias, target, smoothing)` without the [N, V] logits.

    hidden [..., H] (the decoder output, e.g. [B, T, H]), weight [V, H] (the output layer's; tied
    embeddings welcome), bias [V] or None, target [...] ids. The logits are computed block by block of
    rows, in the autocast dtype when called under autocast (else in hidden's dtype), turned into the
    loss in fp32, and dropped. The gradients of hidden, weight and bias are written directly: on the CPU
    their sums over the logits are taken in the forward, while each block is in cache, whenever a
    backward can follow (the backward then only scales them); otherwise (GPUs, or a backward through
    the nll output) the backward recomputes each block's logits, one more matmul of the output layer
    but cheaper than storing and re-reading [N, V]. Values and gradients are those of the unfused
    `output_layer(hidden)` + `label_smoothed_nll`, up to rounding. Returns (loss_sum, nll_sum, n_tokens)
    like `label_smoothed_nll`.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    flat_hidden = hidden.reshape(-1, hidden.size(-1))
    target = target.reshape(-1)
    short = -flat_hidden.size(0) % FUSED_BLOCK_ROWS if device_type == "cpu" else 0
    if short:  # whole blocks only: see FUSED_BLOCK_ROWS
        flat_hidden = torch.nn.functional.pad(flat_hidden, (0, 0, 0, short))
        target = torch.nn.functional.pad(target, (0, short), value=ignore_index)
    keep = target != ignore_index
    # the gradient's sums in the forward (no second pass over the logits) on the CPU, when a backward can follow
    precompute = device_type == "cpu" and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    with torch.autocast(device_type, enabled=False):
        loss, nll = _OutputLayerCrossEntropy.apply(flat_hidden, weight, bias, target, keep, smoothing, dtype,
                                                   precompute)
    return loss, nll, int(keep.sum())


def _fused_blocks(rows: int, device: torch.device) -> list[slice]:
    step = FUSED_BLOCK_ROWS if device.type == "cpu" else max(rows, 1)
    return [slice(start, start + step) for start in range(0, rows, step)]


def _logits_operand(w: torch.Tensor) -> torch.Tensor:
    """w^T [H, V], the right operand of every block's logits: on the CPU a row-major copy, made once per
    pass (oneDNN's bf16 matmul of [256, 256] x [256, 8000] runs 1.5-2.5x faster with it than with the
    transposed view of w; with the hidden gradient per group below, the d256 recipe's training step 1-2% faster),
    by `nmt/csrc/transpose.cpp` where it applies (2.5 ms for torch's copy of the d256 recipe's [8000, 256])."""
    if w.device.type != "cpu":
        return w.t()
    kernels = _kernels_for(w)
    if kernels is not None and w.size(0) % 32 == 0 and w.size(1) % 16 == 0:
        return kernels.transpose_bf16(w)
    return w.t().contiguous()


def _block_logits(h: torch.Tensor, wt: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(h, wt) if b is None else torch.addmm(b, h, wt)


def _row_terms(z: torch.Tensor, target: torch.Tensor,
               kernels: Any | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, sum_v -log p(v), -log p(target)) of each row of the logits z [rows, V] (target [rows, 1]), in
    fp32; one pass of `nmt/csrc/loss.cpp` over bf16 z where `kernels` is given."""
    if kernels is not None:
        return _loss_terms(*kernels.logit_row_stats(z, target.reshape(-1)), z.size(1))
    log_p = torch.log_softmax(z, dim=-1, dtype=torch.float32)  # one kernel, reads z in its dtype
    lse = z[:, 0].float() - log_p[:, 0]
    return lse, log_p.sum(dim=-1).neg_(), log_p.gather(1, target).squeeze(1).neg_()


def _loss_terms(lse: torch.Tensor, total: torch.Tensor, at_target: torch.Tensor,
                vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_row_terms`' result from the kernel's per-row (lse, sum of the logits, target logit)."""
    return lse, vocab * lse - total, lse - at_target


def _softmax_minus_target(z: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, keep: torch.Tensor,
                          scale: float, k: float, out: torch.Tensor, kernels: Any | None) -> None:
    """out = scale * softmax(z) - k * onehot(target) on the rows where keep is true, 0 on the others (out in
    z's dtype; the target entries from z and the forward's lse in fp32, rounded once)."""
    if kernels is not None:
        kernels.softmax_minus_target(z, lse, target.reshape(-1), keep, scale, k, out)
        return
    torch._softmax(z, -1, False, out=out)
    index = (torch.arange(z.size(0), device=z.device), target[:, 0])
    p_target = (z[index].float() - lse).exp_()
    if scale != 1.0:
        out.mul_(scale)
        p_target.mul_(scale)
    out.index_put_(index, p_target.sub_(k).to(out.dtype))
    pad_rows = (~keep).nonzero().squeeze(1)
    if pad_rows.numel():
        out.index_fill_(0, pad_rows, 0.0)


def _kernels_for(*operands: torch.Tensor) -> Any | None:
    """`nmt.cpu_kernels`' module when its kernels apply to these operands (bf16 on the CPU), else None."""
    return cpu_kernels.extension() if cpu_kernels.usable_on(*operands) else None


def _column_sums(x: torch.Tensor) -> torch.Tensor:
    """fp32 sums over the rows of x [rows, N], in one pass of `nmt/csrc/column_sums.cpp` where it applies."""
    kernels = _kernels_for(x)
    return kernels.column_sums(x) if kernels is not None else x.sum(0, dtype=torch.float32)


class _GradientSums:
    """The [rows, V] part of the output layer's gradient, P = scale * softmax(z) - k * onehot(y) on real rows
    (0 on padding rows), written block by block of rows and multiplied out: P w -> [rows, H],
    P^T h -> [V, H] (fp32), sum_rows P -> [V] (fp32), for whichever of hidden, weight, bias needs one.
    The products take WEIGHT_GRAD_BLOCKS blocks at once on the CPU (their rows staged together): fewer
    fp32 accumulations of [V, H], longer matmul reductions, and w packed by oneDNN once per group.
    A block may also be staged as P up to a factor per row (`add_scaled`, from the forward's statistics
    kernel); then `hidden` holds the rows of P w divided by their factors (`row_factor` says by what),
    and P^T h and the bias sums take the factors into account."""

    def __init__(self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, needs: tuple[bool, ...],
                 blocks: list[slice]):
        self.h, self.w, self.blocks = h, w, blocks
        self.kernels = _kernels_for(h, w)
        vocab, rows = w.size(0), h.size(0)
        self.hidden = torch.empty_like(h) if needs[0] else None
        self.need_weight = needs[1]
        self.weight: torch.Tensor | None = None  # fp32, from the first complete group on
        self.bias = torch.zeros(vocab, dtype=torch.float32, device=w.device) if needs[2] and b is not None else None
        self.row_factor: torch.Tensor | None = None  # [rows] fp32, once a block is staged with factors
        self.group = WEIGHT_GRAD_BLOCKS if h.device.type == "cpu" else 1
        self.staged: torch.Tensor | None = torch.empty(
            min(rows, self.group * (blocks[0].stop - blocks[0].start)), vocab, dtype=h.dtype, device=h.device)
        self.group_start = 0

    def block(self, rows: slice, size: int) -> torch.Tensor:
        """Where the block of `rows` (`size` of them) is staged."""
        offset = rows.start - self.group_start
        return self.staged[offset: offset + size]

    def add(self, i: int, rows: slice, z: torch.Tensor, lse: torch.Tensor, safe_target: torch.Tensor,
            keep: torch.Tensor, scale: float, k: float) -> None:
        """Block i (`rows`, logits z): write its P (see `_softmax_minus_target`) and multiply it out."""
        p = self.block(rows, z.size(0))
        _softmax_minus_target(z, lse[rows], safe_target[rows], keep[rows], scale, k, p, self.kernels)
        self._staged(i, rows, p)

    def add_scaled(self, i: int, rows: slice, factor: torch.Tensor) -> None:
        """Block i (`rows`), staged by the caller in `block(rows, ...)` as P / factor per row: multiply it out."""
        if self.row_factor is None:
            self.row_factor = torch.ones(self.h.size(0), dtype=torch.float32, device=self.h.device)
        self.row_factor[rows] = factor
        self._staged(i, rows, self.block(rows, factor.size(0)))

    def _staged(self, i: int, rows: slice, p: torch.Tensor) -> None:
        """After block i is staged as p: its bias sums, and the products once its group is complete. The
        staged rows are released after the last block."""
        factor = None if self.row_factor is None else self.row_factor[rows.start: rows.start + p.size(0)]
        if self.bias is not None:
            self.bias += p.sum(0, dtype=torch.float32) if factor is None else torch.mv(p.t().float(), factor)
        last = i == len(self.blocks) - 1
        if last or (i + 1) % self.group == 0:  # the staged group is complete
            end = min(rows.stop, self.h.size(0))
            staged = self.staged[: end - self.group_start]
            if self.hidden is not None:
                torch.mm(staged, self.w, out=self.hidden[self.group_start:end])
            if self.need_weight:
                h = self.h[self.group_start:end]
                if self.row_factor is not None:  # P^T h = (P / factor)^T (factor * h)
                    h = (h.float() * self.row_factor[self.group_start:end, None]).to(h.dtype)
                self.weight = weight_gradient(staged, h, self.weight)
            self.group_start = end
        if last:
            self.staged = None


class _OutputLayerCrossEntropy(torch.autograd.Function):
    """(loss_sum, nll_sum) of `hidden @ weight.T + bias` against `target`, block by block of rows.

    Gradients: per real row, d/dz = s * softmax(z) - c - t * onehot(y) with the scalars s = grad_loss +
    grad_nll, c = grad_loss * eps / V, t = grad_loss * (1 - eps) + grad_nll; written m * (p - k * onehot(y))
    - c (m = s, p = softmax(z), k = t / m; m = 1 and p = 0 when s = 0). Only p - k * onehot(y) goes through
    [rows, V] (`_GradientSums`); m and c are applied to the [rows, H] and [V, H] results. With `precompute`
    the forward takes those sums while it has each block's logits, for k = 1 - eps (the training step's
    case: only the loss is differentiated, grad_nll = 0), and the backward only scales them; for any other
    grad_nll the backward recomputes the logits and sums with its own k.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                target: torch.Tensor, keep: torch.Tensor, smoothing: float, dtype: torch.dtype,
                precompute: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h = hidden.to(dtype).contiguous()
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        rows, vocab = h.size(0), w.size(0)
        lse = torch.empty(rows, dtype=torch.float32, device=h.device)
        uniform_row = torch.empty_like(lse)
        nll_row = torch.empty_like(lse)
        safe_target = target.masked_fill(~keep, 0).unsqueeze(1)
        kernels = _kernels_for(h, w)
        blocks = _fused_blocks(rows, h.device)
        sums = _GradientSums(h, w, b, ctx.needs_input_grad[:3], blocks) if precompute else None
        wt = _logits_operand(w)
        for i, block in enumerate(blocks):
            z = _block_logits(h[block], wt, b)
            if sums is not None and kernels is not None:  # P up to a factor per row, in the statistics' pass
                out = sums.block(block, z.size(0))
                *stats, factor = kernels.logit_row_stats(z, safe_target[block].reshape(-1), out, keep[block],
                                                         1.0 - smoothing)
                lse[block], uniform_row[block], nll_row[block] = _loss_terms(*stats, vocab)
                sums.add_scaled(i, block, factor)
                continue
            lse[block], uniform_row[block], nll_row[block] = _row_terms(z, safe_target[block], kernels)
            if sums is not None:
                sums.add(i, block, z, lse, safe_target, keep, 1.0, 1.0 - smoothing)
        nll = nll_row.masked_fill(~keep, 0.0).sum()
        uniform_nll = uniform_row.masked_fill(~keep, 0.0).sum()
        loss = (1.0 - smoothing) * nll + (smoothing / vocab) * uniform_nll
        ctx.save_for_backward(h, w, b, lse, safe_target, keep)
        ctx.smoothing = smoothing
        ctx.precomputed = sums
        ctx.types = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.set_materialize_grads(False)
        return loss, nll

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor | None, grad_nll: torch.Tensor | None) -> tuple[Any, ...]:
        h, w, b, lse, safe_target, keep = ctx.saved_tensors
        eps, vocab = ctx.smoothing, w.size(0)
        hidden_type, weight_type, bias_type = ctx.types
        g_loss = 0.0 if grad_loss is None else float(grad_loss)
        g_nll = 0.0 if grad_nll is None else float(grad_nll)
        s = g_loss + g_nll
        m = s if s != 0.0 else 1.0
        k, c = (g_loss * (1.0 - eps) + g_nll) / m, g_loss * eps / vocab
        sums, ctx.precomputed = ctx.precomputed, None
        if sums is None or g_nll != 0.0 or g_loss == 0.0:  # not the precomputed k = 1 - eps: recompute
            blocks = _fused_blocks(h.size(0), h.device)
            sums = _GradientSums(h, w, b, ctx.needs_input_grad[:3], blocks)
            wt = _logits_operand(w)
            for i, rows in enumerate(blocks):
                sums.add(i, rows, _block_logits(h[rows], wt, b), lse, safe_target, keep, 1.0 if s != 0.0 else 0.0, k)
        grad_h, grad_w, grad_b = sums.hidden, sums.weight, sums.bias
        real = keep.to(torch.float32).unsqueeze(1)
        if grad_h is not None:
            row_scale = m if sums.row_factor is None else sums.row_factor.unsqueeze(1) * m
            grad_h = (grad_h.float().mul_(row_scale) - c * _column_sums(w)).mul_(real).to(hidden_type)
        if grad_w is not None:
            grad_w = grad_w.mul_(m).sub_(c * (_column_sums(h) - _column_sums(h[~keep]))).to(weight_type)
        if grad_b is not None:
            grad_b = grad_b.mul_(m).sub_(c * float(keep.sum())).to(bias_type)
        return grad_h, grad_w, grad_b, None, None, None, None, None
