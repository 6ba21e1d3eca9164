"""First-call cost of bf16 scaled-dot-product attention (forward + backward) at sequence lengths not
seen before, with cuDNN attention enabled and disabled (nmt/device.py disables it on CUDA).

    python scripts/cuda_sdpa_first_call.py      (on a CUDA machine; prints one line per setting)
"""

from __future__ import annotations

import time

import torch


def first_calls(cudnn: bool, lengths: range, batch: int = 32, heads: int = 4, head_dim: int = 64) -> list[float]:
    """Seconds of one causal self-attention forward + backward at each length, in order."""
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    seconds = []
    for length in lengths:
        q = torch.randn(batch, heads, length, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    for cudnn, lengths in ((True, range(20, 40)), (False, range(60, 80))):  # each length new to the process
        seconds = first_calls(cudnn, lengths)
        print({"cudnn_sdp": cudnn, "first_call_ms_mean": round(1000 * sum(seconds[1:]) / len(seconds[1:]), 2),
               "max_ms": round(1000 * max(seconds), 1)}, flush=True)


if __name__ == "__main__":
    main()
