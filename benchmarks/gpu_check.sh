#!/usr/bin/env bash
# First light on a GPU: the CUDA tests, then the bf16 trainer and loss benchmarks, in one run.
#
# Usage: bash benchmarks/gpu_check.sh [options]
#   --out DIR             log and JSON go here (default: $OUT, else ./gpu_check_out)
#   --wheels DIR          wheels to install first (default: .whl; see fetch_gpu_wheels.sh)
#   --budget SECONDS      wall-clock budget for all stages (default 450)
#   --trainer-args "..."  bench_trainer.py geometry (default: ~1B Llama shape, seq 4096)
#   --skip-install        use what is installed; install no wheels
#   --skip-tests          no pytest stage
#   --skip-bench          no loss, trainer or profile stage
#   --skip-profile        no torch.profiler stage
#   --toy                 toy sizes and no CUDA needed: a CPU self-test of this script
#   -h, --help            this text
#
# Made for the H200 device machine (Python 3.12, torch 2.11 CUDA, no TransformerEngine or
# apex, no network): one call of the device tool, e.g.
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# after `bash benchmarks/fetch_gpu_wheels.sh` here. Stages, each under `timeout` (one hang
# costs its own slice, not the run) and within --budget overall:
#   install  pip-installs the carried wheels into $GPU_CHECK_SITE (/tmp/site) for PYTHONPATH;
#            the package itself runs from this checkout (first on PYTHONPATH), never a copy
#   env      versions, GPU, carried wheels' requirements vs what is installed, matmul rate
#   tests    tests/test_gpu.py (bf16 init_from into fp32 main params, NCCL groups, the
#            distributed optimizer at DP=1 saved and resumed, the loss on CUDA vs float64)
#            and tests/test_cpu_compat_targets.py (megatron-core version; CPU routes off)
#   loss     benchmarks/bench_loss.py at V=128256, T=16384, fp32 and bf16 logits
#   fused    benchmarks/bench_fused_head.py, bf16, T=16384, h=4096, V in {128256, 151936},
#            megatron DDP's main_grad: the fused head + loss against megatron's output layer +
#            the loss (peak memory >= 4x less, time within 1.15x)
#   trainer  benchmarks/bench_trainer.py, bf16, local layer spec: tokens/s, TFLOP/s, MFU,
#            PSFT/SFT against its floor
#   profile  benchmarks/gpu_profile_step.py: where one training step's GPU time goes
# Every stage's status and figures land in gpu_check.json even when others fail; the log
# is gpu_check.log. Exit status: 0 all stages passed, 1 some failed, 2 bad arguments,
# 3 no CUDA GPU here.
set -uo pipefail # no -e: a failed stage is recorded and the next one runs

PROG=gpu_check
die() { # STATUS MESSAGE: one line on stderr, nothing else
  echo "$PROG: error: $2" >&2
  exit "$1"
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
WHEELS="$ROOT/.whl"
BUDGET=450
TRAINER_ARGS=""
SKIP_INSTALL=0 SKIP_TESTS=0 SKIP_BENCH=0 SKIP_PROFILE=0 TOY=0

need_value() { [ "$2" -ge 2 ] || die 2 "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --out) need_value "$1" $#; OUT_DIR="$2"; shift 2 ;;
    --wheels) need_value "$1" $#; WHEELS="$2"; shift 2 ;;
    --budget) need_value "$1" $#; BUDGET="$2"; shift 2
      case "$BUDGET" in '' | *[!0-9]*) die 2 "--budget needs whole seconds, got '$BUDGET' (see --help)" ;; esac ;;
    --trainer-args) need_value "$1" $#; TRAINER_ARGS="$2"; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    --skip-bench) SKIP_BENCH=1; shift ;;
    --skip-profile) SKIP_PROFILE=1; shift ;;
    --toy) TOY=1; shift ;;
    *) die 2 "unknown argument '$1' (see --help)" ;;
  esac
done

PY="${PYTHON:-python3}"
START=$(date +%s)
DEADLINE=$((START + BUDGET))

