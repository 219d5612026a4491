"""Torch-free checks and look-ups of an evaluation's inputs, so a bad path fails in a second.

What ``--ckpt`` may name: a converted checkpoint or a trainer step folder (both hold
``psft_meta.json``), or a trainer's ``checkpoints/`` folder or run folder (its ``latest``
checkpoint is used). The tokenizer comes from ``--tokenizer``, else the checkpoint's
``tokenizer/`` folder, else the path the trainer recorded in ``psft_meta.json``. The chat
template is the one the run trained with: the run's ``config.yaml`` (``data.chat_template``)
when the checkpoint sits in a run folder, else the tokenizer's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from psft_megatron.conversion.checks import check_checkpoint_dir
from psft_megatron.conversion.errors import ConversionError
from psft_megatron.errors import UserError

__all__ = [
    "EvalInputError",
    "META_FILE",
    "read_meta_json",
    "resolve_checkpoint",
    "run_config",
    "find_relative",
    "tokenizer_path_of",
    "training_chat_template",
    "training_eval_source",
]

META_FILE = "psft_meta.json"  # psft_megatron.checkpoint.model_checkpoint.META_FILE (that module imports torch)


class EvalInputError(UserError, ValueError):
    """A bad evaluation input; the message is one line naming the path or option and what to change."""


def resolve_checkpoint(path: str | Path, option: str = "--ckpt") -> Path:
    """The model checkpoint folder ``path`` names (see the module docstring); raises :class:`EvalInputError`."""
    p = Path(path)
    try:
        check_checkpoint_dir(p)
    except ConversionError as e:
        raise EvalInputError(f"{e} ({option})") from None
    if (p / META_FILE).is_file():
        return p
    for folder in (p, p / "checkpoints"):
        pointer = folder / "latest"
        if pointer.is_file():
            step = folder / pointer.read_text().strip()
            if (step / META_FILE).is_file():
                return step
    raise EvalInputError(
        f"{p} is not a psft_megatron model checkpoint: no {META_FILE} ({option}: give a converted checkpoint, "
        "a trainer step folder, or a run/checkpoints folder with a 'latest' file)"
    )


def read_meta_json(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``psft_meta.json`` as plain JSON (the full check happens when it is loaded)."""
    path = ckpt / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EvalInputError(f"{path} is unreadable: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict):
        raise EvalInputError(f"{path} does not hold a JSON object")
    return meta


def tokenizer_path_of(ckpt: Path, explicit: str | Path | None = None) -> Path:
    """``explicit``, else ``<ckpt>/tokenizer``, else the tokenizer recorded in ``psft_meta.json``."""
    if explicit:
        if not Path(explicit).exists():
            raise EvalInputError(f"{explicit}: tokenizer path not found (--tokenizer)")
        return Path(explicit)
    if (ckpt / "tokenizer").is_dir():
        return ckpt / "tokenizer"
    recorded = read_meta_json(ckpt).get("tokenizer")
    found = find_relative(recorded, ckpt) if recorded else None
    if found is not None:
        return found
    where = f" (psft_meta.json names {recorded}, which does not exist)" if recorded else ""
    raise EvalInputError(f"{ckpt} has no tokenizer/ folder{where}: pass --tokenizer DIR")


def find_relative(path: str | Path, ckpt: Path) -> Path | None:
    """``path`` as it exists: absolute, from the working directory, or from a folder above ``ckpt``.

    The trainer records paths as the recipe wrote them, relative to the folder it ran in (a run
    folder's ``runs/x/checkpoints/step_N`` sits below it); evaluation may run elsewhere.
    """
    p = Path(path)
    if p.exists():
        return p
    if p.is_absolute():
        return None
    for folder in Path(ckpt).absolute().parents:
        if (folder / p).exists():
            return folder / p
    return None


def run_config(ckpt: Path) -> dict[str, Any] | None:
    """The ``config.yaml`` of the run the checkpoint belongs to (None if it is not in a run folder).

    A trainer writes ``<run_dir>/config.yaml`` and its checkpoints to ``<run_dir>/checkpoints/step_N``.
    """
    for folder in (ckpt.parent.parent, ckpt.parent):
        config = folder / "config.yaml"
        if config.is_file():
            try:
                data = yaml.safe_load(config.read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise EvalInputError(f"{config} is unreadable: {type(e).__name__}: {e}") from None
            return data if isinstance(data, dict) else {}
    return None


def training_chat_template(ckpt: Path) -> tuple[bool, str | None]:
    """``(found, data.chat_template)`` from the run's ``config.yaml`` (see :func:`run_config`)."""
    config = run_config(ckpt)
    if config is None:
        return False, None
    return True, (config.get("data") or {}).get("chat_template")


def training_eval_source(ckpt: Path) -> dict[str, Any] | None:
    """The run's first held-out source (``data.eval[0]``), its path found as :func:`find_relative` does."""
    sources = ((run_config(ckpt) or {}).get("data") or {}).get("eval") or []
    if not sources or not isinstance(sources[0], dict) or not sources[0].get("path"):
        return None
    source = dict(sources[0])
    found = find_relative(source["path"], ckpt)
    if found is not None:
        source["path"] = str(found)
    return source
