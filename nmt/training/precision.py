"""Mixed precision: choose fp32 / bf16 / fp16 for a device, and give the trainer one code path for all.

`autocast` runs the forward pass in the chosen dtype (a no-op for fp32); `make_grad_scaler` returns a
`torch.amp.GradScaler` that is enabled only for fp16 on CUDA -- disabled, its scale/unscale_/step/update
are pass-throughs, so the trainer calls them the same way for every precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from nmt.errors import NmtError

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(name: str, device: torch.device | str, key: str = "train.precision") -> str:
    """'fp32' | 'bf16' | 'fp16' for `name` on `device`; 'auto' picks the fastest safe one.

    auto: CUDA with bf16 (compute capability >= 8.0) -> bf16, older CUDA -> fp16 (with loss scaling),
    CPU with hardware bf16 -> bf16, other CPUs -> fp32. fp16 needs CUDA; bf16 needs a GPU that has it.
    """
    device = torch.device(device)
    if name not in PRECISIONS:
        raise NmtError(f"{key}: expected one of {', '.join(PRECISIONS)}, got {name!r}")
    cuda = device.type == "cuda"
    if name == "auto":
        if cuda:
            return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
    if name == "fp16" and not cuda:
        raise NmtError(f"--precision fp16 needs a CUDA device (this run is on {device.type}); use bf16 or fp32")
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise NmtError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                       "use fp16 or fp32")
    return name


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """Run the enclosed forward pass in `precision` ('fp32' changes nothing)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[precision]):
        yield


def make_grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """A GradScaler that scales the loss only for fp16 on CUDA (bf16 and fp32 need no scaling)."""
    device_type = torch.device(device).type
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16" and device_type == "cuda")
