"""What one evaluation does (:class:`EvalJob`), checked before anything heavy is imported.

:func:`check_job` resolves and checks every input without torch or megatron-core (a second,
not the ten of their imports): the checkpoint(s), the tokenizer, the chat template (a tokenizer
without one fails here when a template is needed), the task names and their data files, the
held-out file and the output folder. Every problem raises :class:`EvalInputError` with one
line naming the path or option and what to change.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psft_megatron.config.load import ConfigError
from psft_megatron.data.config import DataSourceConfig
from psft_megatron.data.errors import DataError
from psft_megatron.data.templates import ChatTemplate, load_template
from psft_megatron.data.tokenizer import Tokenizer, load_tokenizer
from psft_megatron.evaluation.inputs import (
    EvalInputError,
    find_relative,
    read_meta_json,
    resolve_checkpoint,
    tokenizer_path_of,
    training_chat_template,
    training_eval_source,
)
from psft_megatron.evaluation.tasks import Sampling, check_data, default_paths, resolve_task_names
from psft_megatron.model.config import ModelConfig
from psft_megatron.runtime.config import ParallelConfig

__all__ = ["CheckedJob", "EvalJob", "check_job"]


@dataclass
class EvalJob:
    """An evaluation as the user asked for it (``tools/evaluate.py``'s options)."""

    ckpt: str
    out: str
    tasks: list[str] = field(default_factory=list)  # short names: gsm8k, mmlu, truthfulqa_mc1, math_ood, ...
    data_root: str | None = None  # a folder laid out like ../shared/data
    data: dict[str, str] = field(default_factory=dict)  # data key -> path (overrides data_root)
    ref: str | None = None  # reference checkpoint for KL drift (needs heldout)
    heldout: DataSourceConfig | None = None
    heldout_out: str | None = None  # per-sample rows (default OUT/heldout.jsonl)
    limit: int | float | None = None  # documents per task (lm-eval's limit)
    tp: int = 1
    pp: int = 1
    batch_size: int = 8  # rows per micro-batch per data-parallel replica (scoring)
    gen_batch_size: int = 8  # prompts per generate() call
    max_gen_toks: int = 512
    sampling: Sampling = field(default_factory=Sampling)
    tokenizer: str | None = None
    chat_template: str | None = "auto"  # auto: the run's data.chat_template, else the tokenizer's; None: no template
    system_instruction: str | None = None
    params_dtype: str = "fp32"
    generation_backend: str = "auto"
    bootstrap_iters: int = 1000
    seed: int = 1234


@dataclass
class CheckedJob:
    """An :class:`EvalJob` with its inputs resolved."""

    job: EvalJob
    ckpt: Path
    ref: Path | None
    tokenizer_path: Path
    tokenizer: Tokenizer
    template: ChatTemplate | None  # renders lm-eval prompts (None: plain prompts, no chat template)
    heldout_template: ChatTemplate | None  # renders --heldout conversations (the same one, or the tokenizer's)
    template_spec: str | None
    task_names: list[str]
    data_paths: dict[str, str]

    @property
    def apply_chat_template(self) -> bool:
        return self.template is not None


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=out))
    except OSError as e:
        raise EvalInputError(f"cannot write --out {out}: [Errno {e.errno}] {e.strerror}") from None


def check_layout(ckpt: Path, parallel: ParallelConfig, option: str) -> None:
    """The checkpoint's model splits at ``--tp`` / ``--pp`` (heads, query groups, layers)."""
    meta = read_meta_json(ckpt)
    try:
        cfg = ModelConfig.from_dict(meta.get("model") or {})
        if cfg.hf_config and not cfg.num_layers:
            cfg = cfg.resolve()
        cfg.validate(parallel)
    except ConfigError as e:
        raise EvalInputError(f"{option} {ckpt}: {' '.join(str(e).split())} (--tp/--pp)") from None


def check_job(job: EvalJob, *, create_out: bool = True) -> CheckedJob:
    """Resolve and check ``job``'s inputs (no torch); raises :class:`EvalInputError`."""
    if not job.tasks and job.heldout is None and job.ref is None:
        raise EvalInputError("nothing to evaluate: give --tasks, --heldout and/or --ref")
    if job.tp < 1 or job.pp < 1:
        raise EvalInputError(f"--tp and --pp must be >= 1, got {job.tp} and {job.pp}")
    if job.sampling.n < 1:
        raise EvalInputError(f"--num-samples must be >= 1, got {job.sampling.n}")
    ckpt = resolve_checkpoint(job.ckpt, "--ckpt")
    ref = resolve_checkpoint(job.ref, "--ref") if job.ref else None
    parallel = ParallelConfig(tensor_model_parallel_size=job.tp, pipeline_model_parallel_size=job.pp)
    for path, option in ((ckpt, "--ckpt"), (ref, "--ref")):
        if path is not None:
            check_layout(path, parallel, option)
    if ref is not None and job.heldout is None:
        # Drift needs held-out text: default to the run's own held-out data (data.eval[0] of its config.yaml).
        source = training_eval_source(ckpt)
        if source is None:
            raise EvalInputError("--ref measures KL drift on held-out data: give --heldout FILE too")
        try:
            job = dataclasses.replace(job, heldout=DataSourceConfig.from_dict(dict(source, long_sample="truncate_response")))
        except ConfigError as e:
            raise EvalInputError(f"the run's data.eval[0] cannot be read for --ref: {e}; give --heldout FILE") from None
    names = resolve_task_names(job.tasks) if job.tasks else []
    paths = dict(default_paths(job.data_root)) if job.data_root else {}
    paths.update(job.data)
    data_paths = check_data(names, paths) if names else {}
    if job.heldout is not None:
        p = Path(job.heldout.path)
        if not p.exists() and Path(job.heldout.path).suffix in (".jsonl", ".json", ".parquet", ".gz"):
            raise EvalInputError(f"{p}: file not found (--heldout)")
    tok_path = tokenizer_path_of(ckpt, job.tokenizer)
    try:
        tokenizer = load_tokenizer(tok_path)
    except DataError as e:
        raise EvalInputError(f"{e} (--tokenizer)") from None
    spec = job.chat_template
    if spec == "auto":
        found, spec = training_chat_template(ckpt)
        spec = spec if found else None
        if spec and spec.endswith(".jinja"):  # a path relative to the folder training ran in
            spec = str(find_relative(spec, ckpt) or spec)
        use_template = True
    else:
        use_template = spec is not None
    template = None
    if use_template or job.heldout is not None:
        try:
            template = load_template(spec, tokenizer)
        except DataError as e:
            need = "--heldout's conversations need one" if not use_template else "the prompts are rendered with it"
            raise EvalInputError(f"{' '.join(str(e).split())} ({need}: pass --chat-template NAME|FILE"
                                 + (" or --no-chat-template)" if use_template else ")")) from None
    if create_out:
        _check_out(Path(job.out))
    return CheckedJob(job=job, ckpt=ckpt, ref=ref, tokenizer_path=tok_path, tokenizer=tokenizer,
                      template=template if use_template else None, heldout_template=template,
                      template_spec=spec if template is not None else None, task_names=names, data_paths=data_paths)


def describe(checked: CheckedJob) -> dict[str, Any]:
    """What the job resolved to, for the results folder."""
    return {"ckpt": str(checked.ckpt), "ref": str(checked.ref) if checked.ref else None,
            "tokenizer": str(checked.tokenizer_path),
            "chat_template": checked.template_spec or ("tokenizer" if checked.template is not None else None),
            "apply_chat_template": checked.apply_chat_template, "tasks": checked.task_names,
            "data": checked.data_paths}
