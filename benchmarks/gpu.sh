#!/usr/bin/env bash
# One command for a GPU machine without network: the selfage benchmark suite on the sd15 random model.
#
#   benchmarks/gpu.sh [WHEELS_DIR]            # on the GPU machine, from anywhere; ≤ 6 minutes
#   benchmarks/gpu.sh --dry-run [WHEELS_DIR]  # the same script on the CPU with the tiny model (< 1 minute)
#   benchmarks/gpu.sh --variants [WHEELS_DIR] # the engineering variants instead (see below; ≤ 8 minutes)
#   benchmarks/gpu.sh --real-path [WHEELS_DIR] # the path users run, with a LoRA (see below; ≤ 8 minutes)
#   benchmarks/gpu.sh --commands [WHEELS_DIR]  # whole `selfage train` / `selfage edit` commands (≤ 8 minutes)
#
# 1. installs what this Python lacks (e.g. diffusers, importlib_metadata, lazy-importer) from the wheels in
#    WHEELS_DIR (pip --no-index --no-deps --target; see docs/benchmarks.md for how to fetch them);
# 2. builds the random sd15 pipeline on the GPU (nothing is downloaded or written to disk);
# 3. train benchmark: paper configuration (4 + 4 images at 512², LoRA rank 16 on UNet and text encoder),
#    per-step seconds with and without the latent cache (2 warm-up + 20 timed steps each, ~44 steps),
#    then with the step replayed from one CUDA graph (train's default on a GPU; latent cache on);
# 4. edit benchmark: 1 photo → 9 ages (0, 10, …, 80), null-text and negative-prompt inversion (the
#    inversion's UNet replayed from CUDA graphs, the default on a GPU), batched editing and the naive
#    per-age loop (null-text mode) with their ratio;
# 5. both inversions again without CUDA graphs (edit --no-cuda-graph), the eager baseline;
# 6. align benchmark, only when dlib and its models are importable (skipped otherwise, and in --dry-run).
# --variants measures the other switches instead: the CUDA-graph inversion checked against eager
# execution (edit_graph_check); training steps (latent cache on) with a kernel profile, eagerly and from
# the CUDA graph; under torch.compile (reduce-overhead); the inversion under torch.compile.
# --real-path measures what a user runs: the 9-age edit with a rank-16 LoRA loaded as `selfage edit`
# loads it, at edit's --dtype auto (edit_* lines with settings.lora_applied); lora_effect (a LoRA trained
# 100 steps at lr 8e-6 — the paper's lr x steps — in fp32 and in the default bf16 training precision;
# 3 ages edited in fp32 with and without it and in every candidate --dtype: R per candidate, the auto
# choice, R_train, the inversion's inner step with and without the LoRA side by side); train_graph_check
# (50 steps replayed from the CUDA graph against 50 eager steps from the same seeds).
# --commands times whole commands in their own processes, 3 repeats each (median, repeats listed):
# `selfage train` (800 steps, aligned and labelled project) and `selfage edit` (1 aligned photo -> 9 ages
# with --side-by-side --gif, the first run's LoRA, DEX from a random checkpoint); peak memory in GiB.
# --real-path and --commands may be given together (then both, one budget).
#
# Every measurement is printed as one JSON line as soon as it is made and appended to
# $OUT/results.jsonl ($OUT defaults to ./bench-out); a markdown table of them ends the run
# (also written to $OUT/results.md). Env: PYTHON (default python3), BENCH_BUDGET_S (default 360;
# 480 with --variants, --real-path or --commands).
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

DRY=0
VARIANTS=0
REALPATH=0
COMMANDS=0
WHEELS=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --variants) VARIANTS=1 ;;
    --real-path) REALPATH=1 ;;
    --commands) COMMANDS=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "error: unknown option $arg; use --dry-run or --help." >&2; exit 2 ;;
    *) WHEELS=$arg ;;
  esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$PWD/bench-out}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || { echo "error: cannot create $OUTDIR; set OUT to a writable folder." >&2; exit 2; }
RESULTS=$OUTDIR/results.jsonl
BUDGET=${BENCH_BUDGET_S:-$([ "$VARIANTS" = 1 ] || [ "$COMMANDS" = 1 ] || [ "$REALPATH" = 1 ] && echo 480 || echo 360)}
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export BENCH_RUN_ID=${BENCH_RUN_ID:-gpu-sh-$(date +%Y%m%dT%H%M%S)-$$}

