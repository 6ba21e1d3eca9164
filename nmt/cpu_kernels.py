"""nmt's compiled CPU kernels, built at first use.

bf16 dropout (+ residual), LayerNorm, multi-head attention, the cross-entropy's passes over the logits, the
bias gradients' column sums, a bf16 transpose (the output layer's logits operand), the gradients' squared
norm for clipping (fp32), and (with AMX) the weight gradients of Linear layers.

The sources are in `nmt/csrc/`: AVX-512 code for bf16 tensors on CPUs with AVX512-BF16 (Intel Sapphire
Rapids and later), parallel over torch's OpenMP threads. `extension()` compiles them once per torch
version with `torch.utils.cpp_extension.load` (about 30 s, cached in torch's extension directory; needs a
C++ compiler and ninja) the first time a caller asks for them. Anything missing, a failed build, or
NMT_CPU_KERNELS=0, and it returns None (the reason in `unavailable_reason`): every caller then keeps its
PyTorch-op path, which computes the same thing.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = ("attention.cpp", "bindings.cpp", "column_sums.cpp", "dropout.cpp", "layer_norm.cpp", "loss.cpp",
           "squared_norm.cpp", "transpose.cpp", "weight_grad.cpp")
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16")
_COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16", "-fopenmp"]
_AMX_FLAGS = ["-mamx-tile", "-mamx-bf16"]  # without them (a compiler before GCC 11): NMT_NO_AMX, no AMX kernel
unavailable_reason: str | None = None  # why extension() is None, once it has been asked


@functools.cache
def _cpu_flags() -> set[str]:
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[-1].split())


def _cpu_supports_kernels() -> bool:
    return all(flag in _cpu_flags() for flag in _CPU_FLAGS)


@functools.cache
def extension() -> Any | None:
    """The compiled module (see `nmt/csrc/bindings.cpp` for its functions), or None when it cannot be
    used here (the reason in `unavailable_reason`)."""
    global unavailable_reason
    if os.environ.get("NMT_CPU_KERNELS", "1") == "0":
        unavailable_reason = "NMT_CPU_KERNELS=0"
        return None
    if not _cpu_supports_kernels():
        unavailable_reason = f"the CPU lacks one of {', '.join(_CPU_FLAGS)}"
        return None
    try:
        version = torch.__version__.replace(".", "_").replace("+", "_")
        return build(f"nmt_cpu_kernels_{version}", [SOURCE_DIR / name for name in SOURCES])
    except Exception as error:  # no compiler, no ninja, a failed build: the PyTorch-op paths still work
        unavailable_reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        return None


def build(name: str, sources: list[Path]) -> Any:
    """Compile `sources` into the extension module `name` (cached by torch under that name), with the AMX
    kernels, or without them (-DNMT_NO_AMX) where the compiler lacks AMX intrinsics; raises when neither
    builds. Also used by the benchmark scripts to build an older revision's kernels beside these."""
    from torch.utils.cpp_extension import load

    paths = [str(path) for path in sources]
    # -fopenmp: at::parallel_for is OpenMP code inlined from torch's headers; without the flag it runs
    # on one thread. The extension then shares torch's OpenMP runtime (same libgomp.so.1).
    try:
        return load(name=name, sources=paths, extra_cflags=_COMPILE_FLAGS + _AMX_FLAGS, extra_ldflags=["-fopenmp"],
                    verbose=False)
    except Exception:  # a compiler without AMX intrinsics: everything else still builds
        return load(name=f"{name}_noamx", sources=paths, extra_cflags=[*_COMPILE_FLAGS, "-DNMT_NO_AMX"],
                    extra_ldflags=["-fopenmp"], verbose=False)


def status() -> str:
    """'on', 'off: <reason>', or 'not used' when nothing has asked for the kernels (nothing is built)."""
    if extension.cache_info().currsize == 0:
        return "not used"
    return "on" if extension() is not None else f"off: {unavailable_reason}"


@functools.cache
def amx_usable() -> bool:
    """Whether the AMX kernels (weight_grad) can run: the CPU has AMX-BF16 and Linux grants this process
    its tile state."""
    flags = _cpu_flags()
    return "amx_bf16" in flags and "amx_tile" in flags and extension() is not None and extension().amx_available()


def usable_on(*tensors: torch.Tensor) -> bool:
    """Whether the kernels apply to these tensors: all bf16 on the CPU, and the extension available."""
    if not all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors):
        return False
    return extension() is not None
