"""Generation for lm-eval's ``generate_until``: export the checkpoint, then generate with a KV cache.

Choice (measured; see docs/benchmarks.md and the design notes): megatron-core 0.16's inference
engine needs CUDA (it calls ``.cuda()`` and CUDA events inside its controller, and its pipeline
send/recv asserts CUDA tensors), and forced onto the CPU it gained nothing from batching. So the
checkpoint is exported in-process with the project's streaming exporter
(:func:`~psft_megatron.conversion.megatron_to_hf.convert_megatron_to_hf`, layout-independent,
one layer at a time) and generated from on rank 0:

* ``transformers``: ``model.generate`` with the KV cache, batched with left padding (CPU, or a
  GPU without vLLM); greedy, or temperature / top-p sampling (no top-k);
* ``vllm``: when ``import vllm`` works on a CUDA machine (paged attention, continuous batching).

Generated ids are returned up to and including the first EOS; lm-eval's stop strings are cut
from the decoded text by the caller (and, with transformers, also stop generation early).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from psft_megatron.checkpoint.model_checkpoint import CheckpointError
from psft_megatron.conversion.errors import ConversionError
from psft_megatron.conversion.megatron_to_hf import convert_megatron_to_hf

log = logging.getLogger(__name__)

__all__ = ["TransformersGenerator", "VLLMGenerator", "choose_backend", "export_checkpoint", "make_generator"]

# torchrun's variables: an export child must start its own single-process job, not join this one.
_JOB_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None) -> Path:
    """Write ``ckpt`` as an HF folder at ``out_dir`` (replaced if present) and return it.

    The exporter runs as one process: directly here when this process is alone (or not in a
    job), else in a child process with a clean environment (this process is one rank of a
    multi-rank job, whose process group the exporter must not join). Errors raise
    :class:`ConversionError` with the exporter's one-line message.
    """
    out_dir = Path(out_dir)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        from megatron.core import parallel_state as ps

        tp_pp_1 = not ps.model_parallel_is_initialized() or (
            ps.get_tensor_model_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_world_size() == 1)
        if tp_pp_1:
            convert_megatron_to_hf(ckpt, out_dir, tokenizer_dir=tokenizer_dir, overwrite=True)
            return out_dir
    env = {k: v for k, v in os.environ.items() if k not in _JOB_ENV}
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
    code = "import sys; from psft_megatron.evaluation.generation import _export_main; sys.exit(_export_main(sys.argv[1:]))"
    args = [str(ckpt), str(out_dir)] + ([str(tokenizer_dir)] if tokenizer_dir else [])
    run = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
        raise ConversionError(errors[-1][len("error: "):] if errors else f"export of {ckpt} failed:\n{run.stderr[-3000:]}")
    return out_dir


def _export_main(argv: list[str]) -> int:
    """Child-process entry of :func:`export_checkpoint`: ``CKPT OUT [TOKENIZER_DIR]``; one error line, exit 2."""
    logging.basicConfig(level=logging.WARNING)
    try:
        convert_megatron_to_hf(argv[0], argv[1], tokenizer_dir=argv[2] if len(argv) > 2 else None, overwrite=True)
    except (CheckpointError, ConversionError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 0


def _trim(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


class TransformersGenerator:
    """Batched ``transformers`` generation (KV cache, left padding) on an HF folder."""

    def __init__(self, hf_dir: str | Path, *, pad_id: int, eos_id: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = torch.device(device)
        # CPU: fp32 (bf16 matmuls are slow there and greedy ties would differ from fp32 references).
        dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
        self.device, self.pad_id, self.eos_id = device, pad_id, eos_id
        try:  # only to stop early at lm-eval's stop strings; without it they are cut from the text afterwards
            self.hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        except (OSError, ValueError):
            self.hf_tokenizer = None

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = ()) -> list[list[int]]:
        """New token ids per prompt, up to and including EOS."""
        n = max(len(p) for p in prompts)
        x = torch.full((len(prompts), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, p in enumerate(prompts):  # left padding: every row's next token is at the same position
            x[i, n - len(p):] = torch.tensor(p)
            mask[i, n - len(p):] = 1
        kw: dict[str, Any] = {"do_sample": False}
        if do_sample:  # top_k=0: no top-k cut (transformers' default is 50), as the paper samples
            kw = {"do_sample": True, "temperature": temperature or 1.0, "top_p": top_p, "top_k": 0}
        eos_text = self.hf_tokenizer.decode([self.eos_id]) if self.hf_tokenizer is not None else None
        extra = [s for s in stop if s and s != eos_text]
        if extra and self.hf_tokenizer is not None:
            kw.update(stop_strings=extra, tokenizer=self.hf_tokenizer)
        out = self.model.generate(input_ids=x.to(self.device), attention_mask=mask.to(self.device),
                                  max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                                  use_cache=True, **kw)
        return [_trim(row, self.eos_id) for row in out[:, n:].tolist()]


class VLLMGenerator:
    """vLLM generation on an HF folder (GPU). Each prompt is one request (lm-eval repeats a prompt n times
    for n samples; vLLM samples each independently)."""

    def __init__(self, hf_dir: str | Path, *, eos_id: int, seed: int = 1234, **llm_kwargs: Any) -> None:
        from vllm import LLM

        self.llm = LLM(model=str(hf_dir), tokenizer=str(hf_dir), seed=seed, **llm_kwargs)
        self.eos_id = eos_id

    def generate(self, prompts: Sequence[list[int]], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = ()) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=temperature if do_sample else 0.0, top_p=top_p if do_sample else 1.0,
                                max_tokens=max_new_tokens, stop=[s for s in stop if s] or None,
                                stop_token_ids=[self.eos_id])
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [_trim(list(o.outputs[0].token_ids), self.eos_id) for o in outs]


def choose_backend(requested: str = "auto") -> str:
    """``vllm`` where CUDA is present and vLLM imports, else ``transformers``; or what was asked for."""
    if requested in ("transformers", "vllm"):
        return requested
    if requested != "auto":
        raise ValueError(f"generation backend must be auto, transformers or vllm, got {requested!r}")
    if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
        try:
            importlib.import_module("vllm")
            return "vllm"
        except Exception as e:  # a broken vLLM install: fall back, but say why
            log.warning("vllm is installed but does not import (%s); generating with transformers", e)
    return "transformers"


def make_generator(hf_dir: str | Path, *, pad_id: int, eos_id: int, backend: str = "auto") -> Any:
    """The generator for ``backend`` (see :func:`choose_backend`) on the exported folder."""
    chosen = choose_backend(backend)
    log.info("generation: %s on %s", chosen, hf_dir)
    if chosen == "vllm":
        return VLLMGenerator(hf_dir, eos_id=eos_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return TransformersGenerator(hf_dir, pad_id=pad_id, eos_id=eos_id, device=device)
