"""Every recipe in configs/ builds its model, trains a few steps on CPU and translates (fp32, bf16, int8).

The recipes' own data sections point at corpora a test cannot assume (the quickstart's, Multi30k),
so each recipe's `model:` and `train:` sections are kept and its data is swapped for the session's
tiny binarized toy corpus (a joint vocabulary, as every recipe here expects).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nmt.config import from_dict
from nmt.inference.translator import Translator
from nmt.training.trainer import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(CONFIGS)) for p in RECIPES])
def test_recipe_trains_and_translates(recipe: Path, tiny_run: dict, tmp_path: Path):
    data = yaml.safe_load(recipe.read_text())
    data["data"] = yaml.safe_load((tiny_run["config"]).read_text())["data"]
    data["train"].update(run_dir=str(tmp_path / "run"), max_steps=2, valid_every=2, log_every=1,
                         batch_tokens=300, max_minutes=None, valid_batch_size=200)
    summary = train(from_dict(data, str(recipe)), device="cpu", quiet=True)
    assert summary["steps"] == 2
    translator = Translator.load(tmp_path / "run", device="cpu")
    source = (tiny_run["toy"] / "test.src").read_text().splitlines()[:3]
    for beam, precision, quantize in ((1, "fp32", "none"), (3, "fp32", "none"), (3, "bf16", "none"),
                                      (3, "fp32", "int8")):
        results = translator.translate(source, beam=beam, max_len_b=5, quiet=True, precision=precision,
                                       quantize=quantize)
        assert len(results) == len(source) and all(len(r) == 1 for r in results)
