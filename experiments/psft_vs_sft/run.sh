#!/usr/bin/env bash
# SFT vs PSFT vs DFT vs SFT-KL on SmolLM2-135M-Instruct and GSM8K (docs/experiments.md).
#
#   bash experiments/psft_vs_sft/run.sh            # everything: prepare, train, evaluate, plot
#   bash experiments/psft_vs_sft/run.sh train      # one stage: prepare | train | evaluate | report
#
# Every stage resumes: a converted model is kept, a finished run is skipped and an
# interrupted one continues from its latest checkpoint, an evaluation already written is
# not redone. On 2 CPU cores each run (32 optimizer steps) takes about 6 minutes on an idle
# machine, 20-25 while other jobs share the cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${SHARED:-../shared}
OUT=runs/psft_vs_sft
RUNS=(sft psft dft sft_kl)
# Evaluation items (fixed subsets: the first N of each file, the same for every checkpoint).
EVAL_TASKS=${EVAL_TASKS:-gsm8k,heldout_nll,hh_harmless_nll,mmlu,truthfulqa_mc1,svamp,asdiv,drift}
EVAL_LIMIT=${EVAL_LIMIT:-100}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

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

finished() { [[ -f $OUT/$1/run_status.json ]] && grep -q '"status": "finished"' "$OUT/$1/run_status.json"; }

train() {
    for name in "${RUNS[@]}"; do
        finished "$name" && { echo "$name: finished already"; continue; }
        python launch/pretrain_psft.py "recipes/smollm2_gsm8k_$name.yaml"
    done
}

evaluate() {
    local start=$OUT/smollm2_megatron
    [[ -f $OUT/eval/start/results.json ]] ||
        python tools/evaluate.py --ckpt "$start" --tasks "$EVAL_TASKS" --limit "$EVAL_LIMIT" --ref "$start" --out $OUT/eval/start
    for name in "${RUNS[@]}"; do
        for ckpt in "$OUT/$name"/checkpoints/step_*; do
            local dest=$OUT/eval/$name/$(basename "$ckpt")
            [[ -f $dest/results.json ]] ||
                python tools/evaluate.py --ckpt "$ckpt" --tasks "$EVAL_TASKS" --limit "$EVAL_LIMIT" --ref "$start" --out "$dest"
        done
    done
}

report() {
    python tools/compare_runs.py "${RUNS[@]/#/$OUT/}" --evals $OUT/eval --out docs/experiments
}

stages=("${@:-prepare train evaluate report}")
for stage in ${stages[*]}; do
    echo "== $stage"
    "$stage"
done
