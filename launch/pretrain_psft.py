#!/usr/bin/env python
"""PSFT training entry point.

    torchrun --nproc-per-node N launch/pretrain_psft.py RECIPE.yaml [key.sub=value ...]
    launch/pretrain_psft.py RECIPE.yaml --plan --world-size 64 --gpu h100-80gb

--plan prints the memory per GPU (weights, gradients, optimizer, activations, logits and
loss buffers) and the FLOPs and time per optimizer step, then exits: 0 if it fits, 2 (one
"error:" line naming the biggest term and what to change) if it does not. No GPU needed.

Reads the recipe, applies overrides, validates it and the files and folders it names
(before any weight is built), then trains or resumes. Without torchrun it runs as a
single process. Exit status:

    0   finished (or stopped by training.exit_after_steps, after saving)
    1   an internal error (a traceback follows: please report it)
    2   bad usage, recipe, data, checkpoint or disk: one "error:" line says what to fix
    3   training diverged: too many consecutive non-finite steps (training.max_skipped_steps)
    75  stopped early by SIGTERM/SIGUSR1 or training.exit_duration_minutes, after saving:
        relaunch the same command to resume
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. training.train_steps=16")
    p.add_argument("--validate-only", action="store_true", help="load and validate the recipe, then exit")
    p.add_argument("--plan", action="store_true", help="print the memory and time plan per GPU, then exit")
    p.add_argument("--world-size", type=int, default=None, help="GPUs of the job for --plan (default: $WORLD_SIZE)")
    p.add_argument("--gpu", default=None, help="GPU model for --plan: h100-80gb, h200-141gb, a100-80gb, a100-40gb "
                   "(default: this machine's, else h100-80gb)")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation for --plan's step time (0.40)")
    return p.parse_intermixed_args(argv)  # overrides may follow the options


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from psft_megatron.runtime.quiet import quiet_known_warnings

    quiet_known_warnings()
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == int(os.environ.get("WORLD_SIZE", "1")) - 1 or rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # megatron-core logs its own set-up at INFO on every rank; keep its warnings only.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # After the warning filters and logging set-up: importing the package imports megatron-core.
    from psft_megatron.checkpoint.model_checkpoint import CheckpointError
    from psft_megatron.config.load import ConfigError
    from psft_megatron.data.cache import CacheError
    from psft_megatron.data.errors import DataError
    from psft_megatron.preflight import preflight
    from psft_megatron.recipe import load_recipe
    from psft_megatron.run import run
    from psft_megatron.training.data_setup import DataSetupError
    from psft_megatron.training.guards import TrainingDiverged
    from psft_megatron.training.stopping import EXIT_PREEMPTED

    if args.plan:
        return _plan(args)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        recipe.validate(world)
        preflight(recipe)
        if not args.validate_only:  # --validate-only may run on a login node without GPUs
            import torch

            recipe.validate_for_device(torch.cuda.is_available())
    except ConfigError as e:
        print(f"error: bad recipe: {e}", file=sys.stderr)
        return 2
    if args.validate_only:
        print(f"{args.recipe}: valid")
        return 0

    try:
        result = run(recipe)
    except (DataError, DataSetupError, CacheError, CheckpointError, ConfigError) as e:
        # Problems with the user's inputs, files or disk: one line naming what to fix, not a traceback.
        print(f"error [rank {rank}]: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error [rank {rank}]: {e}", file=sys.stderr)
        return 3
    log = logging.getLogger("psft")
    if result.preempted:
        log.info("stopped at step %d (%s); checkpoint %s; relaunch to resume", result.step, result.stop_reason,
                 result.last_checkpoint)
        return EXIT_PREEMPTED
    log.info("done: %d steps; last checkpoint %s", result.step, result.last_checkpoint)
    return 0


def _plan(args: argparse.Namespace) -> int:
    """``--plan``: the recipe's memory and time per GPU; exit 2 with one line if it does not fit."""
    from psft_megatron.config.load import ConfigError
    from psft_megatron.plan import DEFAULT_MFU, GPUS, check_fits, detect_gpu, format_plan, plan_recipe
    from psft_megatron.recipe import load_recipe

    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if args.gpu is not None and args.gpu not in GPUS:
        print(f"error: --gpu {args.gpu}: unknown GPU; use one of {', '.join(GPUS)}", file=sys.stderr)
        return 2
    gpu = GPUS[args.gpu] if args.gpu else detect_gpu()
    assumed = gpu is None
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        recipe.validate(world)
        plan = plan_recipe(recipe, world, gpu or GPUS["h100-80gb"], mfu=args.mfu or DEFAULT_MFU, gpu_assumed=assumed)
        print(format_plan(plan))
        check_fits(plan, recipe)
    except ConfigError as e:
        print(f"error: bad recipe: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # guard: dist checkpointing's async writer spawns processes
    sys.exit(main())
