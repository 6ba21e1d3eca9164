"""End to end through the real CLI (subprocess), and every bad input: one line, exit code 2."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import run_nmt, tiny_config


def assert_user_error(proc, *fragments: str) -> None:
    """Exit code 2 and exactly one `error:` line (progress messages before it are allowed), no traceback."""
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_run_directory_is_complete(tiny_run):
    run = tiny_run["run"]
    for name in ("config.yaml", "best.pt", "last.pt", "log.jsonl", "spm.src.model", "spm.tgt.model"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["type"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["type"] == "valid"] == [3, 6]
    assert all({"loss", "lr", "tgt_tokens_per_s"} <= set(r) for r in records if r["type"] == "train")
    assert all({"loss", "ppl", "bleu"} <= set(r) for r in records if r["type"] == "valid")


def test_translate_keeps_line_count_order_and_empty_lines(tiny_run):
    lines = (tiny_run["toy"] / "test.src").read_text().splitlines()[:7]
    text = "\n".join([lines[0], "", lines[1], "   ", *lines[2:]]) + "\n"
    for beam, options in (("1", ()), ("3", ()), ("3", ("--precision", "bf16")), ("3", ("--quantize", "int8"))):
        proc = run_nmt("translate", "-m", str(tiny_run["run"]), "--beam", beam, *options, "--quiet", input=text)
        out = proc.stdout.split("\n")
        assert out[-1] == "" and len(out) - 1 == 9
        assert out[1] == "" and out[3] == ""


def test_translate_nbest_and_scores(tiny_run, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("a b c\nd e\n")
    out = tmp_path / "out.txt"
    run_nmt("translate", "-m", str(tiny_run["run"] / "best.pt"), "-i", str(src), "-o", str(out),
            "--beam", "3", "--nbest", "2", "--scores", "--quiet")
    lines = out.read_text().splitlines()
    assert len(lines) == 4
    for line in lines:
        score, _, _ = line.partition("\t")
        float(score)


def test_evaluate_hyp_ref_json_and_text(tiny_run):
    ref = tiny_run["toy"] / "test.tgt"
    proc = run_nmt("evaluate", "--hyp", str(ref), "--ref", str(ref), "--json", "--metrics", "bleu,chrf,ter")
    result = json.loads(proc.stdout)
    assert result["bleu"] == 100.0 and result["chrf"] == 100.0 and result["ter"] == 0.0
    assert "tok:13a" in result["signature"]["bleu"]
    text = run_nmt("evaluate", "--hyp", str(ref), "--ref", str(ref)).stdout
    assert text.startswith("BLEU = 100.00") and "nrefs:1" in text


def test_evaluate_translates_with_a_model(tiny_run):
    proc = run_nmt("evaluate", "-m", str(tiny_run["run"]), "--src", str(tiny_run["toy"] / "test.src"),
                   "--ref", str(tiny_run["toy"] / "test.tgt"), "--beam", "2", "--json")
    assert 0.0 <= json.loads(proc.stdout)["bleu"] <= 100.0


# -- bad input ---------------------------------------------------------------------------------


def test_config_with_several_mistakes(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  max_step: 3\n  label_smoothing: 2\nmodel:\n  encoder: {type: rnn, cell: lstmm}\n")
    proc = run_nmt("train", str(cfg), check=False)
    assert_user_error(proc, str(cfg), "3 problems", "train.max_step: unknown key (did you mean 'max_steps'?)",
                      "train.label_smoothing", "model.encoder.cell")


def test_missing_config_and_missing_data(tmp_path):
    assert_user_error(run_nmt("preprocess", str(tmp_path / "none.yaml"), check=False), "config file not found")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    assert_user_error(run_nmt("preprocess", str(cfg), check=False), "train.src")


def test_mismatched_line_counts_and_invalid_utf8(tmp_path):
    run_nmt("toy-corpus", str(tmp_path / "toy"), "--train", "50")
    tgt = tmp_path / "toy" / "train.tgt"
    tgt.write_text("\n".join(tgt.read_text().splitlines()[:-1]) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    assert_user_error(run_nmt("preprocess", str(cfg), check=False), "train.src", "train.tgt")
    src = tmp_path / "toy" / "train.src"
    lines = src.read_bytes().splitlines()[:-1]
    lines[4] = b"bad \xff byte"
    src.write_bytes(b"\n".join(lines) + b"\n")
    assert_user_error(run_nmt("preprocess", str(cfg), check=False), f"{src}:5", "UTF-8")


def test_preprocess_refuses_a_non_empty_output_dir(tiny_run):
    before = sorted(p.name for p in tiny_run["bin"].iterdir())
    proc = run_nmt("preprocess", str(tiny_run["config"]), check=False)
    assert_user_error(proc, "not empty", "--force")
    assert sorted(p.name for p in tiny_run["bin"].iterdir()) == before


def test_train_refuses_an_existing_run_dir(tiny_run):
    before = (tiny_run["run"] / "last.pt").read_bytes()
    assert_user_error(run_nmt("train", str(tiny_run["config"]), check=False), "--resume", "--force")
    assert (tiny_run["run"] / "last.pt").read_bytes() == before


def test_checkpoint_that_is_not_ours(tmp_path):
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"definitely not a checkpoint")
    assert_user_error(run_nmt("translate", "-m", str(fake), input="x\n", check=False), str(fake))


def test_translate_bad_input_and_output(tiny_run, tmp_path):
    assert_user_error(run_nmt("translate", "-m", str(tiny_run["run"]), input=b"ok\n\xc3\x28\n", check=False),
                      "<stdin>:2", "UTF-8")
    out = tmp_path / "missing" / "out.txt"
    assert_user_error(run_nmt("translate", "-m", str(tiny_run["run"]), "-o", str(out), input="x\n",
                              check=False), "does not exist")


def test_translate_bad_quantize(tiny_run):
    for options, fragment in ((("--quantize", "int4"), "--quantize: expected one of none, int8"),
                              (("--quantize", "int8", "--precision", "bf16"), "--quantize int8 replaces")):
        proc = run_nmt("translate", "-m", str(tiny_run["run"]), *options, input="x\n", check=False)
        assert_user_error(proc, fragment)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tiny_run):
    proc = run_nmt("translate", "-m", str(tiny_run["run"]), "--device", "cuda", input="x\n", check=False)
    assert_user_error(proc, "CUDA")
