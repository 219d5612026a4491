#!/usr/bin/env bash
# The long-regime experiment (docs/experiments.md, "Many epochs on a small set"): SmolLM2-135M-Instruct
# on 64 GSM8K train problems (32 packed rows of 512 tokens), repeated until plain SFT memorises them.
#
#   bash experiments/psft_long/run.sh                # every stage below, in order
#   bash experiments/psft_long/run.sh probe          # one stage: prepare | probe | long | long_math | evaluate | evaluate_math | clip_room | clip_room_math | report
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

# shellcheck source=experiments/common.sh
source experiments/common.sh

# One run: train NAME [overrides...] into $OUT/NAME (skipped when finished; resumed otherwise).
train_run() {
    local name=$1; shift
    finished "$name" && { echo "$name: finished already"; return 0; }
    mkdir -p "$OUT/$name"
    local rc=0
    python launch/pretrain_psft.py "$BASE" logging.run_dir="$OUT/$name" "$@" >> "$OUT/$name/train.log" 2>&1 || rc=$?
    # 75: stopped early after saving (SIGTERM, time limit), psft_megatron.errors.EXIT_PREEMPTED.
    case $rc in
        0) echo "$name: finished" ;;
        75) echo "$name: stopped early, saved (rerun the stage to resume)"; return 1 ;;
        *) echo "$name: FAILED, exit $rc (see $OUT/$name/train.log)"; return 1 ;;
    esac
    weights_only "$OUT/$name/checkpoints"
}

# A finished run's older checkpoints are only evaluated, never resumed from: keep their weights
# (psft_meta.json + model/, what evaluation loads) and drop the optimizer state, two thirds of each. The
# latest stays whole. The long runs do this as they go (checkpoint.keep_every_weights_only); the probes
# keep two checkpoints (keep_last: 2) and rely on this. The same parts as that option removes
# (_RESUME_ONLY in psft_megatron/checkpoint/train_checkpoint.py), train_state.json first, so a folder
# left half-thinned is not offered for resuming.
weights_only() {
    local dir=$1 latest step
    [[ -f $dir/latest ]] || return 0
    latest=$(cat "$dir/latest")
    for step in "$dir"/step_*; do
        [[ $(basename "$step") == "$latest" ]] && continue
        rm -f "$step/train_state.json"
        rm -rf "$step/optimizer" "$step/rng" "$step/shards"
    done
}

# copy_metrics RUN_DIR DEST: a run's metrics.jsonl into the docs, where the curves can be re-plotted.
copy_metrics() { mkdir -p "$2" && cp "$1/metrics.jsonl" "$2/"; }

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
# lower lr and SFT-KL serve both k = 8 and k = 32. LOWLR: the lower SFT learning rate. The issue asks for
# the lr that ends at PSFT's KL to the start model (`python experiments/psft_long/match_lr.py
# $OUT/long/sft --kl KL`); both PSFT runs end within 0.005 of SFT's own KL, so that is SFT's lr, and
# the lower-lr run (half of it) shows instead what a smaller step does that PSFT does not.
LONG="training.train_steps=608 training.sft_warmup_steps=32 training.eval_interval=32 training.eval_kl_to_start=true checkpoint.save_interval=32 checkpoint.keep_last=1 checkpoint.keep_every=96 checkpoint.keep_every_weights_only=true"
LOWLR=${LOWLR:-1e-5}
# In order of need (the issue keeps SFT, PSFT, the lower-lr SFT and the seeds if time forces a cut):
# SFT and PSFT at the paper's k = 8; k = 32, where the probes found the objectives differ; the seeds;
# the lower-lr SFT; the clip-without-weight diagnostic at k = 32; SFT-KL.
long() {
    run_plan <<PLAN
long/sft $LONG loss.name=sft training.global_batch_size=32
long/psft_k8 $LONG loss.name=psft training.global_batch_size=8
long/psft_k32 $LONG loss.name=psft training.global_batch_size=32
long/sft_seed2 $LONG loss.name=sft training.global_batch_size=32 training.seed=2
long/psft_k8_seed2 $LONG loss.name=psft training.global_batch_size=8 training.seed=2
long/sft_lowlr $LONG loss.name=sft training.global_batch_size=32 optimizer.lr=$LOWLR optimizer.min_lr=$(python3 -c "print($LOWLR / 10)")
long/unweighted_k32 $LONG loss.name=psft_unweighted training.global_batch_size=32
long/sft_kl $LONG loss.name=sft_kl training.global_batch_size=32
long/psft_k32_seed2 $LONG loss.name=psft training.global_batch_size=32 training.seed=2
PLAN
}

# The same regime on MATH's worked solutions (longer and more alike than GSM8K's, where the probes found
# the clip acting most): SFT, PSFT at k = 32 (where the objectives differ) and at the paper's k = 8.
long_math() {
    run_plan <<PLAN
long_math/sft $LONG $MATH loss.name=sft training.global_batch_size=32
long_math/psft_k32 $LONG $MATH loss.name=psft training.global_batch_size=32
long_math/psft_k8 $LONG $MATH loss.name=psft training.global_batch_size=8
PLAN
}

