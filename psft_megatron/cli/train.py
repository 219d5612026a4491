"""Train a PSFT recipe (SFT warm-up, then PSFT; or another objective), or resume it.

    torchrun --nproc-per-node N -m psft_megatron.train RECIPE.yaml [key.sub=value ...]
    torchrun --nproc-per-node N --no-python psft-train RECIPE.yaml [key.sub=value ...]
    torchrun --nproc-per-node N launch/pretrain_psft.py RECIPE.yaml [key.sub=value ...]
    psft-train RECIPE.yaml --validate-only        (set WORLD_SIZE to the job's size)
    psft-train RECIPE.yaml --plan --world-size 64 --gpu h100-80gb      (the same as psft-plan)

Reads the recipe, applies overrides and validates it once, with the files and folders it names,
before any weight is built; then trains, or resumes from the run's latest checkpoint. Without
torchrun it runs as a single process. --plan prints the memory per GPU and the time per step,
then exits (0 if it fits, 2 with one "error:" line naming the biggest term if not; no GPU needed).

Exit status: 0 done: finished (or stopped by training.exit_after_steps, after saving); 2 bad
usage, recipe, data, checkpoint or disk: one "error: ..." line says what to fix (under torchrun,
one per rank, "error: [rank N] ..."); 3 training diverged: too many consecutive non-finite steps
(training.max_skipped_steps); 75 stopped early by SIGTERM/SIGUSR1 or training.exit_duration_minutes,
after saving: relaunch the same command to resume; 1 an internal error (a traceback follows:
please report it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from psft_megatron.cli.plan import add_plan_options, plan
from psft_megatron.cli.shell import run_command
from psft_megatron.errors import EXIT_OK, EXIT_PREEMPTED, UserError

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. training.train_steps=16")
    p.add_argument("--validate-only", action="store_true", help="check the recipe and what it names, then exit")
    p.add_argument("--plan", action="store_true", help="print the memory and time plan per GPU, then exit")
    add_plan_options(p)
    return p


def train(args: argparse.Namespace) -> int:
    """Check the recipe once, then train it in this process; the exit status (0 or EXIT_PREEMPTED)."""
    import torch

    from psft_megatron.config.load import ConfigError
    from psft_megatron.preflight import check_launch
    from psft_megatron.recipe import load_recipe

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        recipe = load_recipe(args.recipe, args.overrides, world_size=world)
        # --validate-only may run on a login node without GPUs: no device check then.
        check_launch(recipe, world, has_cuda=None if args.validate_only else torch.cuda.is_available())
    except ConfigError as e:
        raise UserError(f"bad recipe: {e}") from None
    if args.validate_only:
        print(f"{args.recipe}: valid")
        return EXIT_OK

    from psft_megatron.run import run

    result = run(recipe)  # checks nothing again: check_launch remembers the recipe it passed
    log = logging.getLogger("psft")
    if result.preempted:
        log.info("stopped at step %d (%s); checkpoint %s; relaunch to resume", result.step, result.stop_reason,
                 result.last_checkpoint)
        return EXIT_PREEMPTED
    log.info("done: %d steps; last checkpoint %s", result.step, result.last_checkpoint)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``psft-train``: the exit status (see the module docstring)."""
    args = parser().parse_intermixed_args(argv)  # overrides may follow the options
    return run_command(lambda: plan(args) if args.plan else train(args))


if __name__ == "__main__":  # guard: dist checkpointing's async writer spawns processes
    sys.exit(main())
