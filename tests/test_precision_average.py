"""Precision choice, autocast and the grad scaler; checkpoint averaging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nmt.errors import NmtError
from nmt.training import precision as precision_module
from nmt.training.average import average_checkpoints, average_run, write_average
from nmt.training.checkpoint import load_checkpoint, save_checkpoint
from nmt.training.precision import autocast, cpu_has_fast_bf16, make_grad_scaler, resolve_precision

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only described, never used: the CUDA queries are patched


# -- precision --------------------------------------------------------------------------------


def test_explicit_precisions_on_cpu():
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(NmtError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    with pytest.raises(NmtError, match="train.precision"):
        resolve_precision("fp8", CPU)


@pytest.mark.parametrize("fast", [True, False])
def test_auto_on_cpu_depends_on_hardware_bf16(monkeypatch, fast):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: fast)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert cpu_has_fast_bf16() is fast
    assert resolve_precision("auto", CPU) == ("bf16" if fast else "fp32")


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_on_cuda_prefers_bf16_where_the_gpu_has_it(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", CUDA) == expected


def test_bf16_on_a_gpu_without_it_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Old GPU")
    with pytest.raises(NmtError, match="Old GPU does not support bfloat16"):
        resolve_precision("bf16", CUDA)
    assert resolve_precision("fp16", CUDA) == "fp16"


def test_autocast_runs_matmuls_in_the_chosen_dtype():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with autocast("fp32", CPU):
        assert layer(x).dtype == torch.float32
    with autocast("bf16", CPU):
        assert layer(x).dtype == torch.bfloat16
    assert layer(x).dtype == torch.float32  # and the context ends cleanly
    assert precision_module.DTYPES["fp16"] == torch.float16


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_disabled_scaler_makes_the_same_update_as_a_plain_step(precision):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    x = torch.randn(5, 4)
    scaler = make_grad_scaler(precision, CPU)
    assert not scaler.is_enabled()
    with autocast(precision, CPU):
        loss_a = a(x).float().pow(2).sum()
    scaler.scale(loss_a).backward()
    scaler.unscale_(opt_a)
    scaler.step(opt_a)
    scaler.update()
    with autocast(precision, CPU):
        b(x).float().pow(2).sum().backward()
    opt_b.step()
    torch.testing.assert_close(a.weight, b.weight)
    assert scaler.state_dict() == {}


def test_scaler_is_enabled_only_for_fp16_on_cuda(monkeypatch):
    created = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: created.append((device, enabled)))
    make_grad_scaler("fp16", CUDA)
    make_grad_scaler("bf16", CUDA)
    make_grad_scaler("fp32", "cuda:0")
    make_grad_scaler("bf16", CPU)
    make_grad_scaler("fp16", CPU)
    assert created == [("cuda", True), ("cuda", False), ("cuda", False), ("cpu", False), ("cpu", False)]


# -- averaging --------------------------------------------------------------------------------


def checkpoint(path: Path, weight, steps: int, vocab: str = "v1", **extra) -> Path:
    """A hand-made checkpoint with a float weight, a bf16 weight and an integer buffer."""
    weight = torch.tensor(weight, dtype=torch.float32)
    model = {"w": weight, "half": weight.to(torch.bfloat16), "count": torch.tensor(steps)}
    model.update(extra)
    save_checkpoint(path, {"model": model, "config": {"steps": steps}, "vocab": {"src": vocab, "tgt": vocab},
                           "src_vocab_size": 8, "tgt_vocab_size": 9, "optimizer": {"state": {}},
                           "train_state": {"step": steps}})
    return path


def test_averaging_two_checkpoints_gives_the_mean(tmp_path):
    a = checkpoint(tmp_path / "a.pt", [1.0, 2.0, 3.0], 10)
    b = checkpoint(tmp_path / "b.pt", [3.0, 6.0, -1.0], 20)
    avg = average_checkpoints([a, b])
    torch.testing.assert_close(avg["w"], torch.tensor([2.0, 4.0, 1.0]))
    assert avg["half"].dtype == torch.bfloat16
    torch.testing.assert_close(avg["half"], torch.tensor([2.0, 4.0, 1.0], dtype=torch.bfloat16))
    assert avg["count"].item() == 20  # integer buffers come from the last checkpoint


def test_bf16_weights_are_accumulated_in_fp32(tmp_path):
    # 256 + 1 is not representable in bf16: a bf16 running sum of 256, 1, 1, 1, 1 would stay at 256.
    paths = [checkpoint(tmp_path / f"{i}.pt", [value], i) for i, value in enumerate([256.0, 1, 1, 1, 1])]
    assert average_checkpoints(paths)["half"].item() == pytest.approx(52.0, abs=0.25)


def test_tied_weights_are_averaged_once(tmp_path):
    shared_a, shared_b = torch.tensor([2.0]), torch.tensor([4.0])
    a = checkpoint(tmp_path / "a.pt", [0.0], 1, emb=shared_a, out=shared_a)
    b = checkpoint(tmp_path / "b.pt", [0.0], 2, emb=shared_b, out=shared_b)
    avg = average_checkpoints([a, b])
    assert avg["emb"].item() == avg["out"].item() == 3.0


def test_mismatched_checkpoints_are_refused_naming_the_file(tmp_path):
    a = checkpoint(tmp_path / "a.pt", [1.0, 2.0], 1)
    renamed = checkpoint(tmp_path / "renamed.pt", [1.0, 2.0], 2, extra=torch.zeros(1))
    reshaped = checkpoint(tmp_path / "reshaped.pt", [1.0, 2.0, 3.0], 3)
    other_vocab = checkpoint(tmp_path / "vocab.pt", [1.0, 2.0], 4, vocab="v2")
    with pytest.raises(NmtError, match=r"renamed\.pt: parameters differ from .*a\.pt \(unexpected extra\)"):
        average_checkpoints([a, renamed])
    with pytest.raises(NmtError, match=r"a\.pt: parameters differ from .*renamed\.pt \(missing extra\)"):
        average_checkpoints([renamed, a])
    with pytest.raises(NmtError, match=r"reshaped\.pt: parameter w has shape \(3,\)"):
        average_checkpoints([a, reshaped])
    with pytest.raises(NmtError, match=r"vocab\.pt: its vocabulary differs"):
        average_checkpoints([a, other_vocab])
    with pytest.raises(NmtError, match="no checkpoints"):
        average_checkpoints([])
    with pytest.raises(NmtError, match="not found"):
        average_checkpoints([a, tmp_path / "missing.pt"])


def test_average_run_takes_the_last_periodic_checkpoints_by_step(tmp_path):
    for step in (30, 20, 100_000_000):
        checkpoint(tmp_path / f"ckpt_step{step:08d}.pt", [float(step)], step)
    checkpoint(tmp_path / "ckpt_step9.pt", [9.0], 9)  # sorted by number, not by name
    checkpoint(tmp_path / "best.pt", [0.0], 0)
    (tmp_path / "ckpt_step00000040.pt.tmp").write_text("partial")
    assert [p.name for p in average_run(tmp_path, 2)] == ["ckpt_step00000030.pt", "ckpt_step100000000.pt"]
    assert average_run(tmp_path, 4)[0].name == "ckpt_step9.pt"
    with pytest.raises(NmtError, match="asked for the last 5 periodic checkpoints but found 4"):
        average_run(tmp_path, 5)
    with pytest.raises(NmtError, match="at least 1"):
        average_run(tmp_path, 0)
    with pytest.raises(NmtError, match="run directory not found"):
        average_run(tmp_path / "nope", 1)


def test_write_average_keeps_the_last_inputs_fields_but_not_its_training_state(tmp_path):
    a = checkpoint(tmp_path / "ckpt_step00000010.pt", [1.0], 10)
    b = checkpoint(tmp_path / "ckpt_step00000020.pt", [5.0], 20)
    out = tmp_path / "averaged.pt"
    out.write_text("an older file is replaced")
    assert write_average([a, b], out) == out
    ckpt = load_checkpoint(out)
    assert ckpt["model"]["w"].item() == 3.0
    assert ckpt["config"] == {"steps": 20} and ckpt["tgt_vocab_size"] == 9
    assert ckpt["vocab"] == {"src": "v1", "tgt": "v1"}
    assert ckpt["averaged_from"] == ["ckpt_step00000010.pt", "ckpt_step00000020.pt"]
    assert not {"optimizer", "train_state"} & set(ckpt)


def test_write_average_refuses_to_overwrite_an_input(tmp_path):
    a = checkpoint(tmp_path / "a.pt", [1.0], 1)
    b = checkpoint(tmp_path / "b.pt", [3.0], 2)
    with pytest.raises(NmtError, match="would overwrite one of the checkpoints"):
        write_average([a, b], tmp_path / "." / "b.pt")
    assert load_checkpoint(b)["model"]["w"].item() == 3.0
    with pytest.raises(NmtError, match="cannot write the averaged checkpoint"):
        write_average([a, b], tmp_path / "no-such-dir" / "avg.pt")
