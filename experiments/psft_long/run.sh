#!/usr/bin/env bash
# The long-regime experiment (docs/experiments.md, "Many epochs on a small set"): SmolLM2-135M-Instruct
# on 64 GSM8K train problems (32 packed rows of 512 tokens), repeated until plain SFT memorises them.
#
#   bash experiments/psft_long/run.sh                # every stage below, in order
#   bash experiments/psft_long/run.sh probe          # one stage: prepare | probe | long | evaluate | report
#   JOBS=2 bash experiments/psft_long/run.sh probe   # two runs at a time, one CPU thread each
#
# Every stage resumes: a finished run is skipped, an interrupted one continues from its latest
# checkpoint (relaunching the same command), an evaluation already written is not redone.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-runs/psft_long}
BASE=experiments/psft_long/gsm8k.yaml
JOBS=${JOBS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

finished() { [[ -f $OUT/$1/run_status.json ]] && grep -q '"status": "finished"' "$OUT/$1/run_status.json"; }

# One run: train NAME [overrides...] into $OUT/NAME (skipped when finished; resumed otherwise).
train_run() {
    local name=$1; shift
    finished "$name" && { echo "$name: finished already"; return 0; }
    mkdir -p "$OUT/$name"
    python launch/pretrain_psft.py "$BASE" logging.run_dir="$OUT/$name" "$@" >> "$OUT/$name/train.log" 2>&1 \
        && echo "$name: finished" || { echo "$name: FAILED (see $OUT/$name/train.log)"; return 1; }
    weights_only "$OUT/$name/checkpoints"
}

# A finished run's kept checkpoints (checkpoint.keep_every) are only evaluated, never resumed from:
# keep their weights (psft_meta.json + model/, what evaluation loads) and drop the optimizer state,
# two thirds of each. The latest stays whole.
weights_only() {
    local dir=$1 latest step
    [[ -f $dir/latest ]] || return 0
    latest=$(cat "$dir/latest")
    for step in "$dir"/step_*; do
        [[ $(basename "$step") == "$latest" ]] || rm -rf "$step/optimizer" "$step/rng" "$step/shards"
    done
}

# Run the lines of a plan ("name override ...") JOBS at a time.
run_plan() {
    local line running=0 failed=0
    while read -r line; do
        [[ -z $line || $line == \#* ]] && continue
        # shellcheck disable=SC2086
        train_run $line &
        running=$((running + 1))
        if (( running >= JOBS )); then wait -n || failed=1; running=$((running - 1)); fi
    done
    while (( running > 0 )); do wait -n || failed=1; running=$((running - 1)); done
    return $failed
}

prepare() {
    bash experiments/psft_vs_sft/run.sh prepare
}

# Short runs that test the hypothesis before the long ones: constant lr after an 8-step ramp,
# one epoch (32 steps) of SFT warm-up for every run, then 96 steps of the objective (3 epochs).
# k = global_batch_size / mini_batch_size (mini-batch = 1 row): 8 or 32 (one snapshot per epoch).
PROBE="training.train_steps=128 training.sft_warmup_steps=32 optimizer.lr_schedule=constant training.eval_interval=32 checkpoint.save_interval=32"
MATH="data.train[0].path=$SHARED/data/math/math_train_full.jsonl data.train[0].adapter=math data.train[0].limit=80 data.train[0].max_length=512 data.eval[0].path=$SHARED/data/math/math500_test.jsonl data.eval[0].adapter=math data.cache_dir=$OUT/data_cache_math"
probe() {
    run_plan <<PLAN
probe/sft $PROBE loss.name=sft training.global_batch_size=32
probe/psft_k8 $PROBE loss.name=psft training.global_batch_size=8
probe/psft_k32 $PROBE loss.name=psft training.global_batch_size=32
probe/unweighted_k32 $PROBE loss.name=psft_unweighted training.global_batch_size=32
probe/psft_k8_2pass $PROBE loss.name=psft training.global_batch_size=8 training.passes_per_snapshot=2
probe/sft_2pass $PROBE loss.name=sft training.global_batch_size=8 training.passes_per_snapshot=2
probe/sft_lr8e-5 $PROBE loss.name=sft training.global_batch_size=32 optimizer.lr=8e-5
probe/psft_k32_lr8e-5 $PROBE loss.name=psft training.global_batch_size=32 optimizer.lr=8e-5
probe/math_sft $PROBE $MATH loss.name=sft training.global_batch_size=32
probe/math_psft_k32 $PROBE $MATH loss.name=psft training.global_batch_size=32
PLAN
}

# The long runs: 608 optimizer steps (19 epochs of the 32 rows), lr 2e-5 with cosine decay to 2e-6, one epoch
# (32 steps) of SFT warm-up for every run, held-out NLL, entropy and KL to the start model every
# 32 steps (a multiple of both k). With mini-batches of one row, SFT's data order does not depend on k, so SFT, SFT at a
# lower lr and SFT-KL serve both k = 8 and k = 32. LOWLR: the lower SFT learning rate (chosen to
# end at PSFT's KL to the start model: see docs/experiments.md).
LONG="training.train_steps=608 training.sft_warmup_steps=32 training.eval_interval=32 training.eval_kl_to_start=true checkpoint.save_interval=32 checkpoint.keep_last=1 checkpoint.keep_every=96"
LOWLR=${LOWLR:-1e-5}
long() {
    run_plan <<PLAN
long/sft $LONG loss.name=sft training.global_batch_size=32
long/psft_k8 $LONG loss.name=psft training.global_batch_size=8
long/psft_k32 $LONG loss.name=psft training.global_batch_size=32
long/unweighted_k32 $LONG loss.name=psft_unweighted training.global_batch_size=32
long/sft_seed2 $LONG loss.name=sft training.global_batch_size=32 training.seed=2
long/psft_k8_seed2 $LONG loss.name=psft training.global_batch_size=8 training.seed=2
long/psft_k32_seed2 $LONG loss.name=psft training.global_batch_size=32 training.seed=2
long/sft_kl $LONG loss.name=sft_kl training.global_batch_size=32
long/sft_lowlr $LONG loss.name=sft training.global_batch_size=32 optimizer.lr=$LOWLR optimizer.min_lr=$(python3 -c "print($LOWLR / 10)")
PLAN
}

stages=("${@:-prepare probe long}")
for stage in ${stages[*]}; do
    echo "== $stage"
    "$stage"
done
