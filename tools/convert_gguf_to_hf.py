"""Dequantise a Llama GGUF file into an HF model folder (float32), for convert_hf_to_megatron.py.

    python tools/convert_gguf_to_hf.py --gguf MODEL.gguf --out HF_DIR [--tokenizer TOKENIZER_DIR]

The GGUF's tokenizer is not exported: pass the HF tokenizer folder of the same model
(tokenizer.json, tokenizer_config.json, chat template) with --tokenizer.
Exit status: 0 done; 2 bad input (one error: line); 1 an internal error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, help="the .gguf file")
    parser.add_argument("--out", required=True, help="output HF folder")
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer folder to copy in")
    args = parser.parse_args(argv)

    from psft_megatron.conversion.errors import ConversionError
    from psft_megatron.conversion.gguf import gguf_to_hf

    if Path(args.out).exists():
        print(f"error: {args.out} exists; choose another output folder", file=sys.stderr)
        return 2
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        print(f"error: {args.tokenizer} is not a tokenizer folder", file=sys.stderr)
        return 2
    try:
        out = gguf_to_hf(args.gguf, args.out, args.tokenizer)
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
