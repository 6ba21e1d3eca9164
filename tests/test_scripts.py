"""The benchmark scripts report a user's mistake as one line and exit code 2, as the CLI does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script, args, message", [
    ("bench_translate.py", ["-m", "{tmp}/no-such-run"], "model not found"),
    ("bench_train.py", ["configs/multi30k/transformer_d256_en_de.yaml", "--data", "{tmp}/no-data",
                        "--cache", "{tmp}/cache", "--steps", "2"], "train.en: file not found"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, script, args, message):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *(a.format(tmp=tmp_path) for a in args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(errors) == 1 and message in errors[0]
