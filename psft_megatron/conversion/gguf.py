"""A GGUF file (llama.cpp's format, e.g. a quantised release) as an ordinary HF Llama folder.

transformers reads GGUF (``from_pretrained(folder, gguf_file=...)``) but then flags the model
as gguf-quantised and refuses to save it, and that route needs ``accelerate``. This builds
the ``LlamaForCausalLM`` from the GGUF's config and dequantised tensors directly and saves
it in float32, so :func:`psft_megatron.conversion.hf_to_megatron.convert_hf_to_megatron`
can take it from there. Needs the ``gguf`` package (the ``test`` extra).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from psft_megatron.conversion.errors import ConversionError

__all__ = ["gguf_to_hf", "load_gguf_llama"]


def load_gguf_llama(gguf_file: str | Path) -> Any:
    """The GGUF's Llama model, dequantised to float32 (tied output layer restored)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(gguf_file)
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    try:
        cfg = LlamaConfig(**load_gguf_checkpoint(str(path), return_tensors=False)["config"])
        model = LlamaForCausalLM(cfg)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    except (ValueError, KeyError, OSError) as e:
        raise ConversionError(f"{path}: cannot read it as a Llama GGUF file ({type(e).__name__}: {e})") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ConversionError(f"{path}: tensors do not match a Llama model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model.to(torch.float32).eval()


def gguf_to_hf(gguf_file: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write the GGUF's model as an HF folder at ``out_dir`` (float32 safetensors), with the
    tokenizer files of ``tokenizer_dir`` copied in (GGUF's own tokenizer is not exported)."""
    out = Path(out_dir)
    load_gguf_llama(gguf_file).save_pretrained(out)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
    return out
