#!/usr/bin/env python
"""In-process paired A/B of two variants of the training step, for when whole-run A/B rounds drown in
the machine's drift (docs/benchmarks.md, sixth round).

    .venv/bin/python scripts/bench_ab.py --switch fused-linear --steps 30
    .venv/bin/python scripts/bench_ab.py --attr nmt.training.loss:FUSED_BLOCK_ROWS=256,1024 --steps 30
    .venv/bin/python scripts/bench_ab.py --swap nmt.training.loss:_OutputLayerCrossEntropy@6dc8253 --steps 40
    .venv/bin/python scripts/bench_ab.py --kernels nmt.models.linear@5cadae4 --steps 60

Builds the library's Trainer once (Multi30k en-de, the d256 recipe, bf16, as `bench_train.py`) and runs
every batch twice, once with each variant, alternating which goes first; prints the mean time per
update of each and the per-update ratios. `--switch NAME` turns one of the library's fast paths off (A)
and on (B); `--attr MODULE:NAME=A,B` sets a module-level integer to A, then B; `--swap MODULE:NAME@REV`
sets the module attribute NAME to its definition in MODULE's source at git revision REV (A), then to the
work tree's (B) -- for a change inside one function or class; `--kernels MODULE[,MODULE...]@REV` hands
the listed modules the compiled kernels built from `nmt/csrc` at revision REV (A), then the work tree's
(B) -- for a change inside a kernel.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_train  # noqa: E402

from nmt.allocator import tune_allocator  # noqa: E402
from nmt.errors import run_reporting_errors  # noqa: E402

CONFIG = ROOT / "configs/multi30k/transformer_d256_en_de.yaml"


def _fused_linear() -> dict[str, Callable[[], None]]:
    from nmt.models import linear

    on = linear._applies
    return {"off": lambda: setattr(linear, "_applies", lambda weight, x: False),
            "on": lambda: setattr(linear, "_applies", on)}


def _column_sums() -> dict[str, Callable[[], None]]:
    from nmt.models import linear

    kernel = linear._bias_grad
    return {"torch-sum": lambda: setattr(linear, "_bias_grad", lambda rows: rows.sum(0).float()),
            "column-sums": lambda: setattr(linear, "_bias_grad", kernel)}


def _amx_weight_grad() -> dict[str, Callable[[], None]]:
    from nmt.models import linear

    applies = linear._amx_applies
    return {"onednn": lambda: setattr(linear, "_amx_applies", lambda rows, x: False),
            "amx": lambda: setattr(linear, "_amx_applies", applies)}


def _norm_fork() -> dict[str, Callable[[], None]]:
    from nmt.models.layer_norm import LayerNorm

    fork = LayerNorm.fork
    return {"separate-add": lambda: setattr(LayerNorm, "fork", lambda self, x: (self(x), x)),
            "norm-fork": lambda: setattr(LayerNorm, "fork", fork)}


def _joint_qkv() -> dict[str, Callable[[], None]]:
    from nmt.models.multihead import MultiHeadAttention

    joint = MultiHeadAttention.project_self
    return {"q-and-kv": lambda: setattr(MultiHeadAttention, "project_self",
                                        lambda self, x: (self.project_query(x), *self.project_memory(x))),
            "joint-qkv": lambda: setattr(MultiHeadAttention, "project_self", joint)}


SWITCHES = {"fused-linear": _fused_linear, "column-sums": _column_sums, "amx-weight-grad": _amx_weight_grad,
            "norm-fork": _norm_fork, "joint-qkv": _joint_qkv}


def attr_variants(spec: str) -> dict[str, Callable[[], None]]:
    """MODULE:NAME=A,B -> {"NAME=A": set it to A, "NAME=B": set it to B}; ValueError saying what is wrong."""
    target, _, values = spec.partition("=")
    module_name, _, name = target.partition(":")
    numbers = values.split(",")
    if not (module_name and name and len(numbers) == 2 and all(v.strip().lstrip("-").isdigit() for v in numbers)):
        raise ValueError(f"--attr {spec!r}: expected MODULE:NAME=A,B with two integers A, B")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--attr {spec!r}: cannot import {module_name}: {error}") from None
    if not isinstance(getattr(module, name, None), int):
        raise ValueError(f"--attr {spec!r}: {module_name} has no integer {name}")
    return {f"{name}={v.strip()}": (lambda v=int(v): setattr(module, name, v)) for v in numbers}


def swap_variants(spec: str) -> dict[str, Callable[[], None]]:
    """MODULE:NAME@REV -> {"NAME@REV": NAME as MODULE's source at git revision REV defines it, "NAME": the
    work tree's}; ValueError saying what is wrong."""
    target, _, rev = spec.partition("@")
    module_name, _, name = target.partition(":")
    if not (module_name and name and rev):
        raise ValueError(f"--swap {spec!r}: expected MODULE:NAME@REV")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--swap {spec!r}: cannot import {module_name}: {error}") from None
    path = Path(module.__file__).resolve().relative_to(ROOT).as_posix()
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
    if shown.returncode:
        raise ValueError(f"--swap {spec!r}: git show {rev}:{path}: {shown.stderr.strip().splitlines()[0]}")
    old = types.ModuleType(f"{module_name}@{rev}")
    exec(compile(shown.stdout, f"{path}@{rev}", "exec"), old.__dict__)  # noqa: S102 (the repository's own code)
    if not (hasattr(module, name) and hasattr(old, name)):
        raise ValueError(f"--swap {spec!r}: {name} is not defined in both versions of {module_name}")
    new_value, old_value = getattr(module, name), getattr(old, name)
    return {f"{name}@{rev}": lambda: setattr(module, name, old_value),
            name: lambda: setattr(module, name, new_value)}


def kernel_variants(spec: str) -> dict[str, Callable[[], None]]:
    """MODULE[,MODULE...]@REV -> {"kernels@REV": those modules use the kernels built from nmt/csrc at REV,
    "kernels": the work tree's}; ValueError saying what is wrong. Builds REV's sources (about 30 s, cached
    by torch under a name of its own)."""
    from nmt import cpu_kernels

    names, _, rev = spec.partition("@")
    if not (names and rev):
        raise ValueError(f"--kernels {spec!r}: expected MODULE[,MODULE...]@REV")
    try:
        modules = [importlib.import_module(name) for name in names.split(",")]
    except ImportError as error:
        raise ValueError(f"--kernels {spec!r}: {error}") from None
    if not all(getattr(m, "cpu_kernels", None) is cpu_kernels for m in modules):
        raise ValueError(f"--kernels {spec!r}: every module must import nmt.cpu_kernels")
    if cpu_kernels.extension() is None:
        raise ValueError(f"--kernels {spec!r}: no compiled kernels here ({cpu_kernels.unavailable_reason})")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", f"{rev}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode:
        raise ValueError(f"--kernels {spec!r}: unknown revision {rev}")
    source_dir = Path(tempfile.mkdtemp(prefix=f"nmt_kernels_{commit.stdout.strip()}_"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit.stdout.strip(), "nmt/csrc"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source_dir)], input=archive, check=True)
    csrc = source_dir / "nmt" / "csrc"
    old = cpu_kernels.build(f"nmt_kernels_ab_{commit.stdout.strip()}", sorted(csrc.glob("*.cpp")))
    shutil.rmtree(source_dir, ignore_errors=True)
    old_kernels = types.SimpleNamespace(extension=lambda: old, usable_on=cpu_kernels.usable_on,
                                        amx_usable=lambda: cpu_kernels.amx_usable() and old.amx_available())

    def use(kernels: object) -> Callable[[], None]:
        def apply() -> None:
            for module in modules:
                module.cpu_kernels = kernels
        return apply

    return {f"kernels@{rev}": use(old_kernels), "kernels": use(cpu_kernels)}


