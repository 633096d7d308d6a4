#!/usr/bin/env bash
# Every GPU figure of issue 14 in one command, on one CUDA machine (benchmarks/RESULTS.md, "GPU"):
#
#   bash benchmarks/run_gpu.sh                 # a CUDA machine; logs and summary.md under $OUT (./gpu-results)
#   DRY=1 bash benchmarks/run_gpu.sh           # the same plumbing on a CPU at tiny sizes (what CI machines can do)
#   STEPS="model compile" bash benchmarks/run_gpu.sh    # only some steps (a rerun)
#
# Steps, most important first; each has its own time limit and may fail without losing the others:
#   env       nvidia-smi (read-only queries), torch / CUDA / cuDNN / driver / package versions
#   pytest    the gpu-marked tests that need no Ray (Detector on CUDA in fp32/bf16/fp16 against fp32 on the
#             CPU, fp32 without TF32, bf16 model, collate on the GPU, nvJPEG decoding)
#   model     bench_model.py: bf16, batch 1/8/32, eager, ours vs transformers, FLOPs and the measured peak
#   annotate  bench_annotate_gpu.py: decode pool -> Detector vs the model alone, COCO-sized and 12 MP,
#             nvJPEG decoding
#   finetune  bench_finetune.py: one bf16 training step at batch 4 and 8 (800x800), ours vs transformers
#   ray       only where Ray imports (carried wheels: benchmarks/gpu_wheels.sh): tests/finetune/test_finetune_gpu.py
#             (one epoch, --gpus-per-worker 1 --precision bf16) and the real `python -m jobs.annotate`
#   compile   bench_model.py with torch.compile: CUDA graphs (reduce-overhead) at batch 1, default at 32
# BUDGET_S (default 420) caps the whole run: a step gets at most what is left, and steps are skipped once
# it is spent, so the summary always comes back inside a 10-minute device call.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
BUDGET_S=${BUDGET_S:-420}
STEPS=${STEPS:-env pytest model annotate finetune ray compile}
START=$SECONDS

# Carried wheels (e.g. Ray: see benchmarks/RESULTS.md), installed off-line; none are needed for the Ray-free steps.
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

if [[ -n ${DRY:-} ]] || ! python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    DRY=1
    echo "run_gpu: DRY run (no CUDA or DRY=1): CPU, tiny sizes; the figures mean nothing, the plumbing does"
fi
if python3 -c 'import ray' 2>/dev/null; then HAS_RAY=1; else HAS_RAY=; fi

# step NAME LIMIT_S LOG COMMAND...: run COMMAND within min(LIMIT_S, budget left), appending to $OUT/LOG.
step() {
    local name=$1 limit=$2 log=$OUT/$3
    shift 3
    [[ " $STEPS " == *" $name "* ]] || return 0
    local left=$((BUDGET_S - (SECONDS - START)))
    if ((left < 20)); then
        echo "run_gpu: step $name: skipped, budget spent" | tee -a "$log"
        return 0
    fi
    ((limit > left)) && limit=$left
    local command="$*"
    echo "run_gpu: step $name (limit ${limit} s): ${command:0:200}" | tee -a "$log"
    local begin=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local status=${PIPESTATUS[0]}
    echo "run_gpu: step $name: exit $status after $((SECONDS - begin)) s" | tee -a "$log"
}

versions() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --format=csv \
            --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu
        nvidia-smi
    fi
    python3 - <<'EOF'
import importlib, os, platform, torch
print(f"python {platform.python_version()}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
      f"cuDNN {torch.backends.cudnn.version()}; {os.cpu_count()} CPUs")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
for name in ("torchvision", "transformers", "timm", "pyarrow", "fsspec", "PIL", "scipy", "ray", "pytest"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except ImportError:
        print(f"{name}: not installed")
EOF
}

