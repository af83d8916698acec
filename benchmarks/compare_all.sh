#!/usr/bin/env bash
# Every row of the ebft-vs-axolotl table (benchmarks/RESULTS.md, "All rows, one table"), back to back on one
# machine at the same thread count: this machine's limits first, then each row's ebft run and axolotl run. Before
# each run it waits (up to 5 minutes) for the 1-minute load average to fall below 1.5, the previous run's own
# threads included, and writes the load it started at. Run it on a quiet machine; about 30 minutes on 2 cores.
#
#   bash benchmarks/compare_all.sh OUT_DIR [AXOLOTL_PYTHON] [THREADS]
#   ROWS='structured_real' bash benchmarks/compare_all.sh OUT_DIR      # only the runs whose name matches
#
# AXOLOTL_PYTHON: the interpreter of the venv with axolotl 0.19.0 (how to make it: axolotl_strided_step.py).
# OUT_DIR receives limits.json and one log per run (<row>.<program>.log, each starting with its load line).
set -euo pipefail
out=${1:?usage: compare_all.sh OUT_DIR [AXOLOTL_PYTHON] [THREADS]}
axo=${2:-/work/axolotl-venv/bin/python}
threads=${3:-2}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
limits="$out/limits.json"

only=${ROWS:-.}

run() {  # run NAME COMMAND...: the load before, then the command's output, into OUT_DIR/NAME.log
    local name=$1
    shift
    [[ $name =~ $only ]] || return 0
    for _ in $(seq 60); do
        awk '{exit !($1 < 1.5)}' /proc/loadavg && break
        sleep 5
    done
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$out/$name.log"
    "$@" >>"$out/$name.log" 2>&1
    grep -E '^(ebft|axolotl)_(median|fastest|min|peak|step_seconds|fastest_step|median_fraction|fastest_fraction)' \
        "$out/$name.log" | sed "s/^/$name: /"
}

[[ -f $limits ]] || python "$here/limits.py" --threads "$threads" --out "$limits" | tail -n 9

paper=(--hidden 256 --layers 4 --heads 4 --vocab 2048 --seq-len 1024 --docs 2 --n 4 --stride 8 --context 8 --gen 8)
smol=(--hidden 576 --layers 30 --heads 9 --kv-heads 3 --intermediate 1536 --tied --vocab 49152 --seq-len 256 --docs 1)
common=(--threads "$threads" --limits "$limits" --warmup 1)
run strided_paper.ebft python "$here/strided_step.py" "${paper[@]}" "${common[@]}" --steps 4
run strided_paper.axolotl "$axo" "$here/axolotl_strided_step.py" "${paper[@]}" "${common[@]}" --steps 4
run strided_smollm2.ebft python "$here/strided_step.py" "${smol[@]}" "${common[@]}" --steps 3
run strided_smollm2.axolotl "$axo" "$here/axolotl_strided_step.py" "${smol[@]}" "${common[@]}" --steps 3

real=(--num-generations 4 --max-completion 64 --micro-batch 4 --grad-accum 2 --varied)
run structured_real.ebft python "$here/structured_step.py" --workdir "$out/real" --real-model --prompt-tokens 96 \
    --gt-tokens 64 "${real[@]}" "${common[@]}" --steps 4
run structured_real.axolotl "$axo" "$here/axolotl_structured_step.py" --workdir "$out/real" "${real[@]}" \
    "${common[@]}" --steps 4
run structured_equal.ebft python "$here/structured_step.py" --workdir "$out/equal" "${common[@]}" --steps 6
run structured_equal.axolotl "$axo" "$here/axolotl_structured_step.py" --workdir "$out/equal" "${common[@]}" --steps 6
