#!/usr/bin/env bash
# Score every trained Multi30k run on test_2016_flickr and print a Markdown results table.
#
#   scripts/multi30k_results.sh [--no-average] [--beam N] [--lenpen F] [--update-docs] [RUN_DIR ...]
#
# RUN_DIRs default to every runs/multi30k/* holding a best.pt. For each run:
#   1. unless --no-average, `nmt average --last N` writes RUN/averaged.pt, N = the run's train.keep_last
#      (when N >= 2 and the run kept N periodic checkpoints);
#   2. `nmt evaluate -m CKPT --src TEST.SRC --ref TEST.TGT --beam 5 --metrics bleu,chrf --json` scores
#      best.pt (and averaged.pt) on the run's data.test corpus; the JSON is kept as
#      RUN/test.best.json / RUN/test.averaged.json and reused while it is newer than its checkpoint
#      and was made with the same --beam and --lenpen (default 1.0);
#   3. training time, steps, epochs, tokens/s and the best validation BLEU come from RUN/log.jsonl,
#      the wall time from RUN/config.yaml (written at the start) to RUN/last.pt (written at the end),
#      the parameter count from the checkpoint.
# The table goes to stdout; --update-docs also replaces the generated section of docs/results.md
# (between its `multi30k-results` markers). Progress goes to stderr.
set -euo pipefail

usage() { echo "usage: $0 [--no-average] [--beam N] [--lenpen F] [--update-docs] [RUN_DIR ...]" >&2; exit 2; }
die() { echo "error: $*" >&2; exit 2; }

average=1
beam=5
lenpen=1.0
update_docs=0
runs=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --no-average) average=0 ;;
        --beam) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || usage; beam=$2; shift ;;
        --lenpen) [[ $# -ge 2 && "$2" =~ ^[0-9]+(\.[0-9]*)?$ ]] || usage; lenpen=$2; shift ;;
        --update-docs) update_docs=1 ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) usage ;;
        *) [[ -d "$1" ]] || die "$1: run directory not found"; runs+=("$(cd "$1" && pwd -P)") ;;
    esac
    shift
done