# The evaluations at the end of the long runs, and at the step where SFT's held-out NLL is lowest
# (among the kept checkpoints): held-out GSM8K NLL, entropy and KL to the start model; HH-RLHF
# harmless NLL and entropy; MMLU (MMLU_LIMIT per subject); SVAMP with GEN_SAMPLES samples per problem
# at the paper's sampling (temperature 0.7, top-p 0.95): mean@n, pass@n and distinct answers, plus
# greedy accuracy. EVAL_RUNS narrows the runs, EVAL_STEPS the steps (step_000096 ...: two processes, one
# step each, evaluate a run in half the time on 2 cores); every evaluation already written is skipped.
START=runs/psft_vs_sft/smollm2_megatron
LONG_OUT=$OUT/long
# In the order the runs finished: summarize.py draws every bootstrap from one generator, so a run added
# in the middle would move the intervals of the rows after it (those the docs cite).
read -ra EVAL_RUNS <<< "${EVAL_RUNS:-sft psft_k8 psft_k32 sft_seed2 psft_k8_seed2 sft_lowlr unweighted_k32 sft_kl psft_k32_seed2}"
HELDOUT_LIMIT=${HELDOUT_LIMIT:-64}  # GSM8K test problems / HH-RLHF harmless conversations
MMLU_LIMIT=${MMLU_LIMIT:-5}         # questions per MMLU subject (57 subjects)
GEN_LIMIT=${GEN_LIMIT:-16}          # SVAMP problems
GEN_SAMPLES=${GEN_SAMPLES:-8}

# evaluate_checkpoint CKPT DEST [HELDOUT]: HELDOUT is the in-domain held-out set, gsm8k (default) or math500.
evaluate_checkpoint() {
    local ckpt=$1 dest=$2 heldout=${3:-gsm8k}
    "heldout_$heldout" "$ckpt" "$dest" "$HELDOUT_LIMIT"
    heldout_hh_harmless "$ckpt" "$dest/hh_harmless" "$HELDOUT_LIMIT"
    lm_eval_tasks "$ckpt" "$dest/mmlu" mmlu --limit "$MMLU_LIMIT"
    (( GEN_LIMIT > 0 )) || return 0
    lm_eval_tasks "$ckpt" "$dest/svamp" svamp --limit "$GEN_LIMIT" \
        --num-samples "$GEN_SAMPLES" --temperature 0.7 --top-p 0.95 --max-gen-toks 256 --gen-batch-size 16
}

# eval_steps [SFT_RUN]: the last kept checkpoint of SFT (default the GSM8K run) and the one with its
# lowest held-out NLL.
eval_steps() {
    local sft=${1:-$LONG_OUT/sft}
    echo "$(cat "$sft/checkpoints/latest")"  # the file has no newline of its own
    python experiments/psft_long/best_step.py "$sft"
}

evaluate() {
    local step name
    finished long/sft || { echo "evaluate: long/sft has not finished"; return 1; }
    evaluate_checkpoint "$START" "$LONG_OUT/start"
    for step in ${EVAL_STEPS:-$(eval_steps | sort -ru)}; do  # the end first
        for name in "${EVAL_RUNS[@]}"; do
            finished "long/$name" || continue
            [[ -d $LONG_OUT/$name/checkpoints/$step ]] || { echo "evaluate: long/$name has no $step"; continue; }
            evaluate_checkpoint "$LONG_OUT/$name/checkpoints/$step" "$LONG_OUT/$name/eval/$step"
        done
    done
}

# The same evaluations of the MATH long runs, with MATH500's test problems as the in-domain held-out set
# (the start model again, for its MATH500 rows; MATH500 accuracy is left out: a 135M model scores
# about zero on it). SVAMP only with MATH_GEN_LIMIT > 0: its 128 samples take 8-17 minutes per
# checkpoint on 2 cores (with other jobs beside it), and on 16 problems its intervals were wide for the GSM8K runs.
MATH_OUT=$OUT/long_math
MATH_RUNS=(sft psft_k32 psft_k8)
evaluate_math() {
    local step name
    local GEN_LIMIT=${MATH_GEN_LIMIT:-0}  # seen by evaluate_checkpoint (bash scoping is dynamic)
    finished long_math/sft || { echo "evaluate_math: long_math/sft has not finished"; return 1; }
    evaluate_checkpoint "$START" "$MATH_OUT/start" math500
    for step in ${EVAL_STEPS:-$(eval_steps "$MATH_OUT/sft" | sort -ru)}; do
        for name in "${MATH_RUNS[@]}"; do
            finished "long_math/$name" || continue
            [[ -d $MATH_OUT/$name/checkpoints/$step ]] || { echo "evaluate_math: long_math/$name has no $step"; continue; }
            evaluate_checkpoint "$MATH_OUT/$name/checkpoints/$step" "$MATH_OUT/$name/eval/$step" math500
        done
    done
}

