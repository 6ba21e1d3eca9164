"""Reliability and safety guarantees, one test (or a few) each; docs/reliability.md lists them.

1. atomic checkpoints          5. hostile input (files, configs, paths)
2. kill-and-resume, Ctrl-C     6. interrupted translate leaves no partial output
3. checkpoints never run code  7. decoding does not depend on batch composition
4. version/config/vocabulary   8. property: any lines in -> as many results out, in order
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

import nmt
from nmt.config import COMPONENT_SCHEMAS, Component, Config, from_dict, load_config
from nmt.data.tokenizer import Tokenizer, train_sentencepiece
from nmt.errors import NmtError
from nmt.inference.translator import Translation, Translator
from nmt.io import write_atomic
from nmt.training.average import write_average
from nmt.training.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from tests.conftest import ROOT, run_nmt, tiny_config
from tests.test_cli import assert_user_error


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def copy_run(run: Path, to: Path, checkpoint: str = "best.pt") -> Path:
    """A run directory holding one checkpoint and the SentencePiece models (enough to translate)."""
    to.mkdir()
    for name in (checkpoint, "spm.src.model", "spm.tgt.model"):
        shutil.copyfile(run / name, to / name)
    return to


# -- 1. checkpoints are written atomically -------------------------------------------------------


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "step": 1})
    before = path.read_bytes()
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", Path(a), Path(b))) or real_replace(a, b))
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 2})
    [(_, tmp, final)] = [c for c in calls if c != "fsync"]
    assert calls.index("fsync") < calls.index(("replace", tmp, final)) and final == path
    assert tmp.parent == path.parent and tmp.name.endswith(".tmp")  # same directory: rename is atomic
    before = path.read_bytes()

    for failure in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        def failing_save(obj, f, *args, failure=failure, **kwargs):
            f.write(b"PK\x03\x04 half a checkpoint")  # the write has started...
            raise failure  # ...and dies midway

        monkeypatch.setattr(torch, "save", failing_save)
        with pytest.raises(type(failure)):
            save_checkpoint(path, {"model": {"w": torch.full((3,), 7.0)}, "step": 3})
        assert path.read_bytes() == before
        assert temp_files(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 2


def test_a_truncated_checkpoint_is_refused_in_one_line(tmp_path):
    path = tmp_path / "cut.pt"
    save_checkpoint(tmp_path / "whole.pt", {"model": {"w": torch.zeros(1000)}})
    path.write_bytes((tmp_path / "whole.pt").read_bytes()[:1500])  # what a non-atomic writer leaves
    with pytest.raises(NmtError, match=r"cut\.pt: not a readable nmt checkpoint") as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)


# -- 2. kill -9 and Ctrl-C during training, then --resume: the same run as without the interruption ---

# `nmt train`, with every update after step SLOW_FROM slowed down so that the test can interrupt it
# at a known point (the sleep touches no random state).
SLOW_TRAIN = """
import sys, time
import nmt.training.trainer as trainer
from nmt.cli import main
slow_from = int(sys.argv[1])
update = trainer.Trainer._update
def slow_update(self, *args, **kwargs):
    if self.state.step >= slow_from:
        time.sleep(0.3)
    return update(self, *args, **kwargs)
