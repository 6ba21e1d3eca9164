"""Training behaviour end to end, in-process on the session's tiny toy data: determinism, bf16 vs
fp32, gradient accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from nmt.config import from_dict
from nmt.training.trainer import train


def _config(tiny_run: dict, run_dir: Path, **train_options) -> dict:
    data = yaml.safe_load(tiny_run["config"].read_text())
    data["model"]["encoder"]["dropout"] = 0.0
    data["model"]["decoder"]["dropout"] = 0.0
    data["train"].update({"run_dir": str(run_dir), "max_steps": 8, "valid_every": 8, "log_every": 1,
                          **train_options})
    return data


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["type"] == "train"]


def test_same_seed_same_loss_curve(tiny_run, tmp_path):
    for name in ("a", "b"):
        train(from_dict(_config(tiny_run, tmp_path / name)), device="cpu", quiet=True)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert len(_losses(tmp_path / "a")) == 8


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no bf16 CPU kernels")
def test_bf16_loss_stays_close_to_fp32(tiny_run, tmp_path):
    curves = {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        train(from_dict(_config(tiny_run, run, precision=precision, max_steps=16)), device="cpu", quiet=True)
        curves[precision] = _losses(run)
    for fp32, bf16 in zip(curves["fp32"], curves["bf16"], strict=True):
        assert abs(bf16 - fp32) <= 0.03 * fp32, (curves["fp32"], curves["bf16"])
    assert curves["bf16"][-1] < curves["bf16"][0]  # and it does learn


def test_different_seeds_give_different_curves(tiny_run, tmp_path):
    train(from_dict(_config(tiny_run, tmp_path / "a", seed=1)), device="cpu", quiet=True)
    train(from_dict(_config(tiny_run, tmp_path / "b", seed=2)), device="cpu", quiet=True)
    assert _losses(tmp_path / "a") != _losses(tmp_path / "b")


def test_epochs_read_the_sampled_segmentations_in_turn(tiny_run, tmp_path, monkeypatch):
    from itertools import groupby

    from nmt.data.binarize import preprocess
    from nmt.training import trainer as trainer_module

    data = yaml.safe_load(tiny_run["config"].read_text())
    data["data"].update(dir=str(tmp_path / "bin"), sampling={"copies": 2, "alpha": 0.3})
    preprocess(from_dict(data), quiet=True)
    read = []

    def collate(dataset, indices):
        read.append(Path(dataset.name).name)
        return real_collate(dataset, indices)

    real_collate = trainer_module.collate
    monkeypatch.setattr(trainer_module, "collate", collate)
    data["train"].update(run_dir=str(tmp_path / "run"), max_steps=0, max_epochs=4, valid_every=1000,
                         batch_tokens=4000)
    summary = train(from_dict(data), device="cpu", quiet=True)
    assert summary["epochs"] == 4
    epochs = [name for name, _ in groupby(name for name in read if name != "valid")]
    assert epochs == ["train", "train-sampled1", "train-sampled2", "train"]
