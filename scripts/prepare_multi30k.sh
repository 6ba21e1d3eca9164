#!/usr/bin/env bash
# Lay out the raw Multi30k (task 1) files where the recipes in configs/multi30k/ expect them.
#
#   scripts/prepare_multi30k.sh RAW_DIR [OUT_DIR]      (OUT_DIR defaults to work/multi30k)
#
# RAW_DIR holds the unchanged files of the Multi30k project (github.com/multi30k/dataset,
# data/task1/raw/): {train,val,test_2016_flickr}.{en,de,fr,cs}, plain or .gz. Nothing is downloaded.
# OUT_DIR receives symbolic links named the way the recipes' data: sections read them:
#   train.LANG[.gz]  <- train.LANG[.gz]
#   valid.LANG[.gz]  <- val.LANG[.gz]
#   test.LANG[.gz]   <- test_2016_flickr.LANG[.gz]
# Set MULTI30K_LANGS (default "en de fr cs") to link fewer languages. Running it again refreshes the
# links. A missing file is reported as one line `error: ...` with exit code 2, before anything is written.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

if [[ $# -lt 1 || $# -gt 2 || "$1" == -h || "$1" == --help ]]; then
    echo "usage: $0 RAW_DIR [OUT_DIR]   (OUT_DIR defaults to work/multi30k)" >&2
    [[ $# -ge 1 && ( "$1" == -h || "$1" == --help ) ]] && exit 0
    exit 2
fi
raw=$1
out=${2:-work/multi30k}
langs=${MULTI30K_LANGS:-en de fr cs}

[[ -d "$raw" ]] || die "$raw: not a directory (expected the raw Multi30k files from github.com/multi30k/dataset, data/task1/raw/)"
raw=$(cd "$raw" && pwd -P)

# split name in the Multi30k release -> name the recipes use
splits=("train:train" "val:valid" "test_2016_flickr:test")

# Find every file first, so that a missing one leaves OUT_DIR untouched.
sources=()
targets=()
for pair in "${splits[@]}"; do
    from=${pair%%:*}
    to=${pair#*:}
    for lang in $langs; do
        if [[ -f "$raw/$from.$lang.gz" ]]; then
            sources+=("$raw/$from.$lang.gz")
            targets+=("$to.$lang.gz")
        elif [[ -f "$raw/$from.$lang" ]]; then
            sources+=("$raw/$from.$lang")
            targets+=("$to.$lang")
        else
            die "$raw/$from.$lang.gz: file not found (nor $from.$lang); RAW_DIR must hold the Multi30k task-1 raw files {train,val,test_2016_flickr}.{${langs// /,}}[.gz] from github.com/multi30k/dataset, data/task1/raw/"
        fi
    done
done

mkdir -p "$out" || die "$out: cannot create the output directory"
for i in "${!sources[@]}"; do
    name=${targets[$i]}
    base=${name%.gz}
    rm -f "$out/$base" "$out/$base.gz"  # a link of the other kind (plain vs .gz) would shadow this one
    ln -s "${sources[$i]}" "$out/$name" || die "$out/$name: cannot create the link"
done
echo "linked ${#sources[@]} Multi30k files from $raw into $out" >&2