trainer.Trainer._update = slow_update
sys.argv = ["nmt"] + sys.argv[2:]
main()
"""


def resume_config(tiny_run, directory: Path, name: str) -> Path:
    cfg = tiny_config(tiny_run["work"])
    cfg["data"]["dir"] = str(tiny_run["bin"])  # already preprocessed
    cfg["train"].update(run_dir=str(directory / name), max_steps=12, valid_every=4, log_every=1, keep_last=10)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def log_records(run_dir: Path) -> list[dict]:
    log = run_dir / "log.jsonl"
    records = []
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return records


def trajectory(run_dir: Path) -> list[tuple]:
    """What must not change with interruptions: per step the train loss, nll and lr; validation results."""
    keys = {"train": ("loss", "nll", "lr", "epoch"), "valid": ("loss", "ppl", "bleu", "best")}
    return [(r["type"], r["step"], *(r[k] for k in keys[r["type"]])) for r in log_records(run_dir)
            if r["type"] in keys]


def start_slow_training(config: Path, slow_from: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, str(slow_from), "train", str(config), "--device",
                             "cpu", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["type"] == "train" and r["step"] >= step for r in log_records(run_dir)):
        assert proc.poll() is None, f"training ended early:\n{proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "training too slow"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference_run(tiny_run, tmp_path_factory) -> Path:
    """The same 12-step run, never interrupted."""
    directory = tmp_path_factory.mktemp("reference")
    run_nmt("train", str(resume_config(tiny_run, directory, "run")), "--device", "cpu", "-q")
    return directory / "run"


def assert_same_run(run_dir: Path, reference: Path) -> None:
    got, want = trajectory(run_dir), trajectory(reference)
    assert [r[:2] for r in got] == [r[:2] for r in want]  # every step logged exactly once
    assert got == want
    final, expected = load_checkpoint(run_dir / "last.pt"), load_checkpoint(reference / "last.pt")
    assert final["train_state"]["step"] == 12
    for name, tensor in expected["model"].items():
        assert torch.equal(final["model"][name], tensor), name


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tiny_run, tmp_path, reference_run):
    config = resume_config(tiny_run, tmp_path, "run")
    run_dir = tmp_path / "run"
    proc = start_slow_training(config, slow_from=8)
    wait_for_step(proc, run_dir, 9)  # last.pt of step 8 is on disk, step 9 logged after it
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert load_checkpoint(run_dir / "last.pt")["train_state"]["step"] == 8
    assert max(r["step"] for r in log_records(run_dir)) >= 9  # records past the checkpoint, to be dropped

    run_nmt("train", str(config), "--resume", "--device", "cpu", "-q")
    assert_same_run(run_dir, reference_run)
    assert temp_files(run_dir) == []


@pytest.mark.slow
def test_sigint_saves_last_pt_and_says_resume(tiny_run, tmp_path, reference_run):
    config = resume_config(tiny_run, tmp_path, "run")
    run_dir = tmp_path / "run"
    proc = start_slow_training(config, slow_from=5)
    wait_for_step(proc, run_dir, 6)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr.decode())
    assert_user_error(result, "interrupted by SIGINT", f"{run_dir / 'last.pt'}", "--resume")
    step = load_checkpoint(run_dir / "last.pt")["train_state"]["step"]
    assert f"at step {step};" in result.stderr and 6 <= step < 12

    run_nmt("train", str(config), "--resume", "--device", "cpu", "-q")
    assert_same_run(run_dir, reference_run)


def test_resume_tolerates_a_log_line_cut_short(tmp_path):
    from nmt.training.trainer import Trainer

    log = tmp_path / "log.jsonl"
    log.write_text('{"type": "train", "step": 1}\n{"type": "train", "step": 9}\n{"type": "tra')  # power cut
    Trainer._truncate_log(SimpleNamespace(run_dir=tmp_path), 8)
    assert log.read_text() == '{"type": "train", "step": 1}\n'


# -- 3. loading a checkpoint never runs code from it ----------------------------------------------


class CreatesAFile:
    """Unpickling this calls open(path, 'w'): a stand-in for any code a hostile file could run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def hostile_checkpoint(path: Path, marker: Path, legacy: bool) -> Path:
    payload = {"format": FORMAT, "format_version": 1, "model": {"w": torch.zeros(2)}, "x": CreatesAFile(marker)}
    if legacy:  # plain pickle, the pre-zip torch format
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, path)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_hostile_checkpoint_file_is_refused_without_running_it(legacy, tmp_path):
    marker = tmp_path / "pwned"
    evil = hostile_checkpoint(tmp_path / "evil.pt", marker, legacy)
    with open(evil, "rb") as f:  # the file is really hostile: an unsafe load runs its code
        torch.load(f, weights_only=False) if not legacy else pickle.load(f)
    assert marker.exists()
    marker.unlink()

    for attempt in (lambda: load_checkpoint(evil), lambda: Translator.load(evil),
                    lambda: write_average([evil, evil], tmp_path / "avg.pt")):
        with pytest.raises(NmtError, match=r"evil\.pt: refusing to load: the file holds Python objects") as e:
            attempt()
        assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    assert not marker.exists() and not (tmp_path / "avg.pt").exists()


