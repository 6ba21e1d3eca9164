"""Shared fixtures: a tiny trained run built once per test session through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "multi30k"

# Tests use tiny tensors: one thread avoids oversubscription when cores are shared (100x slower otherwise).
torch.set_num_threads(1)


def run_nmt(*args: str, input: str | bytes | None = None, cwd: Path | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m nmt ARGS` as a user would; returns the completed process (text mode)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "nmt", *args], input=input.encode() if isinstance(input, str) else input,
        capture_output=True, cwd=cwd, env=env, timeout=600,
    )
    proc.stdout = proc.stdout.decode("utf-8", "replace")
    proc.stderr = proc.stderr.decode("utf-8", "replace")
    if check and proc.returncode != 0:
        raise AssertionError(f"nmt {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def tiny_config(work: Path, **model) -> dict:
    """A config for a tiny, fast model on the toy corpus in `work/toy`."""
    return {
        "data": {"src_lang": "src", "tgt_lang": "tgt", "train": str(work / "toy" / "train"),
                 "valid": str(work / "toy" / "valid"), "test": str(work / "toy" / "test"),
                 "dir": str(work / "bin"), "vocab": {"size": 120, "type": "unigram"}},
        "model": {"encoder": {"type": "rnn", "cell": "gru", "hidden_size": 16},
                  "decoder": {"type": "rnn", "cell": "gru", "hidden_size": 16},
                  "attention": {"type": "bahdanau"},
                  "embeddings": {"src_dim": 8, "tgt_dim": 8}, **model},
        "train": {"run_dir": str(work / "run"), "batch_tokens": 400, "max_steps": 6, "valid_every": 3,
                  "log_every": 1, "valid_batch_size": 200},
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """Toy corpus -> preprocess -> train 6 steps, through the CLI. Returns paths."""
    work = tmp_path_factory.mktemp("tiny")
    run_nmt("toy-corpus", str(work / "toy"), "--train", "400")
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(work)))
    run_nmt("preprocess", str(config), "--quiet")
    run_nmt("train", str(config), "--quiet", "--device", "cpu")
    return {"work": work, "config": config, "run": work / "run", "bin": work / "bin", "toy": work / "toy"}
