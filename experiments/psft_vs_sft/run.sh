#!/usr/bin/env bash
# SFT vs PSFT vs DFT vs SFT-KL on SmolLM2-135M-Instruct and GSM8K (docs/experiments.md).
#
#   bash experiments/psft_vs_sft/run.sh            # everything: prepare, train, evaluate, seed2, plot
#   bash experiments/psft_vs_sft/run.sh train      # one stage: prepare | train | evaluate | seed2 | lora | report
#
# Every stage resumes: a converted model is kept, a finished run is skipped and an
# interrupted one continues from its latest checkpoint, an evaluation already written is
# not redone. On 2 CPU cores each run (32 optimizer steps) takes about 6 minutes on an idle
# machine, 20-25 while other jobs share the cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${SHARED:-../shared}
OUT=runs/psft_vs_sft
read -ra RUNS <<< "${EVAL_RUNS:-sft psft dft sft_kl}"  # EVAL_RUNS: a subset, e.g. for a second evaluate
START=$OUT/smollm2_megatron
# Evaluation: fixed subsets, the first N items of each set, the same for every checkpoint. --limit
# counts per task (per subject for MMLU's 57), so each group of tasks is one evaluate.py call.
GEN_LIMIT=${GEN_LIMIT:-16}          # GSM8K test, SVAMP, ASDiv: greedy generation, math-verify
MMLU_LIMIT=${MMLU_LIMIT:-1}         # questions per MMLU subject
TQA_LIMIT=${TQA_LIMIT:-24}          # TruthfulQA MC1 questions
HELDOUT_LIMIT=${HELDOUT_LIMIT:-32}  # GSM8K test / HH-RLHF harmless conversations for NLL, entropy, KL
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# shellcheck source=experiments/common.sh
source experiments/common.sh

prepare() {
    if [[ ! -f $OUT/smollm2_hf/config.json ]]; then
        python tools/convert_gguf_to_hf.py \
            --gguf "$SHARED/models/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf" \
            --tokenizer "$SHARED/tokenizers/smollm2" --out $OUT/smollm2_hf
    fi
    if [[ ! -f $OUT/smollm2_megatron/psft_meta.json ]]; then
        python tools/convert_hf_to_megatron.py --hf $OUT/smollm2_hf --out $OUT/smollm2_megatron
    fi
}

train() {
    for name in "${RUNS[@]}"; do
        finished "$name" && { echo "$name: finished already"; continue; }
        python launch/pretrain_psft.py "recipes/smollm2_gsm8k_$name.yaml"
    done
}

# One checkpoint, in two parts so that a short session gets the cheap numbers for every run first:
# log-likelihood (held-out GSM8K NLL / entropy / KL drift from the start model, HH-RLHF harmless
# NLL / entropy, MMLU, TruthfulQA MC1), then greedy generation (GSM8K, SVAMP, ASDiv). Each part is
# one evaluate.py call into its own folder, skipped when already written.
evaluate_loglik() {
    local ckpt=$1 dest=$2
    heldout_gsm8k "$ckpt" "$dest" "$HELDOUT_LIMIT"
    heldout_hh_harmless "$ckpt" "$dest/hh_harmless" "$HELDOUT_LIMIT"
    lm_eval_tasks "$ckpt" "$dest/mmlu" mmlu --limit "$MMLU_LIMIT"
    lm_eval_tasks "$ckpt" "$dest/truthfulqa" truthfulqa_mc1 --limit "$TQA_LIMIT"
}

