"""Convert a Hugging Face model folder into a psft_megatron model checkpoint.

    psft-convert-hf --hf HF_DIR --out CKPT_DIR [--vocab-divisible-by 128] [--overwrite]
    python tools/convert_hf_to_megatron.py ...        (the same, by path)

HF_DIR holds config.json, weights (*.safetensors, sharded or not, or pytorch_model*.bin)
and tokenizer files. CKPT_DIR gets ``model/`` (megatron dist checkpoint, loads at any
TP/PP), ``psft_meta.json``, ``hf_config.json`` and ``tokenizer/``; it appears only when
complete. Runs as one process (no torchrun) and streams tensor by tensor.

Exit status: 0 done (prints a JSON report); 2 the input cannot be converted exactly or
the output cannot be written (a missing, unsupported or corrupt config.json or weight
file, an existing CKPT_DIR without --overwrite, an unwritable or full disk): one
"error: ..." line on stderr names the file and what to change, no traceback; 2 also for
bad usage (argparse prints the usage first); 1 an internal error (a traceback follows:
please report it).
"""

from __future__ import annotations

import argparse
import json
import sys

from psft_megatron.cli.shell import run_command

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="HF model folder")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--vocab-divisible-by", type=int, default=128, help="pad the vocabulary to a multiple of this")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def convert(args: argparse.Namespace) -> int:
    # Torch-free checks first: a wrong path or config fails in a second, before megatron is imported.
    from psft_megatron.conversion.checks import check_hf_folder, check_output_dir

    check_hf_folder(args.hf)
    check_output_dir(args.out, args.overwrite)
    from psft_megatron.conversion.hf_to_megatron import convert_hf_to_megatron

    report = convert_hf_to_megatron(
        args.hf, args.out, make_vocab_size_divisible_by=args.vocab_divisible_by, overwrite=args.overwrite
    )
    print(json.dumps(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``psft-convert-hf``: the exit status (see the module docstring)."""
    args = parser().parse_args(argv)
    # OSError: e.g. FileExistsError for an existing --out, or a full disk.
    return run_command(lambda: convert(args), user_errors=(OSError,))


if __name__ == "__main__":  # the dist-checkpoint writer may start a spawn-context process: keep this guard
    sys.exit(main())