if [ -n "$WHEELS" ]; then
  SITE=${SELFAGE_SITE:-/tmp/selfage-site}
  "$PY" "$ROOT/benchmarks/install_wheels.py" "$WHEELS" "$SITE" || { echo "error: installing wheels from $WHEELS failed." >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 0 ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU is visible to $PY; run on a GPU machine or use --dry-run." >&2
    exit 2
  fi
fi
MISSING=$("$PY" - <<'EOF'
import importlib.util
names = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "typer", "rich", "PIL")
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$MISSING" ]; then
  echo "error: $PY lacks: $MISSING; pass a folder with wheels for them (and their missing dependencies):" \
       "benchmarks/gpu.sh WHEELS_DIR (docs/benchmarks.md says how to fetch them)." >&2
  exit 2
fi

if [ "$DRY" = 1 ]; then
  COMMON=(--model tiny --device cpu --dtype fp32 --threads 1 --out "$RESULTS")
  TRAIN=(--train-steps 1 --train-warmup 0)
  EDIT=(--ddim-steps 3 --inner-steps 2 --ages 0,40,80 --no-warmup)
else
  # --real-path/--commands: the defaults users get (--dtype auto: fp32 edits since issue 15); the other runs
  # keep bf16, the precision of every earlier run, so their figures stay comparable.
  if [ "$REALPATH" = 1 ] || [ "$COMMANDS" = 1 ]; then DTYPE=auto; else DTYPE=bf16; fi
  COMMON=(--model sd15 --device cuda --dtype "$DTYPE" --out "$RESULTS")
  TRAIN=(--train-steps 20 --train-warmup 2)
  EDIT=(--ddim-steps 50 --inner-steps 10 --ages 0,10,20,30,40,50,60,70,80)
fi

"$PY" - <<'EOF' >&2 || true
import importlib.metadata as md, platform, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
print(f"selfage benchmarks: python {platform.python_version()}, torch {torch.__version__}, device {name}")
print("  " + ", ".join(f"{n} {md.version(n)}" for n in ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub")))
EOF

status=0
phase() {  # phase NAME ARGS...: run one benchmark invocation within what is left of the budget
  local name=$1; shift
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -le 5 ]; then
    echo "skipped $name: the ${BUDGET}s budget is spent." >&2; status=1; return
  fi
  echo "--- $name (${left}s of budget left)" >&2
  timeout --signal=INT --kill-after=10 "$left" "$PY" -m benchmarks "${COMMON[@]}" --what "$name" "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then echo "$name ended with exit code $rc (124/130: out of time)." >&2; status=1; fi
}

cd "$ROOT" || exit 2
ONE=(--train-cache-modes on)
if [ "$DRY" = 1 ]; then
  LORA=(--lora-train-steps 2 --ddim-steps 3 --inner-steps 2 --lora-candidates tf32 --lora-train-dtype none --lora-inner-repeats 2 --graph-check-train-steps 2)
  CMDS=(--command-repeats 1 --command-train-steps 2)
else
  LORA=(--lora-train-steps 100 --lora-lr 8e-6 --ddim-steps 50 --inner-steps 10 --lora-checks off --graph-check-train-steps 50)
  CMDS=(--command-repeats 3 --command-train-steps 800)
fi
if [ "$REALPATH" = 1 ] || [ "$COMMANDS" = 1 ]; then
  if [ "$REALPATH" = 1 ]; then
    phase edit "${EDIT[@]}" --modes null-text --naive-modes none --edit-lora random
    phase lora_effect "${LORA[@]}"
    phase train_graph_check "${LORA[@]}"
  fi
  if [ "$COMMANDS" = 1 ]; then
    phase commands "${EDIT[@]}" "${CMDS[@]}"
  fi
elif [ "$VARIANTS" = 1 ]; then
  phase edit "${EDIT[@]}" --naive-modes none --graph-check-steps "$([ "$DRY" = 1 ] && echo 2 || echo 5)"
  phase train "${TRAIN[@]}" "${ONE[@]}" --train-profile 3
  phase train "${TRAIN[@]}" "${ONE[@]}" --train-profile 3 --train-graph on
  if [ "$DRY" = 0 ]; then  # compiling takes minutes on a CPU
    phase train "${TRAIN[@]}" "${ONE[@]}" --train-compile reduce-overhead
    phase edit "${EDIT[@]}" --modes null-text --naive-modes none --compile-inversion
  fi
elif [ "$DRY" = 1 ]; then
  phase train,edit "${TRAIN[@]}" "${EDIT[@]}"  # one process: the dry run is about the script, not the figures
else
  phase train "${TRAIN[@]}"
  phase train "${TRAIN[@]}" "${ONE[@]}" --train-graph on
  phase edit "${EDIT[@]}"
  phase edit "${EDIT[@]}" --naive-modes none --inversion-graph off
fi
if [ "$DRY" = 0 ] && [ "$VARIANTS" = 0 ] && "$PY" -c "import dlib, importlib.util as u, sys; sys.exit(u.find_spec('face_recognition_models') is None)" 2>/dev/null; then
  phase align
else
  echo "--- align skipped (dlib or face_recognition_models missing, or --dry-run)" >&2
fi

"$PY" -m benchmarks.table "$RESULTS" --run "$BENCH_RUN_ID" > "$OUTDIR/results.md" && cat "$OUTDIR/results.md"
echo "results: $RESULTS ($(( $(date +%s) - START ))s)" >&2
exit $status
