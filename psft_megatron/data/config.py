"""The ``data`` section of a recipe: sources, adapter options, tokenizer and chat template."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
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
    # data.train only: this source's share of the training rows in a weighted mixture (see
    # psft_megatron.data.mixture). Set on every training source or on none (none: the sources are
    # one concatenated data set). Normalised over the sources, so 3 and 1 mean 75% and 25%.
    weight: float | None = None
    # The source's name in metrics (tokens/NAME) and logs; default: its file name without suffixes.
    name: str | None = None

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
        # These do not change which samples come out (the weight chooses rows, after the cache).
        for k in ("on_error", "cache_dir", "streaming", "weight", "name"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


_SUFFIXES = (".gz", ".jsonl", ".json", ".parquet")


def _derived_name(path: str) -> str:
    """A source's default name: the last part of its path without data-file suffixes, in the
    characters a metric name keeps (letters, digits, ``_ . -``)."""
    name = PurePosixPath(path.rstrip("/")).name or path
    stripped = True
    while stripped:
        stripped = False
        for suffix in _SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                name, stripped = name[: -len(suffix)], True
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def source_names(sources: list[DataSourceConfig]) -> list[str]:
    """Each source's name: its ``name``, else derived from its path; two derived names that
    coincide (``gsm8k/train.jsonl`` and ``chat/train.jsonl``) get the source's index appended."""
    derived = [_derived_name(s.path) for s in sources]
    names = []
    for i, (s, d) in enumerate(zip(sources, derived)):
        if s.name is not None:
            names.append(s.name)
        else:
            names.append(f"{d}_{i}" if derived.count(d) > 1 else d)
    return names


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
        self._validate_mixture()

    def _validate_mixture(self) -> None:
        for i, src in enumerate(self.eval):
            if src.weight is not None:
                raise FieldError(f"data.eval[{i}].weight", "weights mix training sources only; remove it here")
        weighted = [src.weight is not None for src in self.train]
        if any(weighted) and not all(weighted):
            i = weighted.index(False)
            raise FieldError(
                f"data.train[{i}].weight",
                "is missing: set a weight on every training source (a weighted mixture) or on none "
                "(the sources concatenated into one data set)",
            )
        for i, src in enumerate(self.train):
            if src.weight is not None and not (math.isfinite(src.weight) and src.weight > 0):
                raise FieldError(f"data.train[{i}].weight", f"must be a finite number > 0, got {src.weight}")
        for split in ("train", "eval"):
            names = source_names(getattr(self, split))
            for i, (src, name) in enumerate(zip(getattr(self, split), names)):
                if src.name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", src.name):
                    raise FieldError(f"data.{split}[{i}].name",
                                     f"({src.name!r}) may hold only letters, digits and _ . - (it names metrics)")
                if names.index(name) != i:
                    raise FieldError(f"data.{split}[{i}].name",
                                     f"{name!r} is also the name of data.{split}[{names.index(name)}]; "
                                     "give each source its own name")

    def train_weights(self) -> list[float] | None:
        """The training sources' weights normalised to sum to 1, or None when they are not weighted."""
        if not self.train or self.train[0].weight is None:
            return None
        total = sum(float(s.weight) for s in self.train)
        return [float(s.weight) / total for s in self.train]