GEN_TASKS=${GEN_TASKS:-gsm8k,svamp,asdiv}  # another list goes to its own folder, gen_<tasks>
evaluate_generation() {
    local ckpt=$1 dest=$2 out=gen task missing=0
    [[ $GEN_TASKS == gsm8k,svamp,asdiv ]] || out=gen_${GEN_TASKS//,/_}
    # Skipped when every task already has lm-eval samples anywhere under this checkpoint's folder.
    for task in ${GEN_TASKS//,/ }; do
        find "$dest" -name "samples_psft_${task}_*" 2>/dev/null | grep -q . || missing=1
    done
    (( missing )) || return 0
    python tools/evaluate.py --ckpt "$ckpt" --data-root "$SHARED/data" --out "$dest/$out" \
        --tasks "$GEN_TASKS" --limit "$GEN_LIMIT" --max-gen-toks 256 --gen-batch-size 16
}

# The start model and every finished run's checkpoints (last first; EVAL_LAST_ONLY=1: only the last;
# EVAL_STEPS="step_000016 ...": only those), log-likelihood parts first (EVAL_PARTS=loglik or
# generation: only those).
evaluate() {
    local step name steps part
    steps=$(ls "$OUT"/*/checkpoints 2>/dev/null | grep '^step_' | sort -ru)
    [[ ${EVAL_LAST_ONLY:-0} == 1 ]] && steps=$(echo "$steps" | head -1)
    [[ -n ${EVAL_STEPS:-} ]] && steps=$EVAL_STEPS
    for part in ${EVAL_PARTS:-loglik generation}; do
        "evaluate_$part" "$START" $OUT/start
        for step in $steps; do
            for name in "${RUNS[@]}"; do
                finished "$name" && [[ -d $OUT/$name/checkpoints/$step ]] || continue
                "evaluate_$part" "$OUT/$name/checkpoints/$step" "$OUT/$name/eval/$step"
            done
        done
    done
}

# A second training seed (training.seed: the data order) for SFT and PSFT, the pair whose
# differences are a few hundredths of a nat: trained into $OUT/seed2/<run> from the same start
# model, log-likelihood part of the evaluation on the last checkpoint.
SEED2=${SEED2:-2}
read -ra SEED2_RUNS <<< "${SEED2_RUNS:-sft psft}"
seed2() {
    local name last
    for name in "${SEED2_RUNS[@]}"; do
        finished "seed2/$name" ||
            python launch/pretrain_psft.py "recipes/smollm2_gsm8k_$name.yaml" \
                training.seed="$SEED2" logging.run_dir="$OUT/seed2/$name"
        last=$(ls "$OUT/seed2/$name/checkpoints" | grep '^step_' | sort | tail -1)
        evaluate_loglik "$OUT/seed2/$name/checkpoints/$last" "$OUT/seed2/$name/eval/$last"
    done
}

# LoRA next to full fine-tuning (issue #24): SFT and PSFT, each full and with LoRA adapters (rank 16,
# alpha 32, every projection; lr 2e-4 with min_lr 2e-5, the usual 10x of a full fine-tune's rate), the same
# recipes otherwise, trained into $OUT/lora/<run> and scored by the log-likelihood part of the evaluation
# on the last checkpoint (the start model's scores in $OUT/lora/start).
LORA_OVERRIDES=(model.lora.rank=16 model.lora.alpha=32 optimizer.lr=2e-4 optimizer.min_lr=2e-5)
lora() {
    local name run last
    evaluate_loglik "$START" "$OUT/lora/start"
    for name in sft psft lora_sft lora_psft; do
        run=$OUT/lora/$name
        if ! finished "lora/$name"; then
            if [[ $name == lora_* ]]; then
                python launch/pretrain_psft.py "recipes/smollm2_gsm8k_${name#lora_}.yaml" "${LORA_OVERRIDES[@]}" \
                    logging.run_dir="$run"
            else
                python launch/pretrain_psft.py "recipes/smollm2_gsm8k_$name.yaml" logging.run_dir="$run"
            fi
        fi
        last=$(ls "$run/checkpoints" | grep '^step_' | sort | tail -1)
        evaluate_loglik "$run/checkpoints/$last" "$run/eval/$last"
    done
    python experiments/psft_vs_sft/summarize.py "$OUT/lora" --runs sft psft lora_sft lora_psft \
        --out docs/experiments/results_lora.md
    python experiments/psft_vs_sft/summarize.py "$OUT/lora" --runs lora_sft lora_psft --baseline lora_sft \
        --out docs/experiments/results_lora_pair.md
    python tools/compare_runs.py "$OUT/lora/sft" "$OUT/lora/psft" "$OUT/lora/lora_sft" "$OUT/lora/lora_psft" \
        --out docs/experiments/lora
}

report() {
    python tools/compare_runs.py "${RUNS[@]/#/$OUT/}" --out docs/experiments
    python experiments/psft_vs_sft/summarize.py $OUT --out docs/experiments/results.md
    python experiments/psft_vs_sft/summarize.py $OUT --step step_000016 --out docs/experiments/results_step16.md
    if [[ -d $OUT/seed2 ]]; then
        python experiments/psft_vs_sft/summarize.py $OUT/seed2 --start $OUT/start --out docs/experiments/results_seed2.md
    fi
}

stages=("${@:-prepare train evaluate seed2 report}")
for stage in ${stages[*]}; do
    echo "== $stage"
    "$stage"
done