# Fail fast, before anything is installed or written, where there is no GPU to check.
if [ "$TOY" = 0 ]; then
  command -v nvidia-smi >/dev/null 2>&1 ||
    die 3 "no CUDA GPU here (nvidia-smi not found): run this on the GPU machine (device tool), or pass --toy for a CPU self-test"
  nvidia-smi -L 2>/dev/null | grep -q '^GPU ' ||
    die 3 "no CUDA GPU here (nvidia-smi lists none): run this on the GPU machine (device tool), or pass --toy for a CPU self-test"
  why=$("$PY" -c 'import torch
print("" if torch.cuda.is_available() else f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device")' 2>&1 | tail -n 1)
  [ -z "$why" ] || die 3 "no usable CUDA GPU here: $why"
fi

mkdir -p "$OUT_DIR" || die 2 "cannot create the output folder $OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
# Per-stage logs and intermediate files stay out of $OUT: the device tool returns 8 files at most.
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
STAGES="$WORK/stages.tsv"
: >"$STAGES"
cd "$ROOT" || die 2 "cannot enter $ROOT"

# The checkout first, so its code (not an installed copy) is what runs; the carried wheels'
# folder joins once they are installed there.
SITE="${GPU_CHECK_SITE:-/tmp/site}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false

say() { echo "$PROG: $*" | tee -a "$LOG"; }

# Stages in order, which of them run, and the seconds each later stage is guaranteed: a slow
# or hung stage eats its own slice and what is left over, not the trainer's minimum.
STAGE_ORDER=(install env tests loss fused trainer profile)
declare -A MIN_SECONDS=([install]=0 [env]=0 [tests]=0 [loss]=45 [fused]=0 [trainer]=150 [profile]=0)
declare -A ENABLED=([install]=1 [env]=1 [tests]=1 [loss]=1 [fused]=1 [trainer]=1 [profile]=1)
{ [ "$SKIP_INSTALL" = 1 ] || ! ls "$WHEELS"/*.whl >/dev/null 2>&1; } && ENABLED[install]=0
[ "$SKIP_TESTS" = 1 ] && ENABLED[tests]=0
[ "$SKIP_BENCH" = 1 ] && ENABLED[loss]=0 ENABLED[fused]=0 ENABLED[trainer]=0 ENABLED[profile]=0
[ "$SKIP_PROFILE" = 1 ] && ENABLED[profile]=0

reserve_after() { # NAME: the seconds the enabled stages after NAME are guaranteed
  local after=0 sum=0 s
  for s in "${STAGE_ORDER[@]}"; do
    [ "$after" = 1 ] && [ "${ENABLED[$s]}" = 1 ] && sum=$((sum + MIN_SECONDS[$s]))
    [ "$s" = "$1" ] && after=1
  done
  echo "$sum"
}

# run_stage NAME CAP CMD...: runs CMD under `timeout` for at most CAP seconds, and no longer
# than leaves the later stages their minimum; records status, exit code and seconds.
run_stage() {
  local name="$1" cap="$2"
  shift 2
  local now left t rc status t0
  now=$(date +%s)
  left=$((DEADLINE - now - $(reserve_after "$name")))
  t=$((cap < left ? cap : left))
  if [ "$t" -lt 15 ]; then
    say "[$name] skipped: the budget is spent (${left}s left for it)"
    printf '%s\tskipped\t\t0\tbudget spent\n' "$name" >>"$STAGES"
    return 0
  fi
  say "[$name] start, timeout ${t}s: $*"
  t0=$(date +%s)
  # --kill-after: a stage ignoring SIGTERM is killed; timeout signals its whole process
  # group, so the ranks run_in_processes started go too.
  timeout --kill-after=10 "$t" "$@" </dev/null 2>&1 | tee -a "$LOG" "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0) status=pass ;;
    124 | 137) status=timeout ;;
    *) status=fail ;;
  esac
  local secs=$(($(date +%s) - t0))
  say "[$name] $status (exit $rc) after ${secs}s"
  printf '%s\t%s\t%s\t%s\t\n' "$name" "$status" "$rc" "$secs" >>"$STAGES"
}

skip_stage() { # NAME REASON
  say "[$1] skipped: $2"
  printf '%s\tskipped\t\t0\t%s\n' "$1" "$2" >>"$STAGES"
}

say "start $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT, budget ${BUDGET}s, out $OUT_DIR, python $PY$([ "$TOY" = 1 ] && echo ', TOY sizes')"

# --- install: the carried wheels (device README's recipe), into $SITE
if [ "$SKIP_INSTALL" = 1 ]; then
  skip_stage install "--skip-install"
elif ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  skip_stage install "no wheels in $WHEELS (run benchmarks/fetch_gpu_wheels.sh and carry .whl)"
else
  run_stage install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi

# --- env: what the machine is and has; measured matmul and copy rates
ENV_ARGS=(--json "$WORK/env.json")
grep -q "^install"$'\t'"pass" "$STAGES" && ENV_ARGS+=(--wheels "$SITE") # their requirements vs what is here
[ "$TOY" = 1 ] && ENV_ARGS+=(--no-gpu)
run_stage env 90 "$PY" benchmarks/gpu_check_report.py env "${ENV_ARGS[@]}"

# --- tests
if [ "$SKIP_TESTS" = 1 ]; then
  skip_stage tests "--skip-tests"
else
  # Only these exercise CUDA on one GPU; the rest of the suite is multi-process gloo on CPU
  # (with CUDA present it would put several ranks on one device).
  run_stage tests 200 "$PY" -m pytest -q -p no:cacheprovider -o timeout=150 \
    --junitxml="$WORK/tests.xml" tests/test_gpu.py tests/test_cpu_compat_targets.py
fi

# --- benchmarks
if [ "$TOY" = 1 ]; then
  # Seconds on two CPU cores: the plumbing, not the figures.
  TRAINER_GEOMETRY="--layers 1 --hidden 64 --seq 128 --k 2 --mini 2 --micro 1 --repeats 1"
  LOSS_ARGS=(--tokens 256 --vocab 4096 --reps 1)
  LOSS_DTYPES="fp32"
  FUSED_ARGS=(--tokens 256 --hidden 64 --vocab 4096 --reps 1 --dtype fp32 --grad-mode main_grad)
else
  # ~1.06B parameters: 24 layers of hidden 2048 (32 heads, 8 KV groups, SwiGLU 5440).
  # micro 1: the local spec's unfused attention keeps [heads, s, s] scores per layer.
  TRAINER_GEOMETRY="--layers 24 --hidden 2048 --seq 4096 --k 4 --mini 4 --micro 1 --repeats 2"
  LOSS_ARGS=(--tokens 16384 --vocab 128256 --reps 5)
  LOSS_DTYPES="fp32 bf16"
  FUSED_ARGS=(--tokens 16384 --hidden 4096 --vocab 128256 151936 --reps 3 --dtype bf16 --grad-mode main_grad)
fi
TRAINER_GEOMETRY="${TRAINER_ARGS:-$TRAINER_GEOMETRY}"
# Flags of bench_trainer.py that newer versions have: used when there.
BT_HELP="$("$PY" benchmarks/bench_trainer.py --help 2>/dev/null || true)"
TRAINER_EXTRA=()
grep -q -- '--json' <<<"$BT_HELP" && TRAINER_EXTRA+=(--json "$WORK/trainer.json")
grep -q -- '--impl' <<<"$BT_HELP" && TRAINER_EXTRA+=(--impl local)

if [ "$SKIP_BENCH" = 1 ]; then
  skip_stage loss "--skip-bench"
  skip_stage fused "--skip-bench"
  skip_stage trainer "--skip-bench"
  skip_stage profile "--skip-bench"
else
  run_stage loss 120 bash -c 'set -e; py=$1 work=$2 dtypes=$3; shift 3
    for dt in $dtypes; do
      "$py" benchmarks/bench_loss.py --tp 1 --dtype "$dt" --methods ours ours_inplace mcore_ce mcore_full naive \
        --json "$work/loss_$dt.json" "$@"
    done' gpu_check_loss "$PY" "$WORK" "$LOSS_DTYPES" "${LOSS_ARGS[@]}"
  run_stage fused 90 "$PY" benchmarks/bench_fused_head.py "${FUSED_ARGS[@]}" --json "$WORK/fused.json"
  # shellcheck disable=SC2086 # the geometry's words are meant to split
  run_stage trainer 300 "$PY" benchmarks/bench_trainer.py $TRAINER_GEOMETRY ${TRAINER_EXTRA[@]+"${TRAINER_EXTRA[@]}"}
  if [ "$SKIP_PROFILE" = 1 ]; then
    skip_stage profile "--skip-profile"
  else
    # shellcheck disable=SC2086
    run_stage profile 120 "$PY" benchmarks/gpu_profile_step.py $TRAINER_GEOMETRY \
      --table "$OUT_DIR/profile.txt" --json "$WORK/profile.json"
  fi
fi

# --- collect: one JSON of every stage's status and figures, and the summary (printed last)
"$PY" benchmarks/gpu_check_report.py collect --work "$WORK" --json "$OUT_DIR/gpu_check.json" \
  --budget "$BUDGET" --elapsed "$(($(date +%s) - START))" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
