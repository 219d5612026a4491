"""Tokenizers: SentencePiece ``.model`` files and Hugging Face ``tokenizer.json``.

Both implement the small :class:`Tokenizer` protocol the pipeline needs. Special tokens
are explicit, never implied:

- ``encode`` never adds BOS/EOS by itself; the chat template writes them as text
  (``<s>``, ``<|begin_of_text|>``, ...) and ``encode`` maps every special-token string
  in the text to its single id. For SentencePiece (which would spell ``</s>`` out as
  characters) the text is split at special-token strings before encoding.
- ``encode_with_offsets`` also returns each token's start character, which is how the
  loss mask is derived from the template's character spans (see ``encode.py``).
- Padding: Llama-2's SentencePiece model has no pad token, nor does Llama-3's
  tokenizer. ``pad`` defaults to the tokenizer's configured pad token, else EOS. This is
  safe because pad positions are always loss-masked and kept in their own attention
  segment by the packer, and the loss mask is explicit (never derived from
  ``ids == pad_id``, which would also mask the trained EOS). ``pad="unk"``, a token
  string or an id can be chosen instead.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import TOKENIZER, TokenizerError


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    unk_id: int | None
    bos_token: str | None
    eos_token: str
    special_tokens: dict[str, int]  # special-token strings recognised inside text -> id
    chat_template: str | None  # the tokenizer's own Jinja chat template, if it ships one
    chat_template_path: str | None

    def encode(self, text: str) -> list[int]: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def fingerprint(self) -> str: ...


def load_tokenizer(path: str | Path, pad: str | int | None = None) -> Tokenizer:
    """Load a tokenizer from a ``.model`` file, a ``tokenizer.json`` file or a directory.

    A directory may hold ``tokenizer.json`` (preferred) or ``tokenizer.model``, plus
    ``tokenizer_config.json`` (special tokens, optional ``chat_template``) and
    ``chat_template.jinja``. A path that does not exist and looks like ``org/name`` is
    fetched from the Hugging Face hub (tokenizer files only).
    ``pad``: None (configured pad token, else EOS), ``"eos"``, ``"unk"``, ``"bos"``, a
    token string, or an id.
    """
    p = Path(path)
    if not p.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
            p = _download_tokenizer(str(path))
        else:
            raise TokenizerError(str(path), None, None, TOKENIZER, "tokenizer path not found")
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return HFTokenizer(p / "tokenizer.json", pad=pad)
        if (p / "tokenizer.model").is_file():
            return SentencePieceTokenizer(p / "tokenizer.model", pad=pad)
        raise TokenizerError(str(p), None, None, TOKENIZER, "directory has neither tokenizer.json nor tokenizer.model")
    if p.name.endswith(".json"):
        return HFTokenizer(p, pad=pad)
    return SentencePieceTokenizer(p, pad=pad)


def _download_tokenizer(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, gated, missing repo: many exception types
        raise TokenizerError(repo_id, None, None, TOKENIZER, f"cannot fetch tokenizer from the hub: {type(e).__name__}: {e}") from None


def _read_config(folder: Path) -> tuple[dict[str, Any], str | None, str | None]:
    """tokenizer_config.json (or {}) and the chat template with the file it came from."""
    cfg_path = folder / "tokenizer_config.json"
    cfg: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(str(cfg_path), getattr(e, "lineno", None), None, TOKENIZER, f"unreadable tokenizer config: {e}") from None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():  # transformers 5 writes the template here; it wins over the config key
        return cfg, jinja.read_text(encoding="utf-8"), str(jinja)
    tmpl = cfg.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
        tmpl = next((t.get("template") for t in tmpl if t.get("name") == "default"), None)
    return cfg, tmpl if isinstance(tmpl, str) else None, (str(cfg_path) if isinstance(tmpl, str) else None)


def _token_str(v: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _resolve_pad(tok: Any, pad: str | int | None, configured: str | None) -> int:
    where = tok.name
    if pad is None:
        if configured is not None and tok.token_to_id(configured) is not None:
            return tok.token_to_id(configured)
        return tok.eos_id
    if isinstance(pad, int):
        if not 0 <= pad < tok.vocab_size:
            raise TokenizerError(where, None, "pad", TOKENIZER, f"pad id {pad} outside the vocabulary (size {tok.vocab_size})")
        return pad
    named = {"eos": tok.eos_id, "bos": tok.bos_id, "unk": tok.unk_id}
    if pad in named:
        if named[pad] is None:
            raise TokenizerError(where, None, "pad", TOKENIZER, f"pad={pad!r} but the tokenizer has no {pad} token")
        return named[pad]
    tid = tok.token_to_id(pad)
    if tid is None:
        raise TokenizerError(where, None, "pad", TOKENIZER, f"pad token {pad!r} is not in the vocabulary")
    return tid


def special_token_regex(tokens: Sequence[str]) -> re.Pattern | None:
    """A pattern matching any of ``tokens`` (None for none), longest first."""
    if not tokens:
        return None
    # Longest first so that e.g. "<|im_end|>" is not cut by a shorter token that prefixes it.
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _file_hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` (Llama-2 style: bos ``<s>`` 1, eos ``</s>`` 2, unk 0, no pad)."""

    def __init__(self, model_path: str | Path, pad: str | int | None = None) -> None:
        import sentencepiece as spm

        self.path = Path(model_path)
        self.name = str(self.path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(self.name, None, None, TOKENIZER, f"not a SentencePiece model: {e}") from None
        cfg, self.chat_template, self.chat_template_path = _read_config(self.path.parent)
        self.vocab_size = self.sp.get_piece_size()

        def opt(i: int) -> int | None:
            return None if i < 0 else i

        self.bos_id, self.unk_id = opt(self.sp.bos_id()), opt(self.sp.unk_id())
        eos = opt(self.sp.eos_id())
        if eos is None:
            raise TokenizerError(self.name, None, "eos", TOKENIZER, "SentencePiece model has no EOS token")
        self.eos_id = eos
        self.bos_token = None if self.bos_id is None else self.sp.id_to_piece(self.bos_id)
        self.eos_token = self.sp.id_to_piece(self.eos_id)
        self.unk_token = None if self.unk_id is None else self.sp.id_to_piece(self.unk_id)
        # Control pieces (<s>, </s>) and <unk>: SentencePiece would spell them out
        # character by character, so encode() maps them itself.
        self.special_tokens = {
            self.sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self.sp.is_control(i) or self.sp.is_unknown(i)
        }
        self._special_ids = {i: s for s, i in self.special_tokens.items()}
        self._special_re = special_token_regex(list(self.special_tokens))
        self.pad_id = _resolve_pad(self, pad, _token_str(cfg.get("pad_token")))
        self.pad_token = self.sp.id_to_piece(self.pad_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a piece, or None when it is not in the vocabulary (not unk's id)."""
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings become their ids; no BOS/EOS added."""
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids and each token's start character in ``text``."""
        ids: list[int] = []
        starts: list[int] = []
        pos = 0
        matches = self._special_re.finditer(text) if self._special_re else iter(())
        for m in matches:
            self._encode_chunk(text, pos, m.start(), ids, starts)
            ids.append(self.special_tokens[m.group()])
            starts.append(m.start())
            pos = m.end()
        self._encode_chunk(text, pos, len(text), ids, starts)
        return ids, starts

    def _encode_chunk(self, text: str, begin: int, end: int, ids: list[int], starts: list[int]) -> None:
        if begin >= end:
            return
        chunk = text[begin:end]
        proto = self.sp.encode(chunk, return_type="proto")
        if chunk.isascii():
            for piece in proto.pieces:
                ids.append(piece.id)
                starts.append(begin + piece.begin)
            return
        # SentencePiece offsets are UTF-8 byte offsets: map them to characters.
        nbytes = np.fromiter((len(c.encode("utf-8")) for c in chunk), dtype=np.int64, count=len(chunk))
        char_at_byte = np.repeat(np.arange(len(chunk)), nbytes)
        char_at_byte = np.append(char_at_byte, len(chunk))
        for piece in proto.pieces:
            ids.append(piece.id)
            starts.append(begin + int(char_at_byte[piece.begin]))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens are written out (``</s>``), unlike ``sp.decode``."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self._special_ids:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self._special_ids[i])
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def fingerprint(self) -> str:
        """Hash of the model file and the pad choice (for data caches)."""
        return hashlib.sha256(f"sp:{_file_hash(self.path)}:pad={self.pad_id}".encode()).hexdigest()[:16]


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` via the ``tokenizers`` library.

    Special tokens and the pad choice come from ``tokenizer_config.json`` next to it; the
    chat template from ``chat_template.jinja`` or the config's ``chat_template`` key.
    """

    def __init__(self, json_path: str | Path, pad: str | int | None = None) -> None:
        from tokenizers import Tokenizer as _TK

        self.path = Path(json_path)
        self.name = str(self.path.parent)
        try:
            self.tk = _TK.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise TokenizerError(str(self.path), None, None, TOKENIZER, f"not a tokenizers JSON file: {e}") from None
        # A tokenizer.json may carry truncation/padding settings; encode() must never apply them.
        self.tk.no_truncation()
        self.tk.no_padding()
        cfg, self.chat_template, self.chat_template_path = _read_config(self.path.parent)
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {
            t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special
        }
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.unk_token = _token_str(cfg.get("unk_token"))
        cfg_file = str(self.path.parent / "tokenizer_config.json")
        if self.eos_token is None:
            raise TokenizerError(cfg_file, None, "eos_token", TOKENIZER, "no eos_token configured")
        eos = self.token_to_id(self.eos_token)
        if eos is None:
            raise TokenizerError(cfg_file, None, "eos_token", TOKENIZER, f"eos_token {self.eos_token!r} is not in the vocabulary")
        self.eos_id = eos
        self.bos_id = None if self.bos_token is None else self.token_to_id(self.bos_token)
        self.unk_id = None if self.unk_token is None else self.token_to_id(self.unk_token)
        self.pad_id = _resolve_pad(self, pad, _token_str(cfg.get("pad_token")))
        self.pad_token = self.tk.id_to_token(self.pad_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token``, or None when it is not a single token of the vocabulary."""
        return self.tk.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; added/special-token strings become their ids; no BOS/EOS added."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids and each token's start character in ``text``."""
        enc = self.tk.encode(text, add_special_tokens=False)
        return enc.ids, [o[0] for o in enc.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens written out."""
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        """Hash of the tokenizer files and the pad choice (for data caches)."""
        d = self.path.parent
        h = _file_hash(self.path, d / "tokenizer_config.json", d / "chat_template.jinja")
        return hashlib.sha256(f"hf:{h}:pad={self.pad_id}".encode()).hexdigest()[:16]
