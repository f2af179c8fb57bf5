#!/usr/bin/env bash
# The GPU measurements of the book's performance page, as one command for a machine with CUDA:
#
#   bash benchmarks/gpu_checks.sh [OUTPUT_DIR]        # default OUTPUT_DIR: results/benchmarks
#
# 1. fine-tuning throughput of ViT-B-32 at batch 128, fp32 and bf16 autocast
#    -> OUTPUT_DIR/finetune-cuda-vit-b-32.json
# 2. merge time and peak memory of every method at ViT-L-14 encoder shapes, T = 3 then T = 5
#    -> OUTPUT_DIR/merge-cuda-vit-l-14.json
# and the console log -> OUTPUT_DIR/gpu_checks.log. Copy the JSON files into results/benchmarks/
# (if written elsewhere) and commit them; the performance page shows them at the next build.
#
# Needs no network (random initialisations of the real architectures; HF_HUB_OFFLINE is set) and
# no .venv: PYTHON (default: .venv/bin/python if it has torch, else python3) must import torch,
# torchvision, open_clip, numpy, pandas, scikit-learn, tqdm and Pillow; mergelib is taken from
# this checkout through PYTHONPATH. The whole script is bounded by GPU_CHECKS_BUDGET seconds
# (default 450, i.e. 7.5 minutes) so that it fits a 10-minute command with room to spare.
#
# GPU_CHECKS_DRY_RUN=1 runs the same steps with small settings on the CPU (a check of the script
# itself on a machine without a GPU) into files named dry-run-*.json, by default in
# /tmp/gpu-checks-dry-run; the page never reads them.
set -uo pipefail

cd "$(dirname "$0")/.."
DRY="${GPU_CHECKS_DRY_RUN:-0}"
if [ "$DRY" = "1" ]; then OUT="${1:-${TMPDIR:-/tmp}/gpu-checks-dry-run}"; else OUT="${1:-results/benchmarks}"; fi
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
BUDGET="${GPU_CHECKS_BUDGET:-450}"
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

log() { echo "[gpu_checks] $*" | tee -a "$LOG"; }
remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }
: > "$LOG"
log "python: $PYTHON; output: $OUT; budget: ${BUDGET} s; dry run: $DRY; commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# Preflight (seconds): every module the benchmarks import, and CUDA itself.
if ! "$PYTHON" - "$DRY" <<'EOF' 2>&1 | tee -a "$LOG"; then
import importlib, sys
missing = []
for name in ("torch", "torchvision", "open_clip", "numpy", "pandas", "sklearn", "tqdm", "PIL"):
    try:
        module = importlib.import_module(name)
        print(f"[gpu_checks]   {name} {getattr(module, '__version__', '')}")
    except ImportError as error:
        missing.append(f"{name} ({error})")
if missing:
    sys.exit("[gpu_checks] this python lacks: " + ", ".join(missing) + "; set PYTHON to one that has them")
import torch
import mergelib.experiments.benchmarking, mergelib.methods  # noqa: F401  (mergelib from this checkout)
if sys.argv[1] != "1":
    if not torch.cuda.is_available():
        sys.exit(f"[gpu_checks] CUDA is not available to torch {torch.__version__} (built with CUDA "
                 f"{torch.version.cuda}); this script measures GPU figures (GPU_CHECKS_DRY_RUN=1 checks it on a CPU)")
    print(f"[gpu_checks]   device: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF
    log "preflight failed: nothing measured"
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"

if [ "$DRY" = "1" ]; then
    DEVICE=cpu
    THROUGHPUT=(--backbone tiny-clip --batch-size 16 --steps 2 --warmup 1)
    MERGE=(--backbones ViT-B-32 --tasks 2 --methods weight_average task_arithmetic --reference-on)
    THROUGHPUT_FILE="$OUT/dry-run-finetune-cpu-tiny-clip.json"; MERGE_FILE="$OUT/dry-run-merge-cpu-vit-b-32.json"
else
    DEVICE=cuda
    # ViT-B-32 at batch 128: one fp32 step is ~1.7 TFLOP (forward and backward), tens of
    # milliseconds on an H100/H200-class GPU, so 10 untimed + 50 timed steps per precision take
    # seconds; model construction and CUDA start-up dominate (under a minute in all).
    THROUGHPUT=(--backbone ViT-B-32 --batch-size 128 --precisions fp32 bf16 --steps 50 --warmup 10)
    # Every registered method at ViT-L-14 encoder shapes (303 M parameters, 1.2 GB per task
    # vector), T = 3 then T = 5. --reference-on with no backbone: the full-SVD reference runs on
    # the CPU only and takes many minutes at these shapes (it is measured at ViT-B-32 on the CPU,
    # results/benchmarks/merge-cpu-vit-b-32.json). merge_benchmark.py writes its JSON after each
    # configuration, so if the budget ends during T = 5, the T = 3 figures are kept and the file
    # says "complete": false (the page marks the run as interrupted). Estimate, not yet checked on
    # a GPU: about 100 matrices of up to 4096 x 1024 per task vector, decomposed per task by the
    # five SVD-based methods, so tens of seconds per such method and a few minutes for T = 3;
    # T = 5 costs about as much again and may be cut by the budget.
    MERGE=(--backbones ViT-L-14 --tasks 3 5 --reference-on)
    THROUGHPUT_FILE="$OUT/finetune-cuda-vit-b-32.json"; MERGE_FILE="$OUT/merge-cuda-vit-l-14.json"
fi

status=0
# 1. throughput: at most 150 s (expected well under a minute)
limit=$(( $(remaining) < 150 ? $(remaining) : 150 ))
log "fine-tuning throughput (limit ${limit} s) -> $THROUGHPUT_FILE"
timeout --kill-after=10 "$limit" "$PYTHON" benchmarks/finetune_throughput.py "${THROUGHPUT[@]}" --device "$DEVICE" \
    --output "$THROUGHPUT_FILE" 2>&1 | tee -a "$LOG" || { rc=${PIPESTATUS[0]}; status=1; log "throughput: failed or cut at ${limit} s (exit $rc)"; }

# 2. merge benchmark: whatever is left of the budget
limit=$(( $(remaining) - 5 ))
if [ "$limit" -lt 30 ]; then
    log "merge benchmark skipped: only $(remaining) s of the budget left"; status=1
else
    log "merge benchmark (limit ${limit} s) -> $MERGE_FILE"
    timeout --kill-after=10 "$limit" "$PYTHON" benchmarks/merge_benchmark.py "${MERGE[@]}" --device "$DEVICE" \
        --output "$MERGE_FILE" 2>&1 | tee -a "$LOG" || { rc=${PIPESTATUS[0]}; status=1; log "merge benchmark: failed or cut at ${limit} s (exit $rc); what it finished is in $MERGE_FILE"; }
fi

log "done in $(( $(date +%s) - START )) s, exit status $status; files: $(ls "$OUT" | tr '\n' ' ')"
exit "$status"
