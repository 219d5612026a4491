# What the experiments' run.sh scripts share (sourced, not run): whether a run has finished, and the
# evaluations of one checkpoint. Needs OUT (the runs), SHARED (the data) and START (the start model,
# the reference of the KL). Each evaluation writes into DEST and is skipped when its result is
# there already, so an interrupted stage resumes where it stopped.

finished() { [[ -f $OUT/$1/run_status.json ]] && grep -q '"status": "finished"' "$OUT/$1/run_status.json"; }

# heldout_with_kl CKPT DEST LIMIT FILE ADAPTER: NLL, token entropy and KL to $START on the first LIMIT
# records of a held-out FILE.
heldout_with_kl() {
    local ckpt=$1 dest=$2 limit=$3 file=$4 adapter=$5
    [[ -f $dest/heldout.jsonl ]] ||
        python tools/evaluate.py --ckpt "$ckpt" --data-root "$SHARED/data" --out "$dest" --ref "$START" \
            --heldout "$file" --adapter "$adapter" --heldout-limit "$limit"
}

# heldout_gsm8k CKPT DEST LIMIT: held-out GSM8K test NLL, token entropy and KL to $START.
heldout_gsm8k() { heldout_with_kl "$1" "$2" "$3" "$SHARED/data/gsm8k/test.jsonl" gsm8k; }

# heldout_math500 CKPT DEST LIMIT: the same on MATH500's test problems (worked solutions).
heldout_math500() { heldout_with_kl "$1" "$2" "$3" "$SHARED/data/math/math500_test.jsonl" math; }

# heldout_hh_harmless CKPT DEST LIMIT: HH-RLHF harmless-base test NLL and token entropy.
heldout_hh_harmless() {
    local ckpt=$1 dest=$2 limit=$3
    [[ -f $dest/summary.json ]] ||
        python tools/evaluate.py --ckpt "$ckpt" --data-root "$SHARED/data" --out "$dest" \
            --heldout "$SHARED/data/hh/harmless-base_test.jsonl.gz" --adapter hh_rlhf --heldout-limit "$limit"
}

# lm_eval_tasks CKPT DEST TASKS [evaluate.py options...]: lm-eval tasks (comma-separated) on local data.
lm_eval_tasks() {
    local ckpt=$1 dest=$2 tasks=$3
    shift 3
    [[ -f $dest/summary.json ]] ||
        python tools/evaluate.py --ckpt "$ckpt" --data-root "$SHARED/data" --out "$dest" --tasks "$tasks" "$@"
}
