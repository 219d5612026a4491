"""The whole recipe: every section, loaded from YAML with overrides and validated before anything is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psft_megatron.config.load import ConfigError, build_dataclass, load_dataclass, to_dict
from psft_megatron.config.model import ModelConfig
from psft_megatron.config.parallel import ParallelConfig
from psft_megatron.config.training import (
    CheckpointConfig,
    DistributedConfig,
    LoggingConfig,
    OptimConfig,
    TrainingConfig,
)
from psft_megatron.data.sources import DataSourceConfig
from psft_megatron.loss.objectives import ObjectiveConfig


@dataclass
class DataConfig:
    """Training and held-out data, tokenizer and chat template."""

    train: list[DataSourceConfig] = field(default_factory=list)
    # Held-out sources scored every training.eval_interval steps (validation loss and entropy).
    eval: list[DataSourceConfig] = field(default_factory=list)
    # A SentencePiece .model, a folder/file with an HF tokenizer.json, or a hub name.
    tokenizer: str = ""
    # None = the tokenizer's own Jinja template; or llama3, chatml, llama2, plain.
    chat_template: str | None = None
    # Token used for padding when the tokenizer has none (a token string or id; None = EOS).
    pad: str | None = None
    # Tokenised samples are cached here (mmap arrays), built once by rank 0 or tools/prepare_data.py.
    cache_dir: str = "data_cache"
    pack: bool = True


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

    def validate(self, world_size: int | None = None) -> None:
        """Every constraint that can be checked before a weight is built; ConfigError says what to change."""
        try:
            self.parallel.validate()
            self.training.validate()
            self.optimizer.validate()
            self.checkpoint.validate()
            self.model.resolve().validate(self.parallel)
            self._validate_steps()
            self._validate_sequence_parallel()
            self._validate_data()
            if world_size is not None:
                dp = self.parallel.data_parallel_size(world_size)
                self.training.validate_for_dp(dp)
                if self.parallel.virtual_pipeline_model_parallel_size:
                    self._validate_interleaving(dp)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def validate_for_device(self, has_cuda: bool) -> None:
        """What megatron-core cannot do on this machine, refused before anything is built."""
        if has_cuda:
            if self.parallel.sequence_parallel and self.model.transformer_impl == "local":
                from megatron.core.models.gpt.gpt_layer_specs import HAVE_APEX

                if not HAVE_APEX:  # the torch-norm fallback asserts no SP (cpu_compat lifts it on CPU only)
                    raise ConfigError(
                        "parallel.sequence_parallel with model.transformer_impl: local needs apex's fused norms on a "
                        "GPU; install TransformerEngine (transformer_impl: auto) or apex, or turn sequence_parallel off"
                    )
            return
        problems = []
        if self.model.params_dtype == "bf16":
            problems.append(
                "model.params_dtype: bf16 needs CUDA (megatron's mixed-precision optimizer asserts CUDA tensors); "
                "use fp32 on CPU"
            )
        if self.optimizer.use_distributed_optimizer:
            problems.append(
                "optimizer.use_distributed_optimizer needs CUDA (megatron asserts CUDA tensors); set it to false on CPU"
            )
        if problems:
            raise ConfigError("no CUDA device: " + "; ".join(problems))

    def _validate_steps(self) -> None:
        k = self.training.mini_batches_per_global_batch
        t = self.training
        # Checkpoints and the SFT->PSFT switch happen at global-batch boundaries, where no
        # snapshot log-probs are pending: that is what makes resume exact.
        if t.train_steps is not None and t.train_steps % k:
            raise ValueError(
                f"training.train_steps ({t.train_steps}) must be a multiple of the mini-batches per global batch "
                f"(global_batch_size / mini_batch_size = {k}): use {t.train_steps // k * k or k} or {(t.train_steps // k + 1) * k}"
            )
        if t.exit_after_steps is not None and t.exit_after_steps % k:
            raise ValueError(
                f"training.exit_after_steps ({t.exit_after_steps}) must be a multiple of global_batch_size / "
                f"mini_batch_size = {k}: a run stops between global batches"
            )
        if t.sft_warmup_steps % k:
            raise ValueError(
                f"training.sft_warmup_steps ({t.sft_warmup_steps}) must be a multiple of global_batch_size / "
                f"mini_batch_size = {k} (the phase switches at a global-batch boundary)"
            )
        if self.checkpoint.save_interval % k:
            raise ValueError(
                f"checkpoint.save_interval ({self.checkpoint.save_interval}) must be a multiple of "
                f"global_batch_size / mini_batch_size = {k}: checkpoints are taken between global batches"
            )
        if t.eval_interval < 0:
            raise ValueError(f"training.eval_interval must be >= 0, got {t.eval_interval}")
        if t.eval_interval and not self.data.eval:
            raise ValueError("training.eval_interval is set but data.eval lists no held-out source")

    def _validate_data(self) -> None:
        if not self.data.train:
            raise ValueError("data.train must list at least one source (path, adapter, ...)")
        if not self.data.tokenizer:
            raise ValueError("data.tokenizer must be set (a SentencePiece .model, an HF tokenizer folder, or 'byte')")
        for i, src in enumerate(self.data.train + self.data.eval):
            if src.max_length is not None and src.max_length > self.training.seq_length:
                raise ValueError(
                    f"data source {src.path}: max_length {src.max_length} exceeds training.seq_length "
                    f"{self.training.seq_length}; lower max_length or raise seq_length"
                )

    def _validate_sequence_parallel(self) -> None:
        tp = self.parallel.tensor_model_parallel_size
        if self.parallel.sequence_parallel and self.training.seq_length % tp:
            raise ValueError(
                f"training.seq_length ({self.training.seq_length}) must be divisible by "
                f"parallel.tensor_model_parallel_size ({tp}) with sequence_parallel: each TP rank holds an equal "
                f"slice of the sequence; use seq_length {self.training.seq_length // tp * tp or tp}"
            )

    def _validate_interleaving(self, dp: int) -> None:
        pp = self.parallel.pipeline_model_parallel_size
        micro = self.training.mini_batch_size // (self.training.micro_batch_size * dp)
        if micro % pp:
            raise ValueError(
                f"the interleaved pipeline schedule needs the micro-batches per mini-batch ({micro}) to be a "
                f"multiple of pipeline_model_parallel_size ({pp}): raise training.mini_batch_size or lower micro_batch_size"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a YAML recipe, apply ``key.sub=value`` overrides, build and validate (world size unknown)."""
    recipe = load_dataclass(RecipeConfig, path, overrides)
    recipe.validate()
    return recipe


def recipe_from_dict(data: dict[str, Any]) -> RecipeConfig:
    """Build a recipe from a mapping (tests, notebooks); not validated."""
    return build_dataclass(RecipeConfig, data)
