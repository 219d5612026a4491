"""Export a psft_megatron model checkpoint (converter output or a trainer step_NNNNNN/) as an HF folder.

    psft-export-hf --ckpt CKPT_DIR --out HF_DIR \
        [--dtype auto|float32|bfloat16|float16] [--tokenizer DIR] [--max-shard-size-gb 5] [--overwrite]
        [--peft] [--base BASE_CKPT] [--base-model NAME]
    python tools/convert_megatron_to_hf.py ...        (the same, by path)

A LoRA checkpoint (a model.lora run's step folder: adapters only, pointing at its base) exports
merged into its base by default; with --peft, HF_DIR becomes an HF PEFT adapter folder
(adapter_config.json + adapter_model.safetensors) for peft.PeftModel.from_pretrained or vLLM's
--enable-lora, on the HF export of the base (--base-model names it in adapter_config.json).
--base points at the base checkpoint when it moved since training.

Works for a checkpoint saved at any TP/PP. HF_DIR gets safetensors shards with
``model.safetensors.index.json``, ``config.json`` and the tokenizer files; vocabulary
padding is trimmed. ``--dtype auto`` keeps the dtype of the HF config that travelled
with the checkpoint (else the checkpoint's). Runs as one process, layer by layer.

Exit status: 0 done (prints a JSON report); 2 the checkpoint cannot be exported or the
output cannot be written (CKPT_DIR missing or not a checkpoint, a corrupt or truncated
checkpoint file, tensors that do not fit its config, an existing HF_DIR without
--overwrite, an unwritable or full disk): one "error: ..." line on stderr names the file
and what to change, no traceback; 2 also for bad usage (argparse prints the usage first);
1 an internal error (a traceback follows).
"""

from __future__ import annotations

import argparse
import json
import sys

from psft_megatron.cli.shell import run_command

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (holds psft_meta.json and model/)")
    p.add_argument("--out", required=True, help="output HF folder")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--tokenizer", default=None, help="tokenizer folder to copy (default: the checkpoint's)")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--peft", action="store_true",
                   help="LoRA checkpoint: write the adapters as an HF PEFT folder instead of merged weights")
    p.add_argument("--base", default=None, help="LoRA checkpoint: its base checkpoint (default: where it points)")
    p.add_argument("--base-model", default=None,
                   help="--peft: the base model named in adapter_config.json (HF name or folder)")
    return p


def export(args: argparse.Namespace) -> int:
    # Torch-free checks first: a wrong path fails in a second, before megatron is imported.
    from psft_megatron.conversion.checks import check_checkpoint_dir, check_output_dir

    check_checkpoint_dir(args.ckpt)
    check_output_dir(args.out, args.overwrite)
    if args.peft:
        from psft_megatron.conversion.lora_export import export_peft_adapter

        print(json.dumps(export_peft_adapter(args.ckpt, args.out, dtype=args.dtype, base_model=args.base_model,
                                             overwrite=args.overwrite)))
        return 0
    from psft_megatron.conversion.megatron_to_hf import convert_megatron_to_hf

    report = convert_megatron_to_hf(
        args.ckpt,
        args.out,
        dtype=args.dtype,
        tokenizer_dir=args.tokenizer,
        max_shard_bytes=int(args.max_shard_size_gb * 2**30),
        overwrite=args.overwrite,
        base=args.base,
    )
    print(json.dumps(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``psft-export-hf``: the exit status (see the module docstring)."""
    args = parser().parse_args(argv)
    # OSError: e.g. FileExistsError for an existing --out, or a full disk.
    return run_command(lambda: export(args), user_errors=(OSError,))


if __name__ == "__main__":  # the dist-checkpoint machinery may start a spawn-context process: keep this guard
    sys.exit(main())