if [[ -n $DRY ]]; then
    MODEL=(--device cpu --dtype fp32 --height 64 --width 96 --repeats 1)
    ANNOTATE=(--device cpu --precision fp32 --images 12 --large-images 8 --min-size 128 --max-size 213
        --batch-size 4 --workers 1 --repeats 1)
    FINETUNE=(--device cpu --precision bf16 --image-size 128 --rounds 1 --steps 1)
    COMPILE_1=(--batch-sizes 1 --compile default)
    COMPILE_32=()
else
    MODEL=(--device cuda --dtype bf16 --repeats 20)
    ANNOTATE=(--device cuda --precision bf16)
    FINETUNE=(--device cuda --precision bf16 --image-size 800 --rounds 5 --steps 2)
    COMPILE_1=(--batch-sizes 1 --compile reduce-overhead)
    COMPILE_32=(--batch-sizes 32 --compile default)
fi
GPU_TESTS=(tests/annotate/test_detector.py tests/detr/test_model.py tests/detr/test_preprocess.py
    tests/benchmarks/test_gpu_jpeg.py)

step env 60 env.txt bash -c "$(declare -f versions); versions"
step pytest 180 pytest.log python3 -m pytest -q -p no:cacheprovider -m gpu -rs "${GPU_TESTS[@]}"
step model 150 model.log python3 benchmarks/bench_model.py "${MODEL[@]}" --batch-sizes 1 8 32 --measure-peak
step annotate 240 annotate.log python3 benchmarks/bench_annotate_gpu.py "${ANNOTATE[@]}" --gpu-decode
for batch in 4 8; do
    step finetune 100 finetune.log python3 benchmarks/bench_finetune.py "${FINETUNE[@]}" --batch-size "$batch"
done
if [[ -n $HAS_RAY ]]; then
    step ray 150 pytest.log python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/finetune/test_finetune_gpu.py
    step ray 240 annotate.log python3 benchmarks/bench_annotate_gpu.py "${ANNOTATE[@]}" --job-only
elif [[ " $STEPS " == *" ray "* ]]; then
    echo "run_gpu: step ray: skipped, Ray is not installed (benchmarks/gpu_wheels.sh makes wheels to carry)" |
        tee -a "$OUT/pytest.log"
fi
step compile 180 model.log python3 benchmarks/bench_model.py "${MODEL[@]}" "${COMPILE_1[@]}" --measure-peak
((${#COMPILE_32[@]})) && step compile 180 model.log python3 benchmarks/bench_model.py "${MODEL[@]}" \
    "${COMPILE_32[@]}" --measure-peak

# The summary, last, so that a device call's output tail holds it.
{
    echo "# issue 14 GPU run, $(date -u +%Y-%m-%dT%H:%MZ), $((SECONDS - START)) s"
    grep -h -m1 -E '^(GPU:|python )' "$OUT/env.txt" 2>/dev/null
    grep -h -A1 '^name, driver_version' "$OUT/env.txt" 2>/dev/null | tail -1
    echo
    echo "## gpu-marked tests"
    grep -h -E '^[0-9]+ [a-z]+.* in [0-9.]+s' "$OUT/pytest.log" 2>/dev/null
    grep -h -E '^(FAILED|ERROR) ' "$OUT/pytest.log" 2>/dev/null | head -10
    echo
    echo "## model (bench_model.py)"
    grep -h -E '^(work per image|peak:|\| [0-9])' "$OUT/model.log" 2>/dev/null
    echo
    echo "## annotate data path (bench_annotate_gpu.py)"
    grep -h -E '^(\| |  GPU vs CPU|the real job)' "$OUT/annotate.log" 2>/dev/null
    echo
    echo "## fine-tuning step (bench_finetune.py)"
    grep -h -E '^(device:|\| (ours|transformers)|speed-up|matcher share)' "$OUT/finetune.log" 2>/dev/null
    echo
    echo "## steps"
    grep -h -E '^run_gpu: step .*: (exit|skipped)' "$OUT"/*.log "$OUT/env.txt" 2>/dev/null
} >"$OUT/summary.md"
cat "$OUT/summary.md"
