"""The Multi30k recipes (configs/multi30k/) and their scripts, on the real data with a tiny budget.

scripts/prepare_multi30k.sh links ../shared/data/multi30k into a temporary directory; each recipe is
then run unchanged through the CLI (`preprocess`, `train`, `translate`) except for `--set` overrides
that point it at the first 2,000 training pairs, a 1,000-piece vocabulary, two training steps and a
temporary run directory. One run is scored by scripts/multi30k_results.sh. The full data is only
read, never trained on: the whole file takes well under a minute on 2 cores.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, SHARED_DATA, run_nmt

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")

RECIPES = sorted((ROOT / "configs" / "multi30k").glob("*.yaml"))
PREPARE = ROOT / "scripts" / "prepare_multi30k.sh"
RESULTS = ROOT / "scripts" / "multi30k_results.sh"
SUBSET = {"train": 2000, "valid": 20, "test": 5}  # sentences kept per split


def run_script(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def head(path: Path, n: int) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line for _, line in zip(range(n), f, strict=False)]


@pytest.fixture(scope="module")
def multi30k(tmp_path_factory) -> dict[str, Path]:
    """prepare_multi30k.sh's layout of the shared data, and a small subset of it with the same names."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    work = tmp_path_factory.mktemp("multi30k")
    linked = work / "linked"
    run_script(PREPARE, SHARED_DATA, linked)
    subset = work / "subset"
    subset.mkdir()
    for split, n in SUBSET.items():
        for lang in ("en", "de", "fr"):
            (subset / f"{split}.{lang}").write_text("".join(head(linked / f"{split}.{lang}.gz", n)), encoding="utf-8")
    return {"work": work, "linked": linked, "subset": subset}


def test_recipes_share_the_time_budget_and_model_selection():
    """Each recipe stops by itself within an hour, picks best.pt by BLEU, keeps >= 3 checkpoints to average."""
    assert [p.name for p in RECIPES] == ["rnn_bahdanau_en_de.yaml", "transformer_d256_en_de.yaml",
                                         "transformer_en_de.yaml", "transformer_en_fr.yaml"]
    run_dirs, data_dirs = set(), {}
    for recipe in RECIPES:
        cfg = yaml.safe_load(recipe.read_text())
        train = cfg["train"]
        assert 0 < train["max_minutes"] <= 57, recipe.name
        assert train["early_stopping"]["metric"] == "bleu" and train["keep_last"] >= 3, recipe.name
        assert train["precision"] == "bf16", recipe.name
        run_dirs.add(train["run_dir"])
        pair = (cfg["data"]["src_lang"], cfg["data"]["tgt_lang"])
        assert data_dirs.setdefault(cfg["data"]["dir"], pair) == pair, f"{recipe.name}: data.dir shared across pairs"
    assert len(run_dirs) == len(RECIPES) and all(d.startswith("runs/multi30k/") for d in run_dirs)


@needs_data
def test_prepare_lays_out_what_the_recipes_read(multi30k):
    for recipe in RECIPES:
        data = yaml.safe_load(recipe.read_text())["data"]
        for split in ("train", "valid", "test"):
            prefix = Path(data[split])
            assert prefix.parent == Path("work/multi30k"), f"{recipe.name}: data.{split} outside work/multi30k"
            for lang in (data["src_lang"], data["tgt_lang"]):
                assert (multi30k["linked"] / f"{prefix.name}.{lang}.gz").is_file(), f"{recipe.name}: {split}.{lang}"
    assert len(head(multi30k["linked"] / "valid.de.gz", 2000)) == 1014
    assert len(head(multi30k["linked"] / "test.fr.gz", 2000)) == 1000


@needs_data
def test_prepare_reports_a_missing_file(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("train", "val"):
        for lang in ("en", "de", "fr", "cs"):
            (raw / f"{name}.{lang}.gz").symlink_to(SHARED_DATA / f"{name}.{lang}.gz")
    proc = run_script(PREPARE, raw, tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "test_2016_flickr.en" in proc.stderr and "github.com/multi30k/dataset" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written before every file was found


@needs_data
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_and_translates_on_multi30k(recipe: Path, multi30k, tmp_path):
    subset = multi30k["subset"]
    run = tmp_path / "run"
    data = [f"data.train={subset / 'train'}", f"data.valid={subset / 'valid'}", f"data.test={subset / 'test'}",
            f"data.dir={tmp_path / 'bin'}", "data.vocab.size=1000"]
    run_nmt("preprocess", str(recipe), *[a for s in data for a in ("--set", s)], "--quiet")
    stats = json.loads((tmp_path / "bin" / "stats.json").read_text())
    assert stats["summary"]["train_pairs"] >= 1990 and stats["summary"]["valid_pairs"] == SUBSET["valid"]
    copies = yaml.safe_load(recipe.read_text())["data"].get("sampling", {}).get("copies", 0)
    assert stats["splits"]["train"].get("sampled", {}).get("copies", 0) == copies
    budget = [f"train.run_dir={run}", "train.max_steps=2", "train.valid_every=1", "train.log_every=1",
              "train.batch_tokens=800", "train.max_minutes=null", "train.keep_last=2"]
    run_nmt("train", str(recipe), *[a for s in data + budget for a in ("--set", s)], "--quiet", "--device", "cpu")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    valid = [r for r in log if r["type"] == "valid"]
    assert [r["step"] for r in valid] == [1, 2] and "bleu" in valid[-1]
    assert log[0]["type"] == "start" and log[0]["parameters"] > 0 and log[-1]["type"] == "end"
    assert (run / "best.pt").is_file() and (run / "ckpt_step00000002.pt").is_file()
    source = head(subset / "test.en", 3)
    out = run_nmt("translate", "-m", str(run), "--beam", "2", "--max-len-b", "5", "--device", "cpu",
                  input="".join(source)).stdout
    assert len(out.splitlines()) == 3
    if recipe.stem == "transformer_en_de":  # the results script, once: beam 1, averaging keep_last = 2
        proc = run_script(RESULTS, "--beam", "1", run)
        assert proc.stdout.startswith("| run | pair | checkpoint | test BLEU (beam 1) |")
        assert "| run | en→de | best.pt |" in proc.stdout and "| run | en→de | avg. last 2 |" in proc.stdout
        assert "nrefs:1|case:mixed|eff:no|tok:13a" in proc.stdout and (run / "averaged.pt").is_file()
        assert json.loads((run / "test.best.json").read_text())["signature"]["bleu"]