# clip_room_of DIR RUN... -- CLIP_ROOM_ARGS...: clip_room.py over the start model and every kept checkpoint
# of DIR/RUN (the runs' training file and limit in CLIP_ROOM_ARGS), into DIR/clip_room.json.
clip_room_of() {
    local dir=$1 name step ckpts=(--ckpt "start=$START")
    shift
    while [[ $1 != -- ]]; do
        name=$1; shift
        for step in "$dir/$name"/checkpoints/step_*[0-9]; do
            [[ -f $step/psft_meta.json ]] && ckpts+=(--ckpt "$name/$(basename "$step")=$step")
        done
    done
    shift
    python experiments/psft_long/clip_room.py "$@" "${ckpts[@]}" --out "$dir/clip_room.json"
}

# Why the clip stops acting: per kept checkpoint of the long runs (and the start model), the share of the
# training tokens the snapshot predicts with p >= 1 / (1 + eps_high), which no update can clip from above.
clip_room() {
    clip_room_of "$LONG_OUT" "${EVAL_RUNS[@]}" -- --train "$SHARED/data/gsm8k/train.jsonl" --limit 64
}

# The same on the MATH runs' training problems (the 76 of 80 that fit in 512 tokens, as training took them).
clip_room_math() {
    clip_room_of "$MATH_OUT" "${MATH_RUNS[@]}" -- --train "$SHARED/data/math/math_train_full.jsonl" --adapter math \
        --limit 80 --max-length 512
}

# Tables, plots and each run's metrics.jsonl under docs/experiments/long (the probes' with PROBES=1).
report() {
    local docs=docs/experiments/long name present=() same_rows=() own_rows=() step
    for name in "${EVAL_RUNS[@]}"; do
        finished "long/$name" || continue  # a run still going is reported once it has finished
        present+=("$name")
        copy_metrics "$LONG_OUT/$name" "$docs/$name"
        # The second seed's SFT and PSFT k = 8 ran before the held-out rows stopped following
        # training.seed: they scored the rows seed 2 drew, so their curves are tabled apart.
        if [[ $name == sft_seed2 || $name == psft_k8_seed2 ]]; then own_rows+=("$name"); else same_rows+=("$name"); fi
    done
    python experiments/psft_long/curves.py "$LONG_OUT" --runs "${same_rows[@]}" --window 32 --out "$docs" \
        --title "GSM8K, 608 steps"
    if (( ${#own_rows[@]} )); then
        python experiments/psft_long/curves.py "$LONG_OUT" --runs "${own_rows[@]}" --window 32 --out "$docs/seed2" \
            --title "GSM8K, 608 steps, seed 2 (the held-out rows seed 2 drew)"
    fi
    [[ -f $LONG_OUT/clip_room.json ]] && cp "$LONG_OUT/clip_room.json" "$docs/"
    if finished long/sft; then
        for step in $(eval_steps | sort -u); do
            python experiments/psft_vs_sft/summarize.py "$LONG_OUT" --runs "${present[@]}" --step "$step" \
                --out "$docs/results_$step.md"
            # The second seed's PSFT runs against the second seed's SFT (the same 64 items at every seed).
            if [[ -d $LONG_OUT/sft_seed2/eval/$step ]]; then
                python experiments/psft_vs_sft/summarize.py "$LONG_OUT" --runs sft_seed2 psft_k8_seed2 psft_k32_seed2 \
                    --baseline sft_seed2 --step "$step" --out "$docs/seed2/results_$step.md"
            fi
        done
    fi
    if [[ ${PROBES:-0} == 1 ]]; then
        for name in "$OUT"/probe/*/; do
            name=$(basename "$name")
            finished "probe/$name" || continue
            copy_metrics "$OUT/probe/$name" "$docs/probe/$name"
        done
        python experiments/psft_long/curves.py "$OUT/probe" --runs sft psft_k8 psft_k32 unweighted_k32 \
            sft_2pass psft_k8_2pass sft_lr8e-5 psft_k32_lr8e-5 --window 16 --out "$docs/probe" --title "GSM8K probes"
        python experiments/psft_long/curves.py "$OUT/probe" --runs math_sft math_psft_k32 --window 16 \
            --out "$docs/probe_math" --title "MATH probes"
    fi
    local math_runs=()
    for name in "${MATH_RUNS[@]}"; do
        finished "long_math/$name" || continue
        math_runs+=("$name")
        copy_metrics "$MATH_OUT/$name" "$docs/math/$name"
    done
    if (( ${#math_runs[@]} )); then
        python experiments/psft_long/curves.py "$MATH_OUT" --runs "${math_runs[@]}" --window 32 \
            --out "$docs/math" --title "MATH, 608 steps"
        [[ -f $MATH_OUT/clip_room.json ]] && cp "$MATH_OUT/clip_room.json" "$docs/math/"
        for step in $(eval_steps "$MATH_OUT/sft" | sort -u); do
            [[ -d $MATH_OUT/sft/eval/$step ]] || continue
            python experiments/psft_vs_sft/summarize.py "$MATH_OUT" --runs "${math_runs[@]}" --step "$step" \
                --out "$docs/math/results_$step.md"
        done
    fi
}

stages=("${@:-prepare probe long long_math evaluate evaluate_math clip_room clip_room_math report}")
for stage in ${stages[*]}; do
    echo "== $stage"
    "$stage"
done
