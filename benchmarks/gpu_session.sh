#!/usr/bin/env bash
# One short GPU session, in order of value: the GPU tests, the projection speed suite,
# scoring against an in-memory GPU matmul (bf16 and with the influence default), and the
# embedded evaluation on the GPU. Each step has its own time limit and writes its output
# under $OUT (default ./gpu-out), so a step that runs out of time still leaves the others.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh           # on the GPU machine, from the repo root
#   bash benchmarks/gpu_session.sh --smoke                 # toy sizes on the CPU, to check the script
set -u
OUT=${OUT:-gpu-out}
SMOKE=${1:-}
mkdir -p "$OUT"
export PYTHONPATH=src HF_HUB_OFFLINE=1 GHOSTPROJ_HOME="$OUT/home"
summary="$OUT/summary.txt"
: > "$summary"

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep its output, note its exit code and time
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "$name: rc=$? in $((SECONDS - t0)) s" >> "$summary"
}

python -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
    >> "$summary"
if [ "$SMOKE" = "--smoke" ]; then
    step tests 300 python -m pytest -q -p no:warnings tests/test_gpu.py
    step bench_gpu 300 python benchmarks/bench_gpu.py --smoke --out "$OUT/bench_gpu"
    step bench_score 300 python benchmarks/bench_score.py --device cpu --n-train 20000 --n-query 100 --dim 512
    step evaluate 300 python -m ghostproj evaluate --out "$OUT/eval" --subsets 5 --checkpoints 2 \
        --removal-queries 1 --replicates 100 --device cpu
else
    # 510 s of limits in all: one device command may run 600 s
    step tests 120 python -m pytest -q -p no:warnings tests/test_gpu.py
    step bench_gpu 180 python benchmarks/bench_gpu.py --out "$OUT/bench_gpu" --docs 512 --repeats 5
    step bench_score 60 python benchmarks/bench_score.py --device cuda
    step bench_score_influence 60 python benchmarks/bench_score.py --device cuda --metric influence
    step evaluate 90 python -m ghostproj evaluate --out "$OUT/eval" --device cuda
fi
tail -n 3 "$OUT"/bench_*.txt "$OUT/evaluate.txt" >> "$summary" 2>/dev/null
cat "$summary"
