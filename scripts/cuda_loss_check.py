"""Check the fused output layer + loss on a GPU against the unfused `output layer -> label_smoothed_nll`.

The unit tests (tests/test_loss.py) run on the CPU, where the fused op works in blocks of rows; on a
GPU it takes the whole batch in one block and reads the upstream gradients on the host. This script
compares values and gradients on the given device in fp32 and under bf16/fp16 autocast (padding rows,
label smoothing, both outputs differentiated, the case where their softmax terms cancel), times both
paths at the d256 recipe's shapes, and prints one JSON line per check; exit code 1 if any check fails.

    python scripts/cuda_loss_check.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nmt.training.loss import label_smoothed_nll, output_label_smoothed_nll  # noqa: E402
from nmt.vocab import PAD_ID  # noqa: E402


def make_batch(device: str, rows: int, hidden: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5
    bias = torch.randn(vocab, generator=gen) * 0.1
    h = torch.randn(rows, hidden, generator=gen) * 2
    target = torch.randint(4, vocab, (rows,), generator=gen)
    target[::7] = PAD_ID
    return [t.to(device) for t in (weight, bias, h, target)]


def run(fused: bool, weight, bias, h, target, eps: float, coefs: tuple[float, float], amp: torch.dtype | None):
    """Loss, nll and the gradients of (a * loss + b * nll) w.r.t. hidden, weight and bias."""
    w, b, x = (t.clone().requires_grad_() for t in (weight, bias, h))
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        if fused:
            loss, nll, _ = output_label_smoothed_nll(x, w, b, target, eps)
        else:
            loss, nll, _ = label_smoothed_nll(torch.nn.functional.linear(x, w, b), target, eps)
    (coefs[0] * loss + coefs[1] * nll).backward()
    return loss.detach(), nll.detach(), x.grad, w.grad, b.grad


def compare(device: str, amp: torch.dtype | None, eps: float, coefs: tuple[float, float]) -> dict:
    batch = make_batch(device, rows=301, hidden=64, vocab=997)
    ours = run(True, *batch, eps, coefs, amp)
    ref = run(False, *batch, eps, coefs, amp)
    names = ("loss", "nll", "grad_hidden", "grad_weight", "grad_bias")
    # fp32: rounding only; half precision: both paths round the logits, the gradients differ by the
    # rounding of softmax - target in the half dtype (relative to the largest entry).
    tol = 1e-4 if amp is None else 2e-2
    errors = {n: ((a.float() - r.float()).abs().max() / r.float().abs().max().clamp(min=1e-12)).item()
              for n, a, r in zip(names, ours, ref, strict=True)}
    dtypes_ok = all(a.dtype == r.dtype for a, r in zip(ours, ref, strict=True))
    return {"check": "fused_loss", "device": device, "amp": str(amp), "eps": eps, "coefs": coefs,
            "max_rel_error": errors, "dtypes_match": dtypes_ok,
            "ok": dtypes_ok and all(e < tol for e in errors.values())}


def timing(device: str, amp: torch.dtype, repeats: int = 20) -> dict:
    """Forward + backward of both paths at the d256 recipe's shapes (4,000 target tokens, 8k vocabulary)."""
    batch = make_batch(device, rows=4000, hidden=256, vocab=8000)
    result = {"check": "fused_loss_timing", "device": device, "amp": str(amp), "rows": 4000, "vocab": 8000}
    for fused in (True, False):
        for _ in range(3):
            run(fused, *batch, 0.1, (1.0, 0.0), amp)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeats):
            run(fused, *batch, 0.1, (1.0, 0.0), amp)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            result[("fused" if fused else "unfused") + "_peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result[("fused" if fused else "unfused") + "_ms"] = 1000 * (time.perf_counter() - start) / repeats
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    amps: list[torch.dtype | None] = [None, torch.bfloat16]
    if args.device.startswith("cuda"):
        amps.append(torch.float16)
    failed = 0
    for amp in amps:
        for eps, coefs in [(0.0, (1.0, 0.0)), (0.1, (0.7, -2.0)), (0.1, (1.0, -1.0))]:
            record = compare(args.device, amp, eps, coefs)
            failed += not record["ok"]
            print(json.dumps(record), flush=True)
    if not args.no_timing:
        print(json.dumps(timing(args.device, torch.bfloat16 if args.device == "cpu" else torch.float16)))
        if args.device != "cpu":
            print(json.dumps(timing(args.device, torch.bfloat16)))
    print(json.dumps({"check": "fused_loss_summary", "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
