"""Dequantise a Llama GGUF file into an HF model folder (float32), for psft-convert-hf.

    psft-convert-gguf --gguf MODEL.gguf --out HF_DIR [--tokenizer TOKENIZER_DIR]
    python tools/convert_gguf_to_hf.py ...        (the same, by path)

The GGUF's tokenizer is not exported: pass the HF tokenizer folder of the same model
(tokenizer.json, tokenizer_config.json, chat template) with --tokenizer.

Exit status: 0 done (prints the output folder); 2 bad input (a missing or unsupported GGUF
file, an existing HF_DIR, a --tokenizer that is not a folder, an unwritable disk): one
"error: ..." line on stderr, no traceback; 2 also for bad usage (argparse prints the usage
first); 1 an internal error (a traceback follows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from psft_megatron.cli.shell import run_command
from psft_megatron.errors import UserError

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True, help="the .gguf file")
    p.add_argument("--out", required=True, help="output HF folder")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer folder to copy in")
    return p


def convert(args: argparse.Namespace) -> int:
    if Path(args.out).exists():
        raise UserError(f"{args.out} exists; choose another output folder")
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise UserError(f"{args.tokenizer} is not a tokenizer folder")
    if not Path(args.gguf).is_file():  # before torch and gguf are imported
        raise UserError(f"{args.gguf}: no such file (--gguf)")
    from psft_megatron.conversion.gguf import gguf_to_hf

    print(gguf_to_hf(args.gguf, args.out, args.tokenizer))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``psft-convert-gguf``: the exit status (see the module docstring)."""
    args = parser().parse_args(argv)
    return run_command(lambda: convert(args), user_errors=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
