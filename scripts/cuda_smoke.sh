#!/usr/bin/env bash
# CUDA smoke test: train the toy Transformer and the quickstart RNN on the GPU in fp32, bf16 and fp16,
# beam-search on the GPU, one-process DDP through torchrun, and the test suite. Prints a JSON line
# per check. Usage: bash scripts/cuda_smoke.sh [PYTHON]   (run from the repository root)
set -uo pipefail
PY=${1:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
W=${WORK:-/tmp/nmt_cuda_smoke}
STEPS=${STEPS:-400}
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
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name())"
nmt toy-corpus "$W/toy" || exit 1
nmt preprocess configs/transformer.yaml "${DATA[@]}" -q || exit 1

for precision in fp32 bf16 fp16; do
    echo "== transformer, $precision"
    time nmt train configs/transformer.yaml "${DATA[@]}" --set "train.run_dir=$W/tr_$precision" \
        --set train.max_steps="$STEPS" --set train.early_stopping.patience=0 --precision "$precision" --device cuda -q
    echo "rc=$?"
    last_record "$W/tr_$precision"
done

echo "== rnn quickstart, bf16"
nmt train configs/quickstart.yaml "${DATA[@]}" --set "train.run_dir=$W/rnn" --set train.max_steps="$STEPS" \
    --precision bf16 --device cuda -q
echo "rc=$?"; last_record "$W/rnn"

for beam in 1 5; do
    echo "== translate on cuda, beam $beam"
    time nmt evaluate -m "$W/tr_bf16" --src "$W/toy/test.src" --ref "$W/toy/test.tgt" --beam "$beam" --device cuda --json
    echo "rc=$?"
done

echo "== DDP: torchrun --nproc_per_node 1"
"$PY" -m torch.distributed.run --nproc_per_node 1 -m nmt train configs/transformer.yaml "${DATA[@]}" \
    --set "train.run_dir=$W/ddp" --set train.max_steps=100 --precision bf16 --device cuda -q
echo "rc=$?"; last_record "$W/ddp"

[ "${SUITE:-1}" = 1 ] || exit 0
echo "== test suite"
timeout "${SUITE_TIMEOUT:-240}" "$PY" -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -15
