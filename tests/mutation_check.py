#!/usr/bin/env python
"""Plant single-line bugs one at a time and check that the tests catch each (run on demand, not in CI).

    python tests/mutation_check.py                 # every mutant
    python tests/mutation_check.py --only lr_off_by_one,vocab_none
    python tests/mutation_check.py --list

For each mutant: copy the working tree (without .venv and run outputs) to a scratch
folder, replace one exact piece of source text, run the tests named for it there
(``pytest -x``), and count the mutant *caught* when they fail. A surviving mutant is a
missing test: add one, then add the mutant here. The last result is recorded in the
README's testing section.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    find: str  # exact text, which must occur once
    replace: str
    tests: tuple[str, ...]  # pytest node ids or files that must catch it
    why: str


REFERENCE = ("tests/test_trainer_reference.py",)

MUTANTS: tuple[Mutant, ...] = (
    # ---- the six wiring bugs of issue #16 that once survived every test
    Mutant("per_micro_batch_mean", "psft_megatron/training/step.py",
           "            global_count,\n",
           "            torch.tensor(max(mb.num_loss_tokens, 1), device=setup.device),\n",
           REFERENCE, "each micro-batch divided by its own token count (the gradient-accumulation bug)"),
    Mutant("no_clipping_on_cpu", "psft_megatron/runtime/cpu_compat.py",
           "    if clip_coeff < 1.0 and grads:\n",
           "    if False:\n",
           REFERENCE, "gradient clipping does nothing on the CPU path"),
    Mutant("lr_off_by_one", "psft_megatron/training/step.py",
           "    scheduler.step(increment=1)\n    lr = float(optimizer.param_groups[0][\"lr\"])\n"
           "    ok, _, _ = optimizer.step()\n",
           "    lr = float(optimizer.param_groups[0][\"lr\"])\n    ok, _, _ = optimizer.step()\n"
           "    scheduler.step(increment=1)\n",
           REFERENCE, "the LR schedule one step late: step 1 runs at lr 0"),
    Mutant("eval_rows_ignored", "psft_megatron/training/evaluator.py",
           "data.eval_micro_batches(training.eval_rows)",
           "data.eval_micro_batches(None)",
           ("tests/test_trainer_behaviour.py",), "training.eval_rows ignored"),
    Mutant("vocab_none", "psft_megatron/training/step.py",
           "vocab_size=model_cfg.vocab_size,  # the loss leaves the padded columns out",
           "vocab_size=None,",
           REFERENCE, "the loss is handed vocab_size=None: padded columns join the softmax"),
    Mutant("decay_norms_and_biases", "psft_megatron/training/optimizer.py",
           "optimizer = get_megatron_optimizer(opt_config, model)",
           "optimizer = get_megatron_optimizer(opt_config, model, config_overrides={})",
           REFERENCE, "weight decay applied to norms and biases"),
    # ---- loss
    Mutant("psft_clip_edge", "psft_megatron/loss/objectives.py",
           "clipped = r.detach() > 1.0 + cfg.eps_high",
           "clipped = r.detach() > 1.0 + cfg.eps_low",
           ("tests/test_loss_units.py",), "PSFT clips at the wrong edge"),
    Mutant("loss_scale_ignores_dp", "psft_megatron/loss/normalize.py",
           "return float(num_microbatches) * dp_cp / context_parallel_size",
           "return float(num_microbatches)",
           ("tests/test_loss_units.py", "tests/test_loss_parallel.py"), "megatron's DP averaging not undone"),
    # ---- data
    Mutant("labels_cross_samples", "psft_megatron/data/packing.py",
           "    same &= segment_ids < n\n",
           "    same |= segment_ids < n\n",
           ("tests/test_data_packing.py",), "labels and loss mask run across packed sample boundaries"),
    Mutant("dp_slices_overlap", "psft_megatron/data/loader.py",
           "mine = mini[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]",
           "mine = mini[0:per_rank]",
           ("tests/test_data_loader.py",), "every DP rank reads the same rows"),
    # ---- checkpoint and run outputs
    Mutant("cursor_rows_of_rank_1", "psft_megatron/training/batch_cursor.py",
           "start = self.dp_rank * (self.mini_batch_size // self.dp_size) + micro_index * self.micro_batch_size",
           "start = self.dp_rank * self.micro_batch_size + micro_index * self.micro_batch_size",
           ("tests/test_batch_cursor.py",
            "tests/test_faults.py::test_signal_finishes_the_step_saves_and_resumes_bit_identical"),
           "a resume inside a global batch gives rank 0's second micro-batch rank 1's logp_old (DP=2, 2+ micro-batches "
           "per rank and mini-batch; issue #21's surviving mutant)"),
    Mutant("resume_skips_data_position", "psft_megatron/checkpoint/checkpointer.py",
           "            obj.load_state_dict(saved[name])\n",
           "            pass\n",
           ("tests/test_trainer.py::test_stop_and_resume_equals_uninterrupted",),
           "a resumed run restarts the data stream"),
    Mutant("keep_last_off_by_one", "psft_megatron/checkpoint/train_checkpoint.py",
           "    for s, p in steps[:-keep_last]:\n",
           "    for s, p in steps[:-keep_last - 1]:\n",
           ("tests/test_trainer_behaviour.py",), "keep_last keeps one checkpoint too many"),
    # ---- LoRA (issue #24): each planted by hand and caught before it was recorded here
    Mutant("lora_no_dh_allreduce", "psft_megatron/model/lora/layers.py",
           "            h = mappings.copy_to_tensor_model_parallel_region(h, group=self.lora_tp_group)\n",
           "            h = h\n",
           ("tests/test_lora.py::test_tensor_parallel_lora_equals_tp1",),
           "a column-parallel adapter's A gets one TP rank's share of its gradient (TP without SP)"),
    Mutant("lora_sp_grads_not_summed", "psft_megatron/model/lora/layers.py",
           "                    param.sequence_parallel = self.lora_sp\n",
           "                    param.sequence_parallel = False\n",
           ("tests/test_lora.py::test_tensor_parallel_lora_equals_tp1",),
           "under SP the replicated adapter halves keep one sequence slice's gradient"),
    Mutant("lora_fused_units_swapped", "psft_megatron/model/lora/layers.py",
           "        return torch.cat(parts, dim=-1)",
           "        return torch.cat(parts[::-1], dim=-1)",
           ("tests/test_lora.py::test_peft_and_merged_exports_match_transformers",),
           "the adapters' outputs land on another projection's rows of the fused QKV / gate-up output"),
    Mutant("kept_checkpoint_stays_whole", "psft_megatron/checkpoint/train_checkpoint.py",
           "        elif keep_every_weights_only:\n",
           "        elif False:\n",
           ("tests/test_trainer_behaviour.py",), "checkpoint.keep_every_weights_only keeps the optimizer state"),
    Mutant("held_out_rows_follow_seed", "psft_megatron/training/data_setup.py",
           "HELD_OUT_SEED, one_row=True)",
           "t.seed, one_row=True)",
           ("tests/test_data_setup.py",), "runs differing only in seed are scored on different held-out rows"),
    Mutant("tensorboard_no_purge", "psft_megatron/training/metrics.py",
           "purge_step=resumed_at + 1 if resumed_at else None",
           "purge_step=None",
           ("tests/test_trainer_behaviour.py",), "a resumed run leaves the lost launch's TensorBoard points"),
)


_TOP_LEVEL_SKIPPED = {".venv", ".git", ".pytest_cache", "runs", "data_cache", "data", ".whl", "gpu_check_out", "logs"}


def _copy_tree(dst: Path) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        if Path(folder) == ROOT:  # run outputs and environments, not source
            skipped |= _TOP_LEVEL_SKIPPED & set(names)
        return skipped

    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)


def run_mutant(m: Mutant, scratch: Path, timeout: float) -> tuple[str, float, str]:
    """('caught' | 'SURVIVED' | 'error', seconds, last output line)."""
    tree = scratch / m.name
    _copy_tree(tree)
    path = tree / m.file
    text = path.read_text()
    if text.count(m.find) != 1:
        return "error", 0.0, f"{m.file}: the text to replace occurs {text.count(m.find)} times (update the mutant)"
    path.write_text(text.replace(m.find, m.replace))
    env = dict(os.environ, PYTHONPATH=str(tree))
    # ../shared is found relative to the tree's root: point it at the real one.
    if (ROOT.parent / "shared").is_dir() and not (tree.parent / "shared").exists():
        (tree.parent / "shared").symlink_to(ROOT.parent / "shared")
    start = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", *m.tests],
                             cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        status = "caught" if out.returncode != 0 else "SURVIVED"
        tail = (out.stdout.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        status, tail = "caught", f"timed out after {timeout:.0f}s (counts as caught: the suite would fail)"
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return status, time.monotonic() - start, tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated mutant names")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per mutant's test run")
    args = p.parse_args(argv)
    mutants = MUTANTS
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {m.name for m in MUTANTS}
        if unknown:
            print(f"error: unknown mutant(s) {sorted(unknown)}; see --list", file=sys.stderr)
            return 2
        mutants = tuple(m for m in MUTANTS if m.name in names)
    if args.list:
        for m in mutants:
            print(f"{m.name:28s} {m.file}: {m.why}")
        return 0
    caught = 0
    with tempfile.TemporaryDirectory(prefix="psft_mutants_") as tmp:
        scratch = Path(tmp) / "trees"
        scratch.mkdir()
        for m in mutants:
            status, seconds, tail = run_mutant(m, scratch, args.timeout)
            caught += status == "caught"
            print(f"{status:8s} {m.name:28s} {seconds:6.0f}s  {tail}", flush=True)
    print(f"caught {caught}/{len(mutants)}")
    return 0 if caught == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
