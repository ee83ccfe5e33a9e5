#!/usr/bin/env bash
# A CUDA machine checked end to end, meant to take about 10 minutes on an H100/H200 (its first run, on an
# H200, took 16 minutes before the test suite, 11 of them in the two FP8 pairs: BENCHMARKS.md, CUDA):
#
#     bash scripts/gpu_check.sh OUTDIR [PART ...]
#
# Its parts: bench (bench.py on config.yaml: model.py against reference.py, with a profile of the step),
# fp8_n_embd_256 and fp8_n_embd_512 (bench_precision.py --set fp8: bf16 against FP8, 300 steps, at the
# default size and at n_embd 512), train (200 steps of config.yaml with torch.compile on) and pytest
# (the whole test suite, whose CUDA tests run here instead of skipping); the PARTs named, or all of them.
# Each part's output goes to OUTDIR/<part>.log (and .json, and its exit status and commit to <part>.status:
# "running" while it runs, and so for good if the script is killed); the script ends with a summary of every
# part in OUTDIR (run in several calls, the last one sums up all; a part of another commit is named so) and
# exits 1 if one of them failed (124: it ran past PART_TIMEOUT seconds, default 1800).
# On a machine where torch sees no CUDA GPU it stops at once (exit 1); without OUTDIR, exit 2.
# PYTHON=... picks the interpreter (default python3).
set -u -o pipefail
parts=(bench fp8_n_embd_256 fp8_n_embd_512 train pytest)
usage="usage: bash scripts/gpu_check.sh OUTDIR [PART ...] (PARTs: ${parts[*]}; none: all)"
if [ $# -lt 1 ]; then
    echo "$usage" >&2
    exit 2
fi
is_one_of() {  # is_one_of NAME WORD...: whether NAME is one of the WORDs
    local name=$1 word
    shift
    for word in "$@"; do [ "$name" = "$word" ] && return 0; done
    return 1
}
for name in "${@:2}"; do
    if ! is_one_of "$name" "${parts[@]}"; then
        echo "error: no part $name; $usage" >&2
        exit 2
    fi
done
[ $# -gt 1 ] && parts=("${@:2}")
python=${PYTHON:-python3}
if ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "error: scripts/gpu_check.sh checks a CUDA machine, and $python sees no CUDA GPU (or no torch): run it where" \
         "torch.cuda.is_available() is true" >&2
    exit 1
fi
out=$1
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

part() {  # part NAME COMMAND...: runs COMMAND (at most PART_TIMEOUT seconds), its output in OUTDIR/NAME.log
    local name=$1 start=$SECONDS status=0
    shift
    is_one_of "$name" "${parts[@]}" || return 0  # not asked for
    echo "== $name: $*"
    echo "running $commit" >"$out/$name.status"
    timeout "${PART_TIMEOUT:-1800}" "$@" >"$out/$name.log" 2>&1 || status=$?
    echo "$status $commit" >"$out/$name.status"
    if [ $status -eq 0 ]; then
        echo "   ok in $((SECONDS - start)) s"
    else
        echo "   FAILED with status $status after $((SECONDS - start)) s; the end of $out/$name.log:"
        tail -n 20 "$out/$name.log" | sed 's/^/   | /'
    fi
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$python" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| CUDA", torch.version.cuda, "| triton", triton.__version__, "|", torch.cuda.get_device_name(),
"| capability", torch.cuda.get_device_capability())'
    git rev-parse HEAD 2>/dev/null
} >"$out/environment.txt" 2>&1
cat "$out/environment.txt"

train_dir=$(mktemp -d)
trap 'rm -rf "$train_dir"' EXIT
part bench "$python" bench.py --config config.yaml --json "$out/bench.json" --profile "$out/profile.txt"
for size in 256 512; do
    part "fp8_n_embd_$size" "$python" bench_precision.py --set fp8 --config config.yaml model.n_embd=$size \
        training.max_iters=300 --json "$out/fp8_n_embd_$size.json"
done
part train "$python" train.py --config config.yaml training.max_iters=200 training.compile=true \
    training.log_freq=50 training.test_freq=200 training.checkpoint_freq=200 training.checkpoint_dir="$train_dir"
cp "$train_dir"/run_*/metrics.jsonl "$out/train_metrics.jsonl" 2>/dev/null
parallel=()  # pytest-xdist, where installed, spreads the CPU tests over the cores
"$python" -c 'import xdist' 2>/dev/null && parallel=(-n 8)
part pytest "$python" -m pytest -q -rs tests -p no:cacheprovider ${parallel[@]+"${parallel[@]}"}

passed=() failed=()  # every part in OUTDIR, this call's and earlier ones'
for status in "$out"/*.status; do
    [ -f "$status" ] || continue
    read -r code of <"$status"
    name=$(basename "$status" .status)
    [ "$of" = "$commit" ] || name="$name (of commit $of)"
    if [ "$code" = 0 ]; then passed+=("$name"); else failed+=("$name: $code"); fi
done
{
    echo "== summary ($(date -u))"
    sed -n '/^training step/,/^MFU/p; /^profile/p; /^loader/p; /^generation/p' "$out/bench.log" 2>/dev/null
    for size in 256 512; do
        [ -f "$out/fp8_n_embd_$size.log" ] && echo "n_embd $size:" && sed -n '/^after /,$p' "$out/fp8_n_embd_$size.log"
    done
    grep -E '^step (1|50|100|150|200)/|val loss|^done:' "$out/train.log" 2>/dev/null | tail -n 8
    "$python" -c 'import json, sys
waits = [r["data_wait"] for r in map(json.loads, open(sys.argv[1])) if "data_wait" in r and r["step"] > 1]
print(f"waiting for data after step 1: at most {max(waits):.2%} of the step time" if waits else "")' \
        "$out/train_metrics.jsonl" 2>/dev/null
    if [ -f "$out/pytest.log" ]; then
        grep '^SKIPPED' "$out/pytest.log"  # (-rs: why each test skipped; on this machine no "needs a CUDA GPU")
        tail -n 3 "$out/pytest.log"
    fi
    (IFS=,; echo "passed: ${passed[*]-none}" | sed 's/,/, /g')
    [ ${#failed[@]} -eq 0 ] || (IFS=,; echo "FAILED: ${failed[*]}" | sed 's/,/, /g')
} | tee "$out/summary.txt"
[ ${#failed[@]} -eq 0 ]