def test_translate_and_average_refuse_a_hostile_checkpoint(tiny_run, tmp_path):
    marker = tmp_path / "pwned"
    run = copy_run(tiny_run["run"], tmp_path / "run")
    evil = hostile_checkpoint(run / "best.pt", marker, legacy=False)  # a run directory with a planted best.pt
    average = ["average", str(tiny_run["run"] / "last.pt"), str(evil), "-o", str(tmp_path / "avg.pt")]
    for args in (["translate", "-m", str(run)], average):
        assert_user_error(run_nmt(*args, input="a b c\n", check=False), str(evil), "refusing to load")
    assert not marker.exists() and not (tmp_path / "avg.pt").exists()


# -- 4. checkpoints record the toolkit version, the config and the vocabularies --------------------


def test_checkpoint_records_version_config_and_vocabulary_fingerprints(tiny_run):
    run = tiny_run["run"]
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["format"] == FORMAT and ckpt["format_version"] == 1 and ckpt["nmt_version"] == nmt.__version__
    saved, used = from_dict(ckpt["config"]), load_config(run / "config.yaml")
    saved.path = used.path = None
    assert saved == used
    assert ckpt["vocab"] == {side: Tokenizer.load(run / f"spm.{side}.model").fingerprint for side in ("src", "tgt")}


def test_translate_refuses_a_replaced_sentencepiece_model(tiny_run, tmp_path):
    run = copy_run(tiny_run["run"], tmp_path / "run")
    lines = (tiny_run["toy"] / "train.src").read_text().splitlines()
    other = train_sentencepiece(lines, tmp_path / "other", 100, "unigram")  # same data, another vocabulary
    shutil.copyfile(other, run / "spm.src.model")
    proc = run_nmt("translate", "-m", str(run), input="a b\n", check=False)
    assert_user_error(proc, str(run / "spm.src.model"), "does not match the checkpoint's vocabulary")


def test_translate_refuses_a_config_that_does_not_fit_the_weights(tiny_run, tmp_path):
    run = copy_run(tiny_run["run"], tmp_path / "run")
    ckpt = load_checkpoint(run / "best.pt")
    ckpt["config"]["model"]["encoder"]["hidden_size"] = 32  # the weights have 16
    save_checkpoint(run / "best.pt", ckpt)
    proc = run_nmt("translate", "-m", str(run), input="a b\n", check=False)
    assert_user_error(proc, str(run / "best.pt"), "the saved weights do not fit the model its config describes")

    ckpt["config"]["model"]["encoder"] = {"type": "rnn", "hidden_sise": 16}  # and a config that is not valid
    save_checkpoint(run / "best.pt", ckpt)
    with pytest.raises(NmtError, match=r"best\.pt \(saved config\): model\.encoder\.hidden_sise: unknown key"):
        Translator.load(run)
    save_checkpoint(run / "best.pt", {**ckpt, "format_version": 99})  # a future checkpoint format
    with pytest.raises(NmtError, match="format version 99 is not supported"):
        Translator.load(run)


# -- 5. hostile input --------------------------------------------------------------------------


def windows_text(lines: list[str]) -> bytes:
    """A BOM, CRLF line ends and no final newline."""
    return ("\ufeff" + "\r\n".join(lines)).encode("utf-8")


def test_translate_and_evaluate_accept_crlf_bom_and_no_final_newline(tiny_run, tmp_path):
    lines = (tiny_run["toy"] / "test.src").read_text().splitlines()[:12]
    lines[3:3] = ["\t", "\u3000 \u00a0", ""]  # whitespace only: one empty output line each
    unix, windows = tmp_path / "unix.txt", tmp_path / "windows.txt"
    unix.write_text("".join(line + "\n" for line in lines))
    windows.write_bytes(windows_text(lines))
    outputs = []
    for src in (unix, windows):
        out = tmp_path / f"{src.stem}.out"
        run_nmt("translate", "-m", str(tiny_run["run"]), "-i", str(src), "-o", str(out), "--beam", "2", "-q")
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    out_lines = outputs[0].decode().split("\n")
    assert len(out_lines) == len(lines) + 1 and out_lines[3:6] == ["", "", ""] and out_lines[-1] == ""

    ref = tiny_run["toy"] / "test.tgt"
    hyp = tmp_path / "hyp.txt"
    hyp.write_bytes(windows_text(ref.read_text().splitlines()))
    assert json.loads(run_nmt("evaluate", "--hyp", str(hyp), "--ref", str(ref), "--json").stdout)["bleu"] == 100.0


