"""Will a recipe fit? Its memory per GPU and time per optimizer step, before a job starts (no GPU needed).

    psft-plan RECIPE.yaml [key.sub=value ...] [--world-size 64] [--gpu h100-80gb] [--mfu 0.40]
    psft-train RECIPE.yaml --plan ...          (the same; also launch/pretrain_psft.py RECIPE.yaml --plan)

Prints per GPU: weights, gradients and optimizer state, activations per micro-batch and in flight
under the pipeline schedule, the output layer and loss buffers, the total against the GPU's memory;
then the FLOPs per optimizer step and the step time at an MFU. --world-size defaults to $WORLD_SIZE;
--gpu to this machine's GPU, else h100-80gb (also h200-141gb, a100-80gb, a100-40gb). How it counts:
docs/plan.md.

Exit status: 0 done, the recipe fits; 2 it does not fit, or a bad recipe or option: one "error: ..."
line on stderr names the biggest term and the change that helps most (or the field to fix); 2 also
for bad usage (argparse prints the usage first); 1 an internal error (a traceback follows).
"""

from __future__ import annotations

import argparse
import os
import sys

from psft_megatron.cli.shell import run_command
from psft_megatron.errors import UserError

__all__ = ["add_plan_options", "main", "parser", "plan"]


def add_plan_options(p: argparse.ArgumentParser) -> None:
    """The options of a plan (shared with ``psft-train --plan``)."""
    p.add_argument("--world-size", type=int, default=None, help="GPUs of the job (default: $WORLD_SIZE, else 1)")
    p.add_argument("--gpu", default=None, help="GPU model: h100-80gb, h200-141gb, a100-80gb, a100-40gb "
                   "(default: this machine's, else h100-80gb)")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation for the step time (0.40)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. parallel.tensor_model_parallel_size=8")
    add_plan_options(p)
    return p


def plan(args: argparse.Namespace) -> int:
    """Print the recipe's plan; raise :class:`UserError` if it does not fit or is bad."""
    from psft_megatron.config.load import ConfigError
    from psft_megatron.plan import DEFAULT_MFU, GPUS, check_fits, detect_gpu, format_plan, plan_recipe
    from psft_megatron.recipe import load_recipe

    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if args.gpu is not None and args.gpu not in GPUS:
        raise UserError(f"--gpu {args.gpu}: unknown GPU; use one of {', '.join(GPUS)}")
    gpu = GPUS[args.gpu] if args.gpu else detect_gpu()
    try:
        recipe = load_recipe(args.recipe, args.overrides, world_size=world)
        found = plan_recipe(recipe, world, gpu or GPUS["h100-80gb"], mfu=args.mfu or DEFAULT_MFU,
                            gpu_assumed=gpu is None)
        print(format_plan(found))
        check_fits(found, recipe)
    except ConfigError as e:
        raise UserError(f"bad recipe: {e}") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """``psft-plan``: the exit status (see the module docstring)."""
    args = parser().parse_intermixed_args(argv)  # overrides may follow the options
    return run_command(lambda: plan(args))


if __name__ == "__main__":
    sys.exit(main())