def paired_times(variants: dict[str, Callable[[], None]], steps: int, skip: int, data: str,
                 cache: str) -> dict[str, list[float]]:
    """Seconds per update of each of the two variants (each applied by its callable right before its
    run of a batch), over the same batches, after the first `skip` batches."""
    tune_allocator()
    trainer, run_dir = bench_train.benchmark_trainer(CONFIG, Path(data), Path(cache), steps, "bf16", [])
    update, times, count = trainer._update, {name: [] for name in variants}, [0]
    names = list(variants)

    def paired_update(batches):
        count[0] += 1
        for name in names if count[0] % 2 else names[::-1]:
            variants[name]()
            t0 = time.perf_counter()
            out = update(batches)
            if count[0] > skip:
                times[name].append(time.perf_counter() - t0)
        return out

    trainer._update = paired_update
    try:
        trainer.train()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return times


def report(times: dict[str, list[float]]) -> str:
    """One line: mean ms per update of A and B, the speed-up of B, and the per-update ratios A/B."""
    (a_name, a), (b_name, b) = times.items()
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    quartiles = statistics.quantiles(ratios, n=4)
    return (f"updates {len(ratios)}: {a_name} {statistics.fmean(a) * 1e3:.0f} ms, {b_name} "
            f"{statistics.fmean(b) * 1e3:.0f} ms, speed-up of {b_name} {sum(a) / sum(b):.3f} (per-update ratios: "
            f"median {statistics.median(ratios):.3f}, quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f})")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=4, help="first batches left out (warm-up)")
    parser.add_argument("--data", default=str(bench_train.DEFAULT_DATA))
    parser.add_argument("--cache", default="work/bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--switch", choices=sorted(SWITCHES), help="a fast path: off (A) vs on (B)")
    choice.add_argument("--attr", metavar="MODULE:NAME=A,B", help="a module-level integer: A vs B")
    choice.add_argument("--swap", metavar="MODULE:NAME@REV",
                        help="a module attribute as defined at git revision REV vs the work tree's")
    choice.add_argument("--kernels", metavar="MODULE[,MODULE...]@REV",
                        help="those modules with the compiled kernels of git revision REV vs the work tree's")
    add_common_arguments(parser)
    args = parser.parse_args()
    try:
        if args.switch:
            variants = SWITCHES[args.switch]()
        else:
            variants = (attr_variants(args.attr) if args.attr else kernel_variants(args.kernels) if args.kernels
                        else swap_variants(args.swap))
    except ValueError as error:
        parser.error(str(error))
    print(report(paired_times(variants, args.steps, args.skip, args.data, args.cache)))


if __name__ == "__main__":
    run_reporting_errors(main)
