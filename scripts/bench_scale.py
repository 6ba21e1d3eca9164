#!/usr/bin/env python
"""Scaling benchmark: `nmt preprocess` and the first training steps on synthetic corpora of growing size.

    .venv/bin/python scripts/bench_scale.py --sizes 100000,1000000,5000000

For every size N:
1. writes N training pairs (and --valid pairs) of the toy language pair (nmt/data/toy.py: `toy_pair`, streamed
   to disk; unlike `nmt toy-corpus` the pairs are not de-duplicated, which would hold them all in memory);
2. runs `nmt preprocess` in a subprocess (joint BPE vocabulary of --vocab pieces, SentencePiece trained on
   its data.vocab.sample_sentences sample, --workers encoding processes, shards of --shard-size sentences);
3. runs `nmt train` in a subprocess for --steps updates of a small GRU attention model on the CPU (validation
   only once, at the end, on the --valid pairs; checkpoints written as usual).

Per subprocess it records the wall time and two peaks: `peak_rss_mb`, the largest resident set of any one
process (the kernel's ru_maxrss, from os.wait4, which covers the child and its waited-for descendants), and
`tree_pss_mb`, the largest sum of the proportional set sizes of the child and all its descendants, sampled
every 0.2 s from /proc (what the encoding workers cost together, shared pages counted once; Linux only,
else null). Resident sets count
mapped file pages too; nmt's dataset hands those back (see nmt/data/dataset.py).

Prints one JSON object per size (stdout) as it goes, then a one-line summary per size (stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nmt.data.toy import toy_pair  # noqa: E402


def write_corpus(folder: Path, n_train: int, n_valid: int, seed: int) -> float:
    """train/valid .src/.tgt of the toy pair; returns the seconds it took."""
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("valid", n_valid), ("train", n_train)):
        with open(folder / f"{split}.src", "w", encoding="utf-8") as src, \
                open(folder / f"{split}.tgt", "w", encoding="utf-8") as tgt:
            block_src, block_tgt = [], []
            for i in range(n):
                s, t = toy_pair(rng)
                block_src.append(s)
                block_tgt.append(t)
                if len(block_src) == 10_000 or i == n - 1:
                    src.write("\n".join(block_src) + "\n")
                    tgt.write("\n".join(block_tgt) + "\n")
                    block_src, block_tgt = [], []
    return time.perf_counter() - t0


def config(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {"src_lang": "src", "tgt_lang": "tgt", "train": str(folder / "train"),
                            "valid": str(folder / "valid"), "dir": str(folder / "bin"),
                            "vocab": {"size": args.vocab, "type": "bpe", "sample_sentences": args.sample},
                            "shard_size": args.shard_size}
    if args.workers:
        data["workers"] = args.workers
    return {
        "data": data,
        "model": {"encoder": {"type": "rnn", "cell": "gru", "hidden_size": 128, "layers": 1, "dropout": 0.1},
                  "decoder": {"type": "rnn", "cell": "gru", "hidden_size": 128, "layers": 1, "dropout": 0.1},
                  "attention": {"type": "bahdanau"}, "embeddings": {"src_dim": 64, "tgt_dim": 64}},
        "train": {"run_dir": str(folder / "run"), "batch_tokens": args.batch_tokens, "max_steps": args.steps,
                  "valid_every": 10 ** 9, "log_every": args.steps, "valid_batch_size": 200,
                  "early_stopping": {"metric": "loss"}},
    }


# ----------------------------------------------------------------------------------------------
# Measuring a subprocess


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _pss_kb(pid: int) -> int:
    """Proportional set size: resident pages, shared ones divided among their sharers (forked workers share
    much of their parent's memory; summing plain RSS would count it once per worker)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run `command`; wall seconds, exit status, ru_maxrss of the child tree, sampled tree RSS, stderr tail."""
    log = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    tree_peak = [0]
    done = threading.Event()
    sampling = sys.platform.startswith("linux")

    def sample() -> None:
        while not done.wait(0.2):
            tree_peak[0] = max(tree_peak[0], sum(_pss_kb(p) for p in _descendants(proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True) if sampling else None
    if sampler is not None:
        sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    if sampler is not None:
        sampler.join()
    log.seek(0)
    err = log.read().decode("utf-8", "replace")
    return {"seconds": round(wall, 2), "returncode": proc.returncode,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kilobytes
            "tree_pss_mb": round(tree_peak[0] / 1024, 1) if sampling else None,
            "stderr_tail": err[-2000:] if proc.returncode else ""}


def dir_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2 ** 20, 1)


# ----------------------------------------------------------------------------------------------


def run_size(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    folder = work / f"n{n}"
    shutil.rmtree(folder, ignore_errors=True)
    generate_s = write_corpus(folder, n, args.valid, seed=1)
    cfg_path = folder / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config(folder, args)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    nmt = [sys.executable, "-m", "nmt"]
    pre = measure([*nmt, "preprocess", str(cfg_path), "--quiet"], env)
    result: dict[str, Any] = {"pairs": n, "corpus_mb": round(sum((folder / f"train.{s}").stat().st_size
                                                                 for s in ("src", "tgt")) / 2 ** 20, 1),
                              "generate_s": round(generate_s, 1), "preprocess": pre}
    if pre["returncode"] == 0:
        stats = json.loads((folder / "bin" / "stats.json").read_text())
        train_stats = stats["splits"]["train"]
        pre.update(pairs_per_s=round(n / pre["seconds"]), shards=train_stats["shards"],
                   data_dir_mb=dir_mb(folder / "bin"),
                   tokens=train_stats["src_tokens"] + train_stats["tgt_tokens"])
        if args.skip_train:
            return result if args.keep else _cleanup(result, folder)
        train = measure([*nmt, "train", str(cfg_path), "--quiet", "--device", "cpu"], env)
        result["train"] = train
        log = folder / "run" / "log.jsonl"
        if train["returncode"] == 0 and log.is_file():
            records = [json.loads(line) for line in log.read_text().splitlines()]
            steps = [r for r in records if r["type"] == "train"]
            train.update(steps=steps[-1]["step"] if steps else 0,
                         tgt_tokens_per_s=steps[-1]["tgt_tokens_per_s"] if steps else None,
                         loss=steps[-1]["loss"] if steps else None)
    return result if args.keep else _cleanup(result, folder)


def _cleanup(result: dict[str, Any], folder: Path) -> dict[str, Any]:
    shutil.rmtree(folder, ignore_errors=True)
    return result


def summary(r: dict[str, Any]) -> str:
    pre, train = r["preprocess"], r.get("train", {})
    if pre["returncode"]:
        return f"{r['pairs']:>9,} pairs: preprocess FAILED ({pre['returncode']})"
    line = (f"{r['pairs']:>9,} pairs ({r['corpus_mb']:,.0f} MB): preprocess {pre['seconds']:.1f} s = "
            f"{pre['pairs_per_s']:,} pairs/s, peak RSS {pre['peak_rss_mb']:,.0f} MB/process"
            + (f" ({pre['tree_pss_mb']:,.0f} MB all processes)" if pre["tree_pss_mb"] is not None else "")
            + f", {pre['shards']} shard(s)")
    if train:
        line += (f"; train {train.get('steps', 0)} steps {train['seconds']:.1f} s, peak RSS "
                 f"{train['peak_rss_mb']:,.0f} MB" if train["returncode"] == 0 else
                 f"; train FAILED ({train['returncode']})")
    return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000,5000000", help="training pairs, comma-separated")
    parser.add_argument("--valid", type=int, default=200, help="validation pairs")
    parser.add_argument("--steps", type=int, default=50, help="training updates")
    parser.add_argument("--batch-tokens", type=int, default=4000)
    parser.add_argument("--vocab", type=int, default=200, help="joint BPE vocabulary size")
    parser.add_argument("--sample", type=int, default=1_000_000, help="data.vocab.sample_sentences")
    parser.add_argument("--workers", type=int, default=0, help="data.workers (0: nmt's default, min(4, CPUs))")
    parser.add_argument("--shard-size", type=int, default=1_000_000, help="data.shard_size")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the subprocesses")
    parser.add_argument("--workdir", default=None, help="where corpora go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep corpora, data and runs")
    parser.add_argument("--skip-train", action="store_true", help="measure preprocessing only")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for n in sizes:
            result = run_size(n, args, work)
            results.append(result)
            print(json.dumps(result), flush=True)
            print(summary(result), file=sys.stderr, flush=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(summary(r) for r in results), file=sys.stderr)


if __name__ == "__main__":
    main()
