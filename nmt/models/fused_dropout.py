"""Dropout (+ residual) on bf16 CPU tensors as one compiled kernel, when this machine can build it.

`nmt/models/dropout.py` builds a 0/1 mask with a few tensor ops and applies it with `addcmul`; drawing
and building the mask is most of the cost (3.5 ms of 4 ms for a [4096, 1024] bf16 tensor on 2 Sapphire
Rapids cores). `csrc/fused_dropout.cpp` draws the random bits with a counter-based generator
(splitmix64 of a seed + the element's index) inside the same pass that applies them, keeps the mask as
bits for the backward, and writes `residual + x * keep * scale` directly (0.5 ms); the feed-forward's
ReLU + activation dropout is a second kernel whose backward needs only its output. Same keep rule and
probability as the tensor-op path (8-bit lanes, p' = threshold / 256); the seed of every call is drawn
from torch's default CPU generator, so `torch.manual_seed` and checkpointed RNG states still make the
masks reproducible (they differ from the tensor-op path's masks, and do not depend on the thread count).

The kernel needs AVX-512 (BW, DQ) with AVX512-BF16, a C++ compiler and ninja; it is compiled once per
torch version into torch's extension cache (~20 s) the first time a bf16 dropout runs. Anything
missing, or NMT_FUSED_DROPOUT=0, and `kernel()` returns None: callers keep the tensor-op path.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "fused_dropout.cpp"
_CPU_FLAGS = ("avx512bw", "avx512dq", "avx512_bf16")
unavailable_reason: str | None = None  # why kernel() is None, once it has been asked


def _cpu_supports_kernel() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return all(flag in flags.split() for flag in _CPU_FLAGS)


@functools.cache
def kernel() -> Any | None:
    """The compiled extension (forward, backward, relu_forward, relu_backward), or None when it cannot be
    used here (the reason in `unavailable_reason`)."""
    global unavailable_reason
    if os.environ.get("NMT_FUSED_DROPOUT", "1") == "0":
        unavailable_reason = "NMT_FUSED_DROPOUT=0"
        return None
    if not _cpu_supports_kernel():
        unavailable_reason = f"the CPU lacks one of {', '.join(_CPU_FLAGS)}"
        return None
    try:
        from torch.utils.cpp_extension import load

        version = torch.__version__.replace(".", "_").replace("+", "_")
        return load(name=f"nmt_fused_dropout_{version}", sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512bf16"],
                    verbose=False)
    except Exception as error:  # no compiler, no ninja, a failed build: the tensor-op path still works
        unavailable_reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        return None


def status() -> str:
    """'on', 'off: <reason>', or 'not used' when no bf16 dropout has asked for the kernel (nothing is built)."""
    if kernel.cache_info().currsize == 0:
        return "not used"
    return "on" if kernel() is not None else f"off: {unavailable_reason}"


def _draw_seed() -> int:
    """The kernel's seed for one call, from torch's default CPU generator (manual_seed, resume)."""
    return int(torch.randint(-(2**62), 2**62, (), dtype=torch.int64))


def usable(x: torch.Tensor, residual: torch.Tensor | None, bits: int) -> bool:
    """Whether `fused_dropout(x, residual, ...)` applies: bf16 CPU tensors of one shape, 8-bit lanes."""
    if bits != 8 or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return False
    if residual is not None and (residual.dtype != torch.bfloat16 or residual.shape != x.shape):
        return False
    return kernel() is not None


class _FusedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, residual: torch.Tensor | None, x: torch.Tensor, threshold: int,
                scale: float) -> torch.Tensor:
        seed = _draw_seed()
        out, bits = kernel().forward(x.contiguous(), None if residual is None else residual.contiguous(),
                                     threshold, scale, seed)
        ctx.save_for_backward(bits)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        (bits,) = ctx.saved_tensors
        grad_x = kernel().backward(grad.contiguous(), bits, ctx.scale) if ctx.needs_input_grad[1] else None
        return (grad if ctx.needs_input_grad[0] else None), grad_x, None, None


def fused_dropout(x: torch.Tensor, residual: torch.Tensor | None, threshold: int, scale: float) -> torch.Tensor:
    """residual + x * keep * scale (residual None: x * keep * scale), keep = lane >= threshold; see `usable`."""
    return _FusedDropout.apply(residual, x, threshold, scale)


class _FusedReluDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
        seed = _draw_seed()
        out = kernel().relu_forward(x.contiguous(), threshold, scale, seed)
        ctx.save_for_backward(out)  # the next layer keeps it anyway: no extra memory
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (out,) = ctx.saved_tensors
        return kernel().relu_backward(grad.contiguous(), out, ctx.scale), None, None


def fused_relu_dropout(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """relu(x) * keep * scale in one pass; see `usable`."""
    return _FusedReluDropout.apply(x, threshold, scale)
