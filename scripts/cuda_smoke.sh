#!/usr/bin/env bash
# CUDA smoke test: the fused output layer + loss against the unfused one on the GPU, train the toy
# Transformer and the quickstart RNN on the GPU in fp32, bf16 and fp16, beam-search on the GPU,
# one-process DDP through torchrun, optionally the d256 Multi30k recipe (speed and decoding), and the
# test suite. Prints a JSON line per check. Usage: bash scripts/cuda_smoke.sh [PYTHON]   (from the
# repository root). Environment: STEPS (toy updates, 400), M30K_BIN (a preprocessed Multi30k en-de
# directory, data.dir of configs/multi30k/transformer_d256_en_de.yaml: also train that recipe for
# M30K_STEPS updates and benchmark its decoding), SUITE=0 (skip the test suite), PYTEST_ARGS (e.g. "-n 8"
# with pytest-xdist), DEVICE (cuda).
set -uo pipefail
PY=${1:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
W=${WORK:-/tmp/nmt_cuda_smoke}
STEPS=${STEPS:-400}
DEVICE=${DEVICE:-cuda}
TIMEFORMAT="wall_s=%R"
rm -rf "$W"
nmt() { "$PY" -m nmt "$@"; }
DATA=(--set "data.train=$W/toy/train" --set "data.valid=$W/toy/valid" --set "data.test=$W/toy/test"
      --set "data.dir=$W/bin")
last_record() {  # the last train and valid records of a run's log
    grep '"train"' "$1/log.jsonl" | tail -1 | cut -c1-220
    grep '"valid"' "$1/log.jsonl" | tail -1 | cut -c1-220
}

nvidia-smi -L
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
echo "== fused output layer + loss against the unfused one"
"$PY" scripts/cuda_loss_check.py --device "$DEVICE"
echo "rc=$?"
nmt toy-corpus "$W/toy" || exit 1
nmt preprocess configs/transformer.yaml "${DATA[@]}" -q || exit 1

for precision in fp32 bf16 fp16; do
    echo "== transformer, $precision"
    time nmt train configs/transformer.yaml "${DATA[@]}" --set "train.run_dir=$W/tr_$precision" \
        --set train.max_steps="$STEPS" --set train.early_stopping.patience=0 --precision "$precision" --device "$DEVICE" -q
    echo "rc=$?"
    last_record "$W/tr_$precision"
done

echo "== rnn quickstart, bf16"
nmt train configs/quickstart.yaml "${DATA[@]}" --set "train.run_dir=$W/rnn" --set train.max_steps="$STEPS" \
    --precision bf16 --device "$DEVICE" -q
echo "rc=$?"; last_record "$W/rnn"

for beam in 1 5; do
    echo "== translate on cuda, beam $beam"
    time nmt evaluate -m "$W/tr_bf16" --src "$W/toy/test.src" --ref "$W/toy/test.tgt" --beam "$beam" --device "$DEVICE" --json
    echo "rc=$?"
done

echo "== DDP: torchrun --nproc_per_node 1"
"$PY" -m torch.distributed.run --nproc_per_node 1 -m nmt train configs/transformer.yaml "${DATA[@]}" \
    --set "train.run_dir=$W/ddp" --set train.max_steps=100 --precision bf16 --device "$DEVICE" -q
echo "rc=$?"; last_record "$W/ddp"

if [ -n "${M30K_BIN:-}" ]; then
    echo "== Multi30k d256 recipe, bf16, ${M30K_STEPS:=300} updates"
    M30K=(--set "data.dir=$M30K_BIN" --set "train.run_dir=$W/m30k" --set train.max_steps="$M30K_STEPS"
          --set train.valid_every="$M30K_STEPS" --set train.log_every=50 --set train.max_minutes=30)
    time nmt train configs/multi30k/transformer_d256_en_de.yaml "${M30K[@]}" --precision bf16 --device "$DEVICE" -q
    echo "rc=$?"
    grep '"train"' "$W/m30k/log.jsonl" | cut -c1-260
    grep '"valid"' "$W/m30k/log.jsonl" | tail -1 | cut -c1-260
    echo "== Multi30k decoding speed (bench_translate, batch 128, beam 5, fixed 20 tokens)"
    "$PY" scripts/bench_translate.py -m "$W/m30k" --src "$M30K_BIN/test.src.txt" --ref "$M30K_BIN/test.tgt.txt" \
        --device "$DEVICE" --precision bf16 --fixed-len 20 --batch-size 128 | tail -4
    echo "rc=$?"
fi

[ "${SUITE:-1}" = 1 ] || exit 0
echo "== test suite"
timeout "${SUITE_TIMEOUT:-240}" "$PY" -m pytest -q -x --tb=line -p no:cacheprovider ${PYTEST_ARGS:-} tests 2>&1 | tail -25