def test_preprocess_accepts_crlf_bom_and_no_final_newline(tiny_run, tmp_path):
    (tmp_path / "toy").mkdir()
    for path in tiny_run["toy"].iterdir():
        (tmp_path / "toy" / path.name).write_bytes(windows_text(path.read_text().splitlines()))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    run_nmt("preprocess", str(config), "-q")
    made = sorted(p.name for p in (tmp_path / "bin").iterdir())
    assert made == sorted(p.name for p in tiny_run["bin"].iterdir())
    for name in made:
        if name != "stats.json":  # it names the input files
            assert (tmp_path / "bin" / name).read_bytes() == (tiny_run["bin"] / name).read_bytes(), name


def test_nul_bytes_and_invalid_utf8_name_file_and_line(tiny_run, tmp_path):
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"fine\nalso fine\nnot \x00 fine\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\ncaf\xe9\n")
    assert_user_error(run_nmt("translate", "-m", str(tiny_run["run"]), "-i", str(nul), check=False),
                      f"{nul}:3", "NUL byte")
    assert_user_error(run_nmt("evaluate", "--hyp", str(nul), "--ref", str(nul), check=False), f"{nul}:3", "NUL")
    assert_user_error(run_nmt("evaluate", "--hyp", str(latin), "--ref", str(latin), check=False),
                      f"{latin}:2", "invalid UTF-8")


def test_evaluate_line_count_mismatch_and_empty_files(tiny_run, tmp_path):
    ref = tiny_run["toy"] / "test.tgt"
    short = tmp_path / "short.txt"
    short.write_text("a b\n")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    n = len(ref.read_text().splitlines())
    assert_user_error(run_nmt("evaluate", "--hyp", str(short), "--ref", str(ref), check=False),
                      f"{ref} has {n} lines but {short} has 1")
    assert_user_error(run_nmt("evaluate", "-m", str(tiny_run["run"]), "--src", str(short), "--ref", str(ref),
                              check=False), f"{ref} has {n} lines but {short} has 1")
    assert_user_error(run_nmt("evaluate", "--hyp", str(empty), "--ref", str(empty), check=False),
                      f"{empty}: empty file")
    out = tmp_path / "out.txt"  # translating nothing is not an error: zero lines out
    run_nmt("translate", "-m", str(tiny_run["run"]), "-i", str(empty), "-o", str(out), "-q")
    assert out.read_bytes() == b""


def test_preprocess_refuses_an_empty_training_file(tmp_path):
    run_nmt("toy-corpus", str(tmp_path / "toy"), "--train", "20")
    for side in ("src", "tgt"):
        (tmp_path / "toy" / f"train.{side}").write_bytes(b"")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    assert_user_error(run_nmt("preprocess", str(config), check=False), "train.src: empty file")


def test_one_megabyte_line_is_truncated_with_one_warning(tiny_run, tmp_path):
    words = (tiny_run["toy"] / "test.src").read_text().split()
    rng = random.Random(0)
    line = " ".join(rng.choice(words) for _ in range(300_000))[: 1 << 20]
    src = tmp_path / "big.txt"
    src.write_text(line + "\n")
    proc = run_nmt("translate", "-m", str(tiny_run["run"]), "-i", str(src), "--beam", "2")
    assert proc.stdout.count("\n") == 1 and proc.stdout.endswith("\n")
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: line 1: ")
    assert "truncated to the first 1024" in warnings[0]


