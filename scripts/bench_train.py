#!/usr/bin/env python
"""Training-speed benchmark: a fixed number of updates of the library's Trainer on Multi30k en-de.

    .venv/bin/python scripts/bench_train.py configs/multi30k/transformer_d256_en_de.yaml --steps 60 --precision bf16

1. Preprocesses Multi30k en->de (train / val / test_2016_flickr from --data, plain or .gz) with one joint
   8k BPE SentencePiece model, like the JoeyNMT harness (../shared/bench/joeynmt), into a cache directory
   (work/bench/data-<hash of the data settings>) unless it already exists; done by `nmt preprocess` in a
   subprocess, so its memory does not count in this process's peak RSS.
2. Builds `nmt.training.trainer.Trainer` from CONFIG (+ the data overrides, --precision, --set) and runs
   its `train()` loop for --steps updates. Validation is replaced by a stub (it is not what is measured)
   and checkpoints are not written; everything else -- batching, collate, forward, loss, backward,
   clipping, optimizer, schedule -- is the library's code. Each `_update` call is timed; the first
   --warmup updates (allocator and kernel warm-up) are left out of the rates.
3. Measures the matmul peak of this machine in fp32 and bf16 (a few large matmuls of the model's shapes,
   best of several repetitions) in the same process, before and after training, and (unless
   --no-probes) with the best of those shapes for ~50 ms after every timed update, outside its timing.
   The peak is the max of all of them. These machines are shared: their matmul speed swings by up to 2x
   within minutes, so MFU is also given paired, per update against the probe right after it
   (`mfu_paired_median`); `mfu` itself (all timed FLOPs over all timed seconds, against the max peak)
   is the conservative figure.

Model FLOPs are counted analytically from the real (non-padding) tokens of every timed batch:

    forward = 2 * P_src * n_src + 2 * P_tgt * n_tgt + attention
      P_src = L_enc * (4 d^2 + 2 d f) + L_dec * 2 d^2        (encoder layers; decoder cross-attn K/V of the memory)
      P_tgt = L_dec * (6 d^2 + 2 d f) + d V                   (decoder self-attn Q/K/V/O, cross Q/O, FFN; output layer)
      attention = sum over sentences (s, t = real lengths) of
                  4 d (L_enc s^2 + L_dec t^2 + L_dec t s)     (Q K^T and A V, 2 flops per multiply-add)
    training = 3 x forward                                     (backward = 2 x forward: grads of inputs and weights)

i.e. 6 x matmul parameters x tokens + attention terms (embeddings, norms, softmax and dropout count zero;
padding and the causal mask's skipped half are not useful work and are not counted as such: t^2 is the full
square, as in the usual MFU convention). Model FLOP utilisation (MFU) = model FLOP/s / matmul peak FLOP/s
of the training dtype (bf16 for --precision bf16, fp32 for fp32).

Prints one JSON object (stdout) and a one-line summary (stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nmt import cpu_kernels  # noqa: E402
from nmt.allocator import tune_allocator  # noqa: E402
from nmt.config import load_config  # noqa: E402
from nmt.errors import NmtError, run_reporting_errors  # noqa: E402
from nmt.vocab import PAD_ID  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "multi30k"


def data_overrides(data: Path, cache: Path) -> list[str]:
    """Config overrides that point `data:` at Multi30k en-de with a joint 8k BPE vocabulary in `cache`."""
    settings = [f"data.train={data / 'train'}", f"data.valid={data / 'val'}",
                f"data.test={data / 'test_2016_flickr'}", "data.src_lang=en", "data.tgt_lang=de",
                "data.vocab.type=bpe", "data.vocab.size=8000", "data.vocab.joint=true"]
    key = hashlib.sha1("\n".join(settings).encode()).hexdigest()[:10]
    return [*settings, f"data.dir={cache / f'data-{key}'}"]


def ensure_data(config: Path, overrides: list[str], data_dir: Path) -> None:
    if (data_dir / "stats.json").exists() or (data_dir / "spm.src.model").exists():
        return
    print(f"preprocessing into {data_dir} ...", file=sys.stderr)
    sets = [arg for item in overrides for arg in ("--set", item)]
    done = subprocess.run([sys.executable, "-m", "nmt", "preprocess", str(config), *sets, "--quiet"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        raise NmtError(f"preprocessing the benchmark data failed: {lines[-1].removeprefix('error: ')}")


# ----------------------------------------------------------------------------------------------
# Matmul peak


MATMUL_SHAPES = ((4096, 256, 1024), (4096, 1024, 256), (4096, 256, 8000), (4096, 256, 768))


def matmul_peak(dtype: torch.dtype, shapes: tuple[tuple[int, int, int], ...] = MATMUL_SHAPES,
                seconds: float = 0.3) -> dict[str, float]:
    """Best FLOP/s of `a @ b` ([m, k] x [k, n]) in `dtype` per shape, over repetitions for ~`seconds` each."""
    result = {}
    for m, k, n in shapes:
        a = torch.randn(m, k).to(dtype)
        b = torch.randn(k, n).to(dtype)
        out = torch.empty(m, n, dtype=dtype)
        torch.matmul(a, b, out=out)
        best, spent = math.inf, 0.0
        while spent < seconds:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            dt = time.perf_counter() - t0
            best, spent = min(best, dt), spent + dt
        result[f"{m}x{k}x{n}"] = 2 * m * k * n / best
    return result


# ----------------------------------------------------------------------------------------------
# FLOPs


def model_dims(cfg) -> dict[str, int]:
    enc, dec = cfg.model.encoder, cfg.model.decoder
    if enc.type != "transformer" or dec.type != "transformer":
        raise SystemExit("bench_train counts FLOPs for transformer encoder + decoder configs only")
    if enc.d_model != dec.d_model:
        raise SystemExit("bench_train assumes encoder and decoder share d_model")
    return {"d": dec.d_model, "f_enc": enc.ff_size, "f_dec": dec.ff_size, "L_enc": enc.layers, "L_dec": dec.layers}


def forward_flops(dims: dict[str, int], vocab: int, src_len: torch.Tensor, tgt_len: torch.Tensor) -> float:
    """Forward FLOPs of one batch from its real lengths (see the module docstring)."""
    d, le, ld = dims["d"], dims["L_enc"], dims["L_dec"]
    p_src = le * (4 * d * d + 2 * d * dims["f_enc"]) + ld * 2 * d * d
    p_tgt = ld * (6 * d * d + 2 * d * dims["f_dec"]) + d * vocab
    s, t = src_len.double(), tgt_len.double()
    attention = 4 * d * float((le * s * s + ld * t * t + ld * t * s).sum())
    return 2 * p_src * float(s.sum()) + 2 * p_tgt * float(t.sum()) + attention


# ----------------------------------------------------------------------------------------------


# profiler op name -> (left, right) operand shapes of the product, from its input shapes
MATMUL_OPS = {
    "aten::mm": lambda shapes: (shapes[0], shapes[1]),
    "aten::bmm": lambda shapes: (shapes[0], shapes[1]),
    "aten::addmm": lambda shapes: (shapes[1], shapes[2]),  # (bias, a, b)
    "mkldnn::_linear_pointwise": lambda shapes: (shapes[0], shapes[1][::-1]),  # (x, weight [out, in], bias)
}


def print_matmul_shapes(profiler: Any, updates: int, rows: int = 40) -> None:
    """The profiled mm / addmm / bmm / oneDNN linear calls by input shape: ms per update, calls per
    update, TFLOP/s."""
    found = []
    for event in profiler.key_averages(group_by_input_shape=True):
        shapes = event.input_shapes
        if event.key not in MATMUL_OPS or not event.self_cpu_time_total:
            continue
        a, b = MATMUL_OPS[event.key](shapes)
        flops = 2 * math.prod(a) * b[-1] * event.count
        found.append((event.self_cpu_time_total / 1e3 / updates, event.count / updates,
                      flops / (event.self_cpu_time_total / 1e6) / 1e12, event.key, a, b))
    for ms, calls, tflops, key, a, b in sorted(found, reverse=True)[:rows]:
        print(f"{ms:7.2f} ms/update {calls:5.1f} calls {tflops:5.2f} TFLOP/s  {key} {a} x {b}", file=sys.stderr)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def benchmark_trainer(config: Path, data: Path, cache: Path, steps: int, precision: str,
                      extra: list[str]) -> tuple[Any, Path]:
    """(Trainer, its temporary run directory) for `steps` updates of CONFIG on Multi30k en-de from `data`
    (preprocessed into `cache` once), `extra` config overrides last; validation is a stub and no
    checkpoint is written (neither is what is measured)."""
    from nmt.training.trainer import Trainer

    overrides = data_overrides(data.resolve(), cache.resolve())
    ensure_data(config, overrides, Path(overrides[-1].split("=", 1)[1]))
    run_dir = Path(tempfile.mkdtemp(prefix="bench-run-", dir=cache))
    overrides += [f"train.run_dir={run_dir}", f"train.max_steps={steps}", "train.max_minutes=null",
                  "train.max_epochs=0", f"train.valid_every={steps + 1}", f"train.log_every={steps + 1}",
                  f"train.precision={precision}", *extra]
    trainer = Trainer(load_config(config, overrides), device="cpu", force=True, quiet=True)
    trainer.validate = lambda: {"loss": math.nan, "ppl": math.nan, "bleu": 0.0}
    trainer._save = lambda name: None
    return trainer, run_dir


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks_before = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}

    trainer, run_dir = benchmark_trainer(Path(args.config), Path(args.data), Path(args.cache), args.steps,
                                         args.precision, args.set)
    dtype = "bf16" if trainer.precision == "bf16" else "fp32"
    probe_shape = max(peaks_before[dtype], key=peaks_before[dtype].get)
    probe_dims = tuple(int(n) for n in probe_shape.split("x"))
    probe_type = torch.bfloat16 if dtype == "bf16" else torch.float32
    cfg = trainer.cfg
    dims = model_dims(cfg)
    vocab = trainer.tgt_tok.vocab_size
    steps: list[dict[str, float]] = []
    update = trainer._update

    profiler = None

    def timed_update(batches):
        nonlocal profiler
        if args.profile and len(steps) == args.warmup:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                              record_shapes=args.profile_shapes)
            profiler.__enter__()
        t0 = time.perf_counter()
        out = update(batches)
        seconds = time.perf_counter() - t0
        if profiler is not None and len(steps) + 1 == args.warmup + args.profile:
            profiler.__exit__(None, None, None)
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows),
                  file=sys.stderr)
            if args.profile_shapes:
                print_matmul_shapes(profiler, args.profile)
            profiler = None
        record = {"seconds": seconds, "loss": out[0], "tgt": 0, "src": 0, "cells": 0, "flops": 0.0}
        for b in batches:
            s, t = (b.src != PAD_ID).sum(1), (b.tgt_out != PAD_ID).sum(1)
            record["src"] += int(s.sum())
            record["tgt"] += int(t.sum())
            record["cells"] += b.src.numel() + b.tgt_out.numel()
            record["flops"] += 3 * forward_flops(dims, vocab, s, t)
        steps.append(record)
        profiled = args.profile and len(steps) <= args.warmup + args.profile
        if args.probes and len(steps) > args.warmup and not profiled:
            record["probe"] = matmul_peak(probe_type, (probe_dims,), seconds=0.05)[probe_shape]
        return out

    trainer._update = timed_update
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0

    peaks_after = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    peaks = {dt: {k: max(peaks_before[dt][k], peaks_after[dt][k]) for k in peaks_before[dt]} for dt in peaks_before}
    peak = {dt: max(v.values()) for dt, v in peaks.items()}

    timed = steps[args.warmup:] if len(steps) > args.warmup else steps
    probed = [r for r in timed if "probe" in r]
    probes = [r["probe"] for r in probed]
    peak[dtype] = max([peak[dtype], *probes])
    seconds = sum(r["seconds"] for r in timed)
    tgt = sum(r["tgt"] for r in timed)
    src = sum(r["src"] for r in timed)
    cells = sum(r["cells"] for r in timed)
    flops = sum(r["flops"] for r in timed)
    per_step_tps = [r["tgt"] / r["seconds"] for r in timed]
    losses = [r["loss"] for r in steps]
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "config": str(args.config), "steps": len(steps), "timed_steps": len(timed), "warmup_steps": args.warmup,
        "precision": trainer.precision, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "parameters": trainer.model.parameter_summary()["total"], "batch_tokens": cfg.train.batch_tokens,
        "overrides": args.set,
        "tgt_tokens_per_s": tgt / seconds, "src_tgt_tokens_per_s": (src + tgt) / seconds,
        "tgt_tokens_per_s_median_step": statistics.median(per_step_tps),
        "seconds_per_step": seconds / len(timed), "train_wall_s": wall,
        "padding_ratio": 1 - (src + tgt) / cells,
        "peak_rss_mb": peak_rss_mb(), "rss_end_mb": current_rss_mb(),
        "model_flops_per_s": flops / seconds, "model_flops_per_step": flops / len(timed),
        "matmul_peak_flops": peak, "matmul_peak_by_shape": peaks,
        "mfu": (flops / seconds) / peak[dtype], "mfu_dtype": dtype,
        "matmul_probes_between_updates": {
            "shape": probe_shape, "count": len(probes),
            **({"min": min(probes), "median": statistics.median(probes), "max": max(probes)} if probes else {})},
        "mfu_paired_median": (statistics.median(r["flops"] / r["seconds"] / r["probe"] for r in probed)
                              if probed else None),
        "loss_first": losses[0], "loss_last": losses[-1],
        "loss_mean_last10": statistics.fmean(x for x in losses[-10:] if math.isfinite(x)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config (a transformer encoder-decoder)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer updates to run")
    parser.add_argument("--warmup", type=int, default=5, help="first updates left out of the rates")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="directory with the raw Multi30k files")
    parser.add_argument("--cache", default=str(ROOT / "work" / "bench"), help="where preprocessed data goes")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "auto"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile N updates after the warm-up ones (torch.profiler table on stderr; "
                             "those updates are slower)")
    parser.add_argument("--profile-rows", type=int, default=30)
    parser.add_argument("--profile-shapes", action="store_true",
                        help="with --profile: also each matmul shape's time per update and TFLOP/s")
    parser.add_argument("--no-probes", dest="probes", action="store_false",
                        help="no matmul probe after each timed update (then the peak is measured only before "
                             "and after training)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="keep glibc's malloc settings (nmt's CLI tunes them: nmt/allocator.py)")
    args = parser.parse_args(argv)
    tuned = not args.malloc_defaults and tune_allocator()
    result = {**run(args), "allocator_tuned": tuned}
    result["cpu_kernels"] = cpu_kernels.status()
    print(json.dumps(result))
    print(f"[bench_train] {result['precision']} {result['timed_steps']} steps: "
          f"{result['tgt_tokens_per_s']:.0f} tgt tok/s, {result['src_tgt_tokens_per_s']:.0f} src+tgt tok/s, "
          f"{result['seconds_per_step'] * 1000:.0f} ms/step, padding {result['padding_ratio']:.1%}, "
          f"{result['model_flops_per_s'] / 1e12:.3f} TFLOP/s = {result['mfu']:.1%} of the {result['mfu_dtype']} "
          f"matmul peak ({result['matmul_peak_flops'][result['mfu_dtype']] / 1e12:.2f} TFLOP/s)"
          + (f", paired with the probe after each update: median {result['mfu_paired_median']:.1%}"
             if result["mfu_paired_median"] is not None else "")
          + f", peak RSS {result['peak_rss_mb']:.0f} MB, loss {result['loss_first']:.2f} -> {result['loss_last']:.2f}",
          file=sys.stderr)


if __name__ == "__main__":
    run_reporting_errors(main)