root=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$root"  # the runs' config.yaml paths (data.test) are relative to the repository root
if [[ -n "${PYTHON:-}" ]]; then py=$PYTHON
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3
fi
nmt() { PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$py" -m nmt "$@"; }

if [[ ${#runs[@]} -eq 0 ]]; then
    for dir in runs/multi30k/*/; do
        [[ -f "$dir/best.pt" ]] && runs+=("$root/${dir%/}")
    done
    [[ ${#runs[@]} -gt 0 ]] || die "no trained runs under runs/multi30k/ (train a recipe from configs/multi30k/ first)"
fi

# The run's test corpus: "SRC_FILE TGT_FILE" from data.test, data.src_lang, data.tgt_lang of RUN/config.yaml.
test_files() {
    "$py" - "$1" <<'EOF'
import os, sys, yaml
run = sys.argv[1]
data = yaml.safe_load(open(os.path.join(run, "config.yaml"), encoding="utf-8"))["data"]
if not data.get("test"):
    sys.exit(f"error: {run}/config.yaml: data.test is not set, so there is no test corpus to score")
found = []
for lang in (data["src_lang"], data["tgt_lang"]):
    candidates = [f"{data['test']}.{lang}", f"{data['test']}.{lang}.gz"]
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        sys.exit(f"error: {candidates[0]}: file not found (nor .gz); run scripts/prepare_multi30k.sh first")
    found.append(path)
print(" ".join(found))
EOF
}

# How many periodic checkpoints the run kept (train.keep_last of RUN/config.yaml): the number to average.
keep_last() {
    "$py" -c 'import sys, yaml; print(int(yaml.safe_load(open(sys.argv[1], encoding="utf-8"))["train"].get("keep_last") or 0))' \
        "$1/config.yaml"
}

for run in "${runs[@]}"; do
    [[ -f "$run/best.pt" ]] || die "$run: no best.pt (not a trained run)"
    [[ -f "$run/config.yaml" ]] || die "$run: no config.yaml (not a run directory)"
    read -r src ref < <(test_files "$run") || exit 2
    [[ -n "${src:-}" ]] || exit 2
    ckpts=(best)
    if [[ $average -eq 1 ]]; then
        n_periodic=$(find "$run" -maxdepth 1 -name 'ckpt_step*.pt' | wc -l)
        n_average=$(keep_last "$run")
        if [[ $n_average -ge 2 && $n_periodic -ge $n_average ]]; then
            newest=$(find "$run" -maxdepth 1 -name 'ckpt_step*.pt' | sort | tail -1)
            if [[ ! -f "$run/averaged.pt" || "$newest" -nt "$run/averaged.pt" ]]; then
                echo "$(basename "$run"): averaging the last $n_average checkpoints" >&2
                nmt average --last "$n_average" --run-dir "$run" -o "$run/averaged.pt"
            fi
            ckpts+=(averaged)
        else
            echo "$(basename "$run"): $n_periodic periodic checkpoints (train.keep_last: $n_average), not averaging" >&2
        fi
    fi
    for name in "${ckpts[@]}"; do
        out="$run/test.$name.json"
        settings="beam $beam lenpen $lenpen"
        if [[ -s "$out" && "$out" -nt "$run/$name.pt" && "$(cat "$run/test.$name.settings" 2>/dev/null)" == "$settings" ]]; then
            echo "$(basename "$run"): reusing $out" >&2
            continue
        fi
        echo "$(basename "$run"): translating $src with $name.pt, $settings" >&2
        start=$(date +%s)
        nmt evaluate -m "$run/$name.pt" --src "$src" --ref "$ref" --beam "$beam" --lenpen "$lenpen" \
            --metrics bleu,chrf --json > "$out.tmp"
        mv "$out.tmp" "$out"
        echo "$settings" > "$run/test.$name.settings"
        echo "$(basename "$run"): $name.pt scored in $(( $(date +%s) - start )) s: $(cat "$out")" >&2
    done
done

PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$py" - "$update_docs" "$average" "$beam" "$lenpen" "${runs[@]}" <<'EOF'
import json, statistics, sys
from pathlib import Path

import yaml

update_docs, average, beam, lenpen = sys.argv[1] == "1", sys.argv[2] == "1", sys.argv[3], float(sys.argv[4])
runs = [Path(r) for r in sys.argv[5:]]


def parameters(ckpt: Path) -> int:
    """Trainable parameters of the checkpoint's model, tied/shared tensors counted once."""
    from nmt.config import from_dict
    from nmt.models import build_model
    from nmt.training.checkpoint import load_checkpoint

    data = load_checkpoint(ckpt)
    model = build_model(from_dict(data["config"]).model, data["src_vocab_size"], data["tgt_vocab_size"])
    return model.parameter_summary()["total"]


def log_figures(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()] if (run / "log.jsonl").exists() else []
    train = [r for r in records if r.get("type") == "train"]
    valid = [r for r in records if r.get("type") == "valid"]
    speeds = [r["tgt_tokens_per_s"] for r in train if "tgt_tokens_per_s" in r]
    return {
        "steps": max((r.get("step", 0) for r in records), default=0),
        "epochs": max((r.get("epoch", 0) for r in records), default=0),
        "elapsed": max((r.get("elapsed", 0.0) for r in records), default=0.0),
        "val_bleu": max((r["bleu"] for r in valid if "bleu" in r), default=None),
        "tok_s": statistics.median(speeds) if speeds else None,
    }


def minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f}"


rows, signatures = [], {}
for run in runs:
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    pair = f"{config['data']['src_lang']}→{config['data']['tgt_lang']}"
    budget = config["train"].get("max_minutes")
    figures = log_figures(run)
    wall = None
    if (run / "last.pt").exists():
        wall = (run / "last.pt").stat().st_mtime - (run / "config.yaml").stat().st_mtime
        wall = wall if wall > 0 else None  # a copied run directory loses its times
    params = parameters(run / "best.pt")
    averaged = f"avg. last {config['train'].get('keep_last') or 0}"
    for name, label in (("best", "best.pt"), ("averaged", averaged)):
        result_file = run / f"test.{name}.json"
        if not result_file.exists() or name == "averaged" and not (average and (run / "averaged.pt").exists()):
            continue
        result = json.loads(result_file.read_text(encoding="utf-8"))
        for metric, signature in result.get("signature", {}).items():
            signatures.setdefault(metric, set()).add(signature)
        rows.append([
            run.name, pair, label, f"{result['bleu']:.2f}", f"{result['chrf']:.2f}",
            "–" if figures["val_bleu"] is None else f"{figures['val_bleu']:.2f}",
            minutes(figures["elapsed"]), minutes(wall), f"{figures['steps']:,}", str(figures["epochs"]),
            "–" if figures["tok_s"] is None else f"{figures['tok_s']:,.0f}", f"{params / 1e6:.2f}M",
            "–" if budget is None else f"{budget:g}",
        ])

decoding = f"beam {beam}" + (f", lenpen {lenpen:g}" if lenpen != 1.0 else "")
header = ["run", "pair", "checkpoint", f"test BLEU ({decoding})", "test chrF", "best val BLEU (greedy)",
          "train+valid min", "wall min", "steps", "epochs", "tgt tokens/s", "parameters", "max_minutes"]
lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
lines += ["| " + " | ".join(row) + " |" for row in rows]
lines.append("")
for metric in sorted(signatures):
    for signature in sorted(signatures[metric]):
        lines.append(f"sacreBLEU {metric} signature: `{signature}`  ")
table = "\n".join(lines).rstrip() + "\n"
sys.stdout.write(table)

if update_docs:
    doc = Path("docs/results.md")
    begin, end = "<!-- multi30k-results:begin -->", "<!-- multi30k-results:end -->"
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    if begin not in text or end not in text:
        sys.exit(f"error: {doc}: no '{begin}' ... '{end}' section to update")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{table}{end}{tail}", encoding="utf-8")
    print(f"updated {doc}", file=sys.stderr)
EOF
