"""psft-convert-gguf by path: dequantise a Llama GGUF file into a Hugging Face folder.

    python tools/convert_gguf_to_hf.py --gguf MODEL.gguf --out HF_DIR [--tokenizer TOKENIZER_DIR]

The command: ``psft-convert-gguf`` (``psft_megatron/cli/convert_gguf.py``).
Its --help lists the options and the exit statuses. This file keeps the path that the
README, job scripts and users call; it needs the package installed (``pip install -e .``).
"""

import sys

from psft_megatron.cli.convert_gguf import main

if __name__ == "__main__":
    sys.exit(main())
