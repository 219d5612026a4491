"""The ``data`` section of a recipe: sources, adapter options, tokenizer and chat template."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from psft_megatron.config.load import FieldError, build_dataclass, check_choices

from .errors import OnError

SourceFormat = Literal["auto", "jsonl", "json", "parquet", "datasets"]
LongSamplePolicy = Literal["drop", "truncate_response"]
TrainOn = Literal["last", "all"]


@dataclass
class AdapterConfig:
    """Options for the adapters; each adapter reads only the ones that concern it."""

    system_prompt: str | None = None  # prepended as a system turn unless the record has one
    train_on: TrainOn = "last"  # hh_rlhf/messages/generic: train the last assistant turn, or all
    strip_calculator_notes: bool = False  # gsm8k: drop the "<<48/2=24>>" annotations
    require_boxed: bool = True  # math: a solution without \boxed{...} is a bad record
    hh_field: str = "chosen"  # hh_rlhf: which transcript to train on
    prompt_field: str = "prompt"  # generic (prompt/response mode)
    response_field: str = "response"  # generic
    messages_field: str | None = None  # generic: set to use a messages column instead
    role_key: str = "role"  # messages/generic: keys inside each message
    content_key: str = "content"
    # messages/generic: dataset role names -> user/assistant/system (e.g. ShareGPT's human/gpt)
    role_map: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choices(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        """Build from a YAML mapping; unknown keys and wrong types are errors naming them."""
        return build_dataclass(cls, d, "adapter_options")


@dataclass
class DataSourceConfig:
    """One training data source, as a YAML recipe describes it.

    ``path`` is a local file (``.jsonl``, ``.jsonl.gz``, ``.json``, ``.parquet``), a local
    dataset directory, or a ``datasets`` hub name (``openai/gsm8k``); with ``data_files``
    it is a ``datasets`` builder name such as ``"json"`` or ``"parquet"``.
    """

    path: str
    adapter: str = "generic"  # gsm8k | math | hh_rlhf | messages | generic
    adapter_options: AdapterConfig = field(default_factory=AdapterConfig)
    format: SourceFormat = "auto"  # auto: by file suffix; directories and hub names use datasets
    split: str = "train"  # datasets only
    subset: str | None = None  # datasets config name, e.g. "main" for openai/gsm8k
    data_files: str | list[str] | dict[str, Any] | None = None  # datasets only
    streaming: bool = False  # datasets only: iterate without downloading the whole split
    cache_dir: str | None = None  # datasets only
    max_length: int | None = None  # tokens per sample; None = no limit
    long_sample: LongSamplePolicy = "drop"  # drop, or cut the response (never the prompt)
    on_error: OnError = "raise"  # raise a DataError, or skip and count in the SkipReport
    limit: int | None = None  # read only the first N records (smoke tests, debugging)

    def __post_init__(self) -> None:
        if isinstance(self.adapter_options, dict):
            self.adapter_options = AdapterConfig.from_dict(self.adapter_options)
        check_choices(self)
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 or null, got {self.max_length}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0 or null, got {self.limit}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataSourceConfig":
        """Build from a YAML mapping; unknown keys, wrong types and a missing ``path`` are errors naming them."""
        return build_dataclass(cls, d, "source")

    def fingerprint(self) -> str:
        """A stable hash of the settings that change the produced samples (for caches)."""
        d = asdict(self)
        for k in ("on_error", "cache_dir", "streaming"):  # do not change which samples come out
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class DataConfig:
    """Training and held-out data, tokenizer and chat template."""

    train: list[DataSourceConfig] = field(default_factory=list)
    # Held-out sources scored every training.eval_interval steps (validation loss and entropy).
    eval: list[DataSourceConfig] = field(default_factory=list)
    # A SentencePiece .model, a folder/file with an HF tokenizer.json, or a hub name.
    tokenizer: str = ""
    # None = the tokenizer's own Jinja template; or llama3, chatml, llama2, plain (built in), qwen3
    # (Qwen3's own, bundled), or a .jinja file.
    chat_template: str | None = None
    # Token used for padding when the tokenizer has none (a token string or id; None = EOS).
    pad: str | None = None
    # Tokenised samples are cached here (mmap arrays), built once by rank 0 or tools/prepare_data.py.
    cache_dir: str = "data_cache"
    pack: bool = True

    def validate(self, seq_length: int | None = None) -> None:
        """Checks within this section (``seq_length``: the training row length, bounds max_length)."""
        if not self.train:
            raise FieldError("data.train", "must list at least one source (path, adapter, ...)")
        if not self.tokenizer:
            raise FieldError("data.tokenizer", "must be set (a SentencePiece .model, an HF tokenizer folder, or a hub name)")
        for split in ("train", "eval"):
            for i, src in enumerate(getattr(self, split)):
                if seq_length is not None and src.max_length is not None and src.max_length > seq_length:
                    raise FieldError(
                        f"data.{split}[{i}].max_length",
                        f"({src.max_length}) of {src.path} exceeds training.seq_length ({seq_length}); "
                        "lower max_length or raise seq_length",
                    )
