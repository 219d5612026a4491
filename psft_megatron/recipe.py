"""The whole recipe: the component sections composed, loaded from YAML with overrides and
checked before anything is built.

Each section's dataclass lives next to its component (``model.config.ModelConfig``,
``data.config.DataConfig``, ...) and checks its own fields. This module only composes
them and checks the rules that span sections (batch geometry against the world size,
sequence parallelism against the sequence length, what this machine can run). Every
error, single-field or cross-field, starts with the file and line of the field to change.

``model.hf_config`` is read once per recipe: :attr:`RecipeConfig.resolved_model` reads it the
first time (``load_recipe``'s validation) and keeps what it read, so the checks, the plan, the
preflight and the build that follow all see one resolved model without opening the file again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psft_megatron.checkpoint.config import CheckpointConfig
from psft_megatron.config.load import ConfigError, FieldError, Origin, build_dataclass, load_dataclass, to_dict
from psft_megatron.data.config import DataConfig
from psft_megatron.loss.objectives import ObjectiveConfig
from psft_megatron.model.config import ModelConfig
from psft_megatron.runtime.config import DistributedConfig, ParallelConfig
from psft_megatron.training.config import LoggingConfig, OptimConfig, TrainingConfig

__all__ = ["RecipeConfig", "load_recipe", "recipe_from_dict"]


@dataclass
class RecipeConfig:
    """A training run. Every section is optional except what ``validate`` requires."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    loss: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # The YAML file and key lines this recipe was read from (empty when built in code).
    origin: Origin = field(default_factory=Origin, init=False, repr=False, compare=False)
    # The checks this recipe passed, each with the recipe's content it passed on (see passed()).
    checks_passed: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    # (model.hf_config, the architecture read from it): the file read once, see resolved_model.
    _hf_architecture: tuple[str, ModelConfig] | None = field(default=None, init=False, repr=False, compare=False)

    def passed(self, check: str) -> bool:
        """Whether ``check`` (a name such as ``"validate:world=8"``) passed on this recipe as it is
        now: a field changed since then voids it. So a launch checks a recipe once, however many
        steps of it (the launcher, :func:`psft_megatron.run.run`) ask for the check."""
        return check in self.checks_passed and self.checks_passed[check] == to_dict(self)

    def mark_passed(self, check: str) -> None:
        """Record that ``check`` passed on the recipe as it is now."""
        self.checks_passed[check] = to_dict(self)

    @property
    def resolved_model(self) -> ModelConfig:
        """``model`` with the architecture from ``model.hf_config`` filled in: what builds, plans and
        checkpoints use. ``model`` itself keeps what the recipe says.

        The file is read the first time and kept for this recipe (a launch reads it once); the merge
        with ``model`` is redone on every call without I/O, so a later change to ``model`` shows (a
        new ``hf_config`` path is read). An unreadable or unsupported file raises :class:`ConfigError`
        naming ``model.hf_config``'s line.
        """
        model = self.model
        if not model.hf_config or model.resolved:
            return model.resolve()  # nothing to read
        if self._hf_architecture is None or self._hf_architecture[0] != model.hf_config:
            self._hf_architecture = (model.hf_config, self._read_hf_architecture(model.hf_config))
        return model.filled_from(self._hf_architecture[1])

    def _read_hf_architecture(self, path: str) -> ModelConfig:
        where = self.origin.where("model.hf_config")
        try:
            return ModelConfig.from_hf(path)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}model.hf_config: {path} is not valid JSON: {e}") from None
        except KeyError as e:
            raise ConfigError(f"{where}model.hf_config: {path} lacks the field {e}") from None
        except OSError as e:  # FileNotFoundError names the path
            raise ConfigError(f"{where}model.hf_config: {e}") from None
        except (ValueError, TypeError) as e:  # an unsupported architecture or feature, a field of the wrong type
            raise ConfigError(f"{where}model.hf_config: {path}: {e}") from None

    def validate(self, world_size: int | None = None) -> None:
        """Every constraint that can be checked before a weight is built; ConfigError says what to change.

        With ``world_size`` also the batch geometry against the data-parallel size. A recipe that
        already passed for the same world size (and was not changed since) is not checked again.
        """
        check = f"validate:world={world_size}"
        if self.passed(check):
            return
        try:
            self.parallel.validate()
            self.training.validate()
            self.optimizer.validate()
            self.checkpoint.validate(self.training.steps_per_global_batch)
            self.logging.validate()
            self.resolved_model.validate(self.parallel)
            self._validate_cross_section()
            self.data.validate(self.training.seq_length)
            if world_size is not None:
                dp = self.parallel.data_parallel_size(world_size)
                self.training.validate_for_dp(dp)
                self._validate_interleaving(dp)
        except FieldError as e:
            raise ConfigError(f"{self.origin.where(e.field)}{e}") from None
        except ConfigError:
            raise
        except ValueError as e:  # e.g. an unreadable model.hf_config
            raise ConfigError(f"{self.origin.where('model.hf_config')}{e}") from None
        self.mark_passed(check)

    def validate_for_device(self, has_cuda: bool) -> None:
        """What megatron-core cannot do on this machine, refused before anything is built."""
        if has_cuda:
            if self.parallel.sequence_parallel and self.model.transformer_impl == "local":
                from megatron.core.models.gpt.gpt_layer_specs import HAVE_APEX

                if not HAVE_APEX:  # the torch-norm fallback asserts no SP (cpu_compat lifts it on CPU only)
                    raise ConfigError(
                        f"{self.origin.where('parallel.sequence_parallel')}parallel.sequence_parallel with "
                        "model.transformer_impl: local needs apex's fused norms on a GPU; install TransformerEngine "
                        "(transformer_impl: auto) or apex, or turn sequence_parallel off"
                    )
            return
        # The distributed optimizer runs on CPU too (cpu_compat routes its CUDA type checks).
        if self.parallel.moe_token_dispatcher == "alltoall" and self.resolved_model.is_moe:
            raise ConfigError(
                f"no CUDA device: {self.origin.where('parallel.moe_token_dispatcher')}parallel.moe_token_dispatcher: "
                "alltoall needs CUDA (megatron's syncs its split sizes through CUDA streams); use allgather on CPU"
            )
        if self.model.params_dtype == "bf16":
            raise ConfigError(
                f"no CUDA device: {self.origin.where('model.params_dtype')}model.params_dtype: bf16 needs CUDA "
                "(megatron's mixed-precision optimizer asserts CUDA tensors); use fp32 on CPU"
            )

    def _validate_cross_section(self) -> None:
        t = self.training
        if t.eval_interval and not (self.data.eval or t.eval_tasks):
            raise FieldError("training.eval_interval", "is set but data.eval lists no held-out source "
                             "(and training.eval_tasks none)")
        if t.eval_at_start and not (self.data.eval or t.eval_tasks):
            raise FieldError("training.eval_at_start", "is true but data.eval lists no held-out source "
                             "(and training.eval_tasks none)")
        if t.eval_kl_to_start and not self.data.eval:
            raise FieldError("training.eval_kl_to_start", "is true but data.eval lists no held-out source")
        if self.model.lora is not None and not self.checkpoint.init_from:
            raise FieldError(
                "model.lora",
                "needs checkpoint.init_from: the full checkpoint (tools/convert_hf_to_megatron.py) the adapters "
                "train on, or a LoRA checkpoint to continue",
            )
        if t.eval_tasks and self.parallel.context_parallel_size > 1:
            raise FieldError("training.eval_tasks", "cannot be scored with parallel.context_parallel_size > 1 "
                             "(log-likelihood scoring splits no sequence over CP ranks); score saved checkpoints "
                             "with psft-evaluate instead")
        tp = self.parallel.tensor_model_parallel_size
        if self.parallel.sequence_parallel and t.seq_length % tp:
            raise FieldError(
                "training.seq_length",
                f"({t.seq_length}) must be divisible by parallel.tensor_model_parallel_size ({tp}) with "
                f"sequence_parallel: each TP rank holds an equal slice of the sequence; use seq_length "
                f"{t.seq_length // tp * tp or tp}",
            )

    def _validate_interleaving(self, dp: int) -> None:
        if not self.parallel.virtual_pipeline_model_parallel_size:
            return
        pp = self.parallel.pipeline_model_parallel_size
        micro = self.training.mini_batch_size // (self.training.micro_batch_size * dp)
        if micro % pp:
            raise FieldError(
                "training.mini_batch_size",
                f"gives {micro} micro-batches per mini-batch, but the interleaved pipeline schedule needs a "
                f"multiple of pipeline_model_parallel_size ({pp}): raise training.mini_batch_size or lower "
                "micro_batch_size",
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_recipe(path: str | Path, overrides: list[str] | None = None, world_size: int | None = None) -> RecipeConfig:
    """Read a YAML recipe, apply ``key.sub=value`` overrides, build and validate it: a validated recipe.

    With ``world_size`` (the job's number of processes) the batch geometry is checked against it too;
    later checks of the same recipe at that size (:func:`psft_megatron.preflight.check_launch`, run by
    :func:`psft_megatron.run.run`) do not repeat the work. Raises :class:`ConfigError` naming the file,
    line and field.
    """
    recipe, origin = load_dataclass(RecipeConfig, path, overrides)
    recipe.origin = origin
    recipe.validate(world_size)
    return recipe


def recipe_from_dict(data: dict[str, Any]) -> RecipeConfig:
    """Build a recipe from a mapping (tests, notebooks); not validated."""
    return build_dataclass(RecipeConfig, data)
