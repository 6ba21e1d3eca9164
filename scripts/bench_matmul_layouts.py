#!/usr/bin/env python
"""Two facts behind the training step's matmul speed (docs/benchmarks.md, sixth round), bf16 on the CPU:

1. weight gradients dW = dY^T X ([out, T] x [T, in], T ~ 4k tokens) with each operand row-major or
   transposed, in interleaved rounds (median of the rounds' best-of-5), TFLOP/s;
2. the same matmuls repeated (operands in cache) and after a 64 MB write (operands from memory).

    .venv/bin/python scripts/bench_matmul_layouts.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from nmt.allocator import tune_allocator  # noqa: E402

TOKENS = 4075
BF16 = torch.bfloat16


def run_times(f, n: int) -> list[float]:
    """Seconds of n calls of f, after one untimed call."""
    f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return times


def best_of(f, n: int = 5) -> float:
    return min(run_times(f, n))


def median_time(f, n: int = 30) -> float:
    return statistics.median(run_times(f, n))


def weight_gradient_layouts(rounds: int = 8) -> None:
    for out_size, in_size in ((1024, 256), (256, 1024), (256, 256)):
        dy, x = torch.randn(TOKENS, out_size).to(BF16), torch.randn(TOKENS, in_size).to(BF16)
        dy_t, x_t = dy.t().contiguous(), x.t().contiguous()
        result = torch.empty(out_size, in_size, dtype=BF16)
        operands = {"dY^T (transposed) x X": (dy.t(), x), "dY^T (row-major) x X": (dy_t, x),
                    "dY^T (row-major) x X (transposed)": (dy_t, x_t.t()),
                    "dY^T (transposed) x X (transposed)": (dy.t(), x_t.t())}
        times = {name: [] for name in operands}
        for _ in range(rounds):
            for name, (a, b) in operands.items():
                times[name].append(best_of(lambda a=a, b=b, out=result: torch.mm(a, b, out=out)))
        flops = 2 * TOKENS * out_size * in_size
        print(f"dW [{out_size}, {in_size}]: " + "; ".join(
            f"{name} {flops / statistics.median(t) / 1e12:.2f}" for name, t in times.items()) + " TFLOP/s")


def hot_and_cold() -> None:
    big = torch.empty(32 << 20, dtype=BF16)  # 64 MB
    x, w, dy = (torch.randn(*shape).to(BF16) for shape in ((TOKENS, 256), (1024, 256), (TOKENS, 1024)))
    outputs = torch.empty(TOKENS, 1024, dtype=BF16), torch.empty(1024, 256, dtype=BF16), torch.empty(TOKENS, 256,
                                                                                                    dtype=BF16)
    flush = median_time(lambda: big.fill_(1.0))
    flops = 2 * TOKENS * 256 * 1024
    for name, f in (("forward X W^T", lambda: torch.mm(x, w.t(), out=outputs[0])),
                    ("weight gradient dY^T X", lambda: torch.mm(dy.t(), x, out=outputs[1])),
                    ("input gradient dY W", lambda: torch.mm(dy, w, out=outputs[2]))):
        hot = median_time(f)
        cold = median_time(lambda f=f: (big.fill_(1.0), f())) - flush
        print(f"{name} [{TOKENS} tokens, 256 <-> 1024]: repeated {flops / hot / 1e12:.2f} TFLOP/s, "
              f"after a 64 MB write {flops / cold / 1e12:.2f} TFLOP/s")


if __name__ == "__main__":
    tune_allocator()
    weight_gradient_layouts()
    hot_and_cold()