def _schema_fields(cls: type, data_path: tuple) -> typing.Iterator[tuple[tuple, str, dataclasses.Field, dict]]:
    """(path of the mapping, field name, field, mapping that selects it) for every field of the schema tree,
    every registered component type included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or (cls is Config and f.name == "path"):
            continue
        tp = hints[f.name]
        if tp is Component:
            for name, schema in COMPONENT_SCHEMAS[f.name].items():
                for path, key, field, _ in _schema_fields(schema, (*data_path, f.name)):
                    yield path, key, field, {"type": name}
        elif dataclasses.is_dataclass(tp):
            yield from _schema_fields(tp, (*data_path, f.name))
        else:
            yield data_path, f.name, f, {}


def _config_with(path: tuple, selector: dict, key: str, value) -> dict:
    data: dict = {}
    node = data
    for part in path:
        node = node.setdefault(part, {})
    node.update(selector)
    node[key] = value
    return data


ALL_FIELDS = list(_schema_fields(Config, ()))


def test_mistyped_keys_at_any_depth_suggest_the_right_one():
    assert len(ALL_FIELDS) > 60
    for path, key, _, selector in ALL_FIELDS:
        typo = key[:-1] + key[-1] * 2  # 'hidden_size' -> 'hidden_sizee'
        dotted = ".".join((*path, typo))
        with pytest.raises(NmtError) as error:
            from_dict(_config_with(path, selector, typo, 1), "c.yaml")
        assert f"{dotted}: unknown key (did you mean '{key}'?)" in str(error.value)


def test_sizes_must_be_positive_and_dropouts_in_0_1():
    checked = 0
    for path, key, field, selector in ALL_FIELDS:
        dotted = ".".join((*path, key))
        bounds = {k: v for k, v in field.metadata.items() if k in ("gt", "ge", "lt", "le") and v is not None}
        if key.endswith("dropout") or key == "label_smoothing":
            assert bounds == {"ge": 0, "lt": 1}, dotted
        if key.endswith(("size", "_dim", "layers", "heads", "batch_tokens", "max_len", "max_positions")):
            assert bounds.get("gt") == 0, dotted
        for bad in [b - 1 for k, b in bounds.items() if k == "ge"] + [b for k, b in bounds.items() if k == "gt"] \
                + [b for k, b in bounds.items() if k == "lt"] + [b + 1 for k, b in bounds.items() if k == "le"]:
            with pytest.raises(NmtError, match=f"{dotted}: must be") as error:
                from_dict(_config_with(path, selector, key, bad), "c.yaml")
            assert "\n" not in str(error.value)
            checked += 1
    assert checked > 50


def test_yaml_that_is_not_a_mapping_through_the_cli(tmp_path):
    config = tmp_path / "list.yaml"
    config.write_text("- data\n- model\n")
    assert_user_error(run_nmt("train", str(config), check=False), str(config), "must be a YAML mapping")


def test_output_path_that_cannot_be_written(tiny_run, tmp_path):
    assert_user_error(run_nmt("translate", "-m", str(tiny_run["run"]), "-o", str(tmp_path), input="a\n",
                              check=False), str(tmp_path), "cannot write")
    assert_user_error(run_nmt("average", str(tiny_run["run"] / "last.pt"), "-o", "/nonexistent/dir/avg.pt",
                              check=False), "/nonexistent/dir/avg.pt", "cannot write")
    assert temp_files(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_into_a_read_only_directory(tiny_run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        proc = run_nmt("translate", "-m", str(tiny_run["run"]), "-o", str(locked / "out.txt"), input="a\n",
                       check=False)
        assert_user_error(proc, str(locked / "out.txt"), "cannot write", "Permission denied")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


# -- 6. an interrupted translate leaves no partial output ----------------------------------------


def test_ctrl_c_during_translate_leaves_the_old_output_untouched(tiny_run, tmp_path):
    words = (tiny_run["toy"] / "test.src").read_text().split()
    long_line = " ".join(words * (2000 // len(words) + 1))  # > 1024 tokens: warns, then decodes for a while
    src = tmp_path / "big.txt"
    # 20,000 more lines, decoded one at a time: minutes of decoding, so the Ctrl-C lands mid-way on any machine
    src.write_text(long_line + "\n" + (tiny_run["toy"] / "train.src").read_text() * 50)
    out = tmp_path / "out.txt"
    out.write_text("the previous translation\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # SIG_DFL in the child: a shell's background job (`make test &`) starts with SIGINT ignored, and so would it
    proc = subprocess.Popen([sys.executable, "-m", "nmt", "translate", "-m", str(tiny_run["run"]), "-i", str(src),
                             "-o", str(out), "--batch-size", "1"], stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr.readline().startswith(b"warning: line 1:")  # inputs read and encoded: decoding now
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 130, stderr  # the shell's code for Ctrl-C
    assert "Traceback" not in stderr
    assert out.read_text() == "the previous translation\n"
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), OSError(28, "No space left on device")],
                         ids=["ctrl-c", "disk-full"])
def test_write_atomic_interrupted_midway(failure, tmp_path, monkeypatch):
    out = tmp_path / "out.txt"
    out.write_text("old\n")

    def fail(fd):
        raise failure

    monkeypatch.setattr(os, "fsync", fail)  # after the text was written to the temp file
    with pytest.raises(NmtError if isinstance(failure, OSError) else KeyboardInterrupt) as error:
        write_atomic(out, "new\n" * 1000)
    if isinstance(failure, OSError):
        assert str(error.value) == f"{out}: cannot write (No space left on device)"
    assert out.read_text() == "old\n" and temp_files(tmp_path) == []


# -- 7. decoding does not depend on batch composition --------------------------------------------


@pytest.fixture(scope="module")
def translator(tiny_run) -> Translator:
    return Translator.load(tiny_run["run"], device="cpu")


def test_translation_is_independent_of_batch_composition(translator, tiny_run):
    lines = (tiny_run["toy"] / "test.src").read_text().splitlines()[:40]
    lines[5:5] = ["", "   "]
    for beam in (1, 4):
        alone = [translator.translate([line], beam=beam, batch_size=1, quiet=True)[0][0] for line in lines]
        for batch_size, seed in ((3, 1), (16, 2), (64, 3)):
            order = list(range(len(lines)))
            random.Random(seed).shuffle(order)
            batched = translator.translate([lines[i] for i in order], beam=beam, batch_size=batch_size, quiet=True)
            for position, i in enumerate(order):
                got = batched[position][0]
                assert got.tokens == alone[i].tokens, (beam, batch_size, i)
                assert got.score == pytest.approx(alone[i].score, abs=1e-4)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batch_consistency_script(tiny_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "batch_consistency.py"), "-m",
                           str(tiny_run["run"]), "--src", str(tiny_run["toy"] / "test.src"), "--limit", "30",
                           "--beam", "3", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["n"] == 30 and report["identical_rate"] == 1.0 and report["differing"] == []


def test_batch_consistency_script_explains_a_difference(tiny_run, monkeypatch, capsys):
    """The report's `differing` entries, with a translator that changes line 2 when batched."""
    script = _load_script("batch_consistency")
    real = Translator.translate

    def translate(self, lines, **kwargs):
        results = real(self, lines, **kwargs)
        if len(lines) > 1:
            i = lines.index(source)
            t = results[i][0]
            results[i] = [Translation([*t.tokens, 5], t.score - 0.5, t.log_prob, t.text + " extra")]
        return results

    source = (tiny_run["toy"] / "test.src").read_text().splitlines()[1]
    monkeypatch.setattr(Translator, "translate", translate)
    assert script.main(["-m", str(tiny_run["run"]), "--src", str(tiny_run["toy"] / "test.src"), "--limit", "5",
                        "--beam", "2", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["identical"] == 4 and report["identical_rate"] == 0.8
    (diff,) = report["differing"]
    assert diff["line"] == 2 and diff["batched"] == diff["alone"] + " extra"
    assert diff["alone_score"] - diff["batched_score"] == pytest.approx(0.5, abs=1e-5)
    assert diff["top2_gap"] >= 0 and isinstance(diff["near_tie"], bool)


# -- 8. property: any list of lines -> the same number of results, in the same order -------------

_pieces = st.sampled_from(["", " ", "\t", "a", "b c", "😀", "👩\u200d👩\u200d👧", "e\u0301", "\u0301", "ß", "İ",
                           "中文", "\u200b", "\u00a0", "ﬁ", "\U0010fffd", "\r", "\u2028", "«»", "<unk>", "</s>"])
_line = st.one_of(
    st.text(max_size=40),
    st.lists(_pieces, max_size=15).map("".join),
    st.builds(lambda piece, n: piece * n, st.sampled_from(["😀 ", "a ", "e\u0301", "中"]), st.integers(20, 150)),
)


@settings(max_examples=25, deadline=None)
@given(lines=st.lists(_line, max_size=6), batch_size=st.integers(1, 5))
@example(lines=["a " * 3000, "", "😀"], batch_size=2)  # over the 1024-token input limit
def test_translate_returns_one_result_per_line_in_order(translator, lines, batch_size):
    results = translator.translate(lines, beam=2, batch_size=batch_size, quiet=True)
    assert len(results) == len(lines)
    backwards = translator.translate(lines[::-1], beam=2, batch_size=batch_size + 1, quiet=True)[::-1]
    for line, per_line, again in zip(lines, results, backwards, strict=True):
        assert len(per_line) == 1
        assert per_line[0].tokens == again[0].tokens
        if not line.strip():
            assert per_line[0] == Translation([], 0.0, 0.0, "")
