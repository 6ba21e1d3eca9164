"""DistributedDataParallel training through torchrun: 2 processes on the CPU (gloo).

What is compared: rank r of an N-process run takes batches r, r + N, ... of each epoch's batch list and
the loss is normalized by the target tokens of all ranks, so one DDP step equals one step of a single
process that accumulates the union of the ranks' batches -- which is exactly `train.update_freq=2`
in one process (it takes batches 2s and 2s + 1 at step s). Dropout is off in both runs (each rank draws
its own dropout masks, which a single process cannot reproduce), so the parameters must agree up to
float summation order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from nmt.errors import NmtError
from tests.conftest import ROOT, run_nmt, tiny_config

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TOLERANCE = 1e-6


def torchrun(*args: str, nproc: int = 2, check: bool = True, popen: bool = False):
    """`python -m torch.distributed.run --standalone --nproc_per_node N -m nmt ARGS` (gloo on the CPU)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "nmt", *args]
    if popen:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun nmt {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def params(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Toy data, a dropout-free tiny config, and the single-process reference run (update_freq 2)."""
    work = tmp_path_factory.mktemp("ddp")
    run_nmt("toy-corpus", str(work / "toy"), "--train", "400")
    cfg = tiny_config(work)
    cfg["model"]["embeddings"]["dropout"] = 0.0
    for part in ("encoder", "decoder"):
        cfg["model"][part]["dropout"] = 0.0
    cfg["train"].update(max_steps=4, valid_every=2, keep_last=2)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_nmt("preprocess", str(config), "--quiet")
    single = work / "single"
    run_nmt("train", str(config), "--quiet", "--device", "cpu", "--set", f"train.run_dir={single}",
            "--set", "train.update_freq=2")
    return {"work": work, "config": config, "single": single}


@pytest.fixture(scope="module")
def ddp_run(setup) -> dict:
    """2 ranks: 2 steps, then --resume to step 4 (a second torchrun)."""
    run = setup["work"] / "ddp"
    first = torchrun("train", str(setup["config"]), "--device", "cpu", "--set", f"train.run_dir={run}",
                     "--set", "train.max_steps=2")
    step2 = params(run / "ckpt_step00000002.pt")
    second = torchrun("train", str(setup["config"]), "--device", "cpu", "--quiet", "--set", f"train.run_dir={run}",
                      "--resume")
    return {"run": run, "first": first, "second": second, "step2": step2}


def test_both_ranks_finish_and_rank_0_alone_reports(ddp_run):
    err = ddp_run["first"].stderr
    assert "2 processes (gloo)" in err
    assert "effective batch 400 tokens x 2 ranks x update_freq 1 = 800 tokens" in err
    summaries = [line for line in err.splitlines() if line.startswith('{"steps"')]
    assert len(summaries) == 1 and json.loads(summaries[0])["world_size"] == 2
    assert err.count("stopped: reached train.max_steps") == 1


def test_one_run_directory_one_log(ddp_run):
    run = ddp_run["run"]
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["config.yaml", "spm.src.model", "spm.tgt.model", "log.jsonl", "best.pt", "last.pt",
         "ckpt_step00000002.pt", "ckpt_step00000004.pt"])
    log = records(run)
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in log if r["type"] == "valid"] == [2, 4]
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["train_state"]["world_size"] == 2 and len(state["rng_ranks"]) == 2


def test_parameters_match_one_process_on_the_union_of_the_ranks_batches(setup, ddp_run):
    single = setup["single"]
    assert max_diff(ddp_run["step2"], params(single / "ckpt_step00000002.pt")) <= TOLERANCE
    # after --resume under DDP: still the single-process trajectory
    assert max_diff(params(ddp_run["run"] / "last.pt"), params(single / "last.pt")) <= TOLERANCE
    # the comparison can tell: the two runs moved the parameters far more than the tolerance
    assert max_diff(params(single / "ckpt_step00000002.pt"), params(single / "last.pt")) > 1000 * TOLERANCE
    # losses are normalized by the tokens of both ranks: the same numbers as the single process logs
    ddp_losses = [r["loss"] for r in records(ddp_run["run"]) if r["type"] in ("train", "valid")]
    one_losses = [r["loss"] for r in records(single) if r["type"] in ("train", "valid")]
    assert ddp_losses == pytest.approx(one_losses, abs=1e-5)


def test_sigint_stops_every_rank_with_a_checkpoint(setup):
    run = setup["work"] / "interrupted"
    proc = torchrun("train", str(setup["config"]), "--device", "cpu", "--quiet", "--set", f"train.run_dir={run}",
                    "--set", "train.max_steps=100000", "--set", "train.valid_every=100000", popen=True)
    log = run / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and '"train"' in log.read_text()):  # both ranks are in the training loop
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # torchrun forwards it to both workers
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "interrupted by SIGINT at step" in errors[0], err
    step = int(errors[0].split("at step ")[1].split(";")[0])
    assert torch.load(run / "last.pt", weights_only=True)["train_state"]["step"] == step


def test_nproc_reexecutes_the_command_under_torchrun(monkeypatch):
    from nmt.training import distributed

    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(distributed.os, "execv", lambda path, argv: calls.append((path, argv)))
    distributed.launch(4, ["train", "c.yaml", "--nproc", "4", "--device", "cpu", "--nproc=4", "--quiet"])
    assert calls == [(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node=4", "-m", "nmt", "train", "c.yaml", "--device", "cpu",
                                       "--quiet"])]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(NmtError, match="already running under torchrun"):
        distributed.launch(2, ["train", "c.yaml"])
    with pytest.raises(NmtError, match="under torchrun every process uses cuda:LOCAL_RANK"):
        distributed.setup("cuda:1")


def test_outside_torchrun_there_is_no_process_group(monkeypatch):
    from nmt.training import distributed

    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    ctx, device = distributed.setup("cpu")
    assert not ctx.enabled and ctx.is_main and ctx.world_size == 1 and device == torch.device("cpu")
    assert ctx.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0] and ctx.all_gather("x") == ["x"] and ctx.broadcast(3) == 3
    assert ctx.on_main(lambda: 7) == 7
