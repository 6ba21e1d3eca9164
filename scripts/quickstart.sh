#!/usr/bin/env bash
# The quickstart, end to end: generate a toy corpus, preprocess, train, translate with beam 5, score.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=work/quickstart
start=$(date +%s)
nmt toy-corpus "$WORK/toy" --force
nmt preprocess configs/quickstart.yaml --force --quiet
nmt train configs/quickstart.yaml --force
nmt translate -m runs/quickstart -i "$WORK/toy/test.src" -o "$WORK/test.hyp" --beam 5
echo "held-out test set, beam 5:"
nmt evaluate --hyp "$WORK/test.hyp" --ref "$WORK/toy/test.tgt" --metrics bleu,chrf
echo "quickstart finished in $(( $(date +%s) - start )) s"
echo "try it:  echo \"\$(head -1 $WORK/toy/test.src)\" | .venv/bin/nmt translate -m runs/quickstart"
