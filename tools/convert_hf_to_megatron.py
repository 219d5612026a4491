"""Convert a Hugging Face model folder into a psft_megatron model checkpoint.

    python tools/convert_hf_to_megatron.py --hf HF_DIR --out CKPT_DIR [--vocab-divisible-by 128] [--overwrite]

HF_DIR holds config.json, weights (*.safetensors, sharded or not, or pytorch_model*.bin)
and tokenizer files. CKPT_DIR gets ``model/`` (megatron dist checkpoint, loads at any
TP/PP), ``psft_meta.json``, ``hf_config.json`` and ``tokenizer/``; it appears only when
complete. Runs as one process (no torchrun) and streams tensor by tensor.
Exit status 2 with a one-line reason when the input cannot be converted exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF model folder")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--vocab-divisible-by", type=int, default=128, help="pad the vocabulary to a multiple of this")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from psft_megatron.conversion.hf_to_megatron import ConversionError, convert_hf_to_megatron

    try:
        report = convert_hf_to_megatron(
            args.hf, args.out, make_vocab_size_divisible_by=args.vocab_divisible_by, overwrite=args.overwrite
        )
    except (ConversionError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":  # the dist-checkpoint writer may start a spawn-context process: keep this guard
    sys.exit(main())
