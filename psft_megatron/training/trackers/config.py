"""The ``logging.wandb`` and ``logging.mlflow`` sections: experiment trackers beside TensorBoard.

Each is off unless the recipe sets it (``logging.wandb: {project: my-project}``, or on the
command line ``logging.wandb.project=my-project``). The packages are optional extras:
``pip install -e ".[wandb]"`` / ``".[mlflow]"``; a recipe that asks for one that is not
installed is refused before anything is built (:func:`missing_packages`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from psft_megatron.config.load import FieldError, check_choices


@dataclass
class WandbConfig:
    """Weights & Biases: one run per ``logging.run_dir``, continued by every relaunch."""

    project: str = "psft-megatron"
    entity: str | None = None  # None: the W&B account's default entity
    name: str | None = None  # the run's display name; None: the run_dir's folder name
    tags: list[str] = field(default_factory=list)
    # None: WANDB_MODE from the environment, else online. offline writes <run_dir>/wandb/ only
    # (upload later with `wandb sync`); disabled logs nothing.
    mode: Literal["online", "offline", "disabled", "shared"] | None = None

    def __post_init__(self) -> None:
        check_choices(self)

    def validate(self) -> None:
        if not self.project:
            raise FieldError("logging.wandb.project", "must not be empty")


@dataclass
class MlflowConfig:
    """MLflow: one run per ``logging.run_dir``, continued by every relaunch."""

    # None: MLFLOW_TRACKING_URI from the environment, else MLflow's default. A local folder is
    # file:/path/to/mlruns (MLflow 3 keeps file stores behind MLFLOW_ALLOW_FILE_STORE: a file:
    # URI named here is taken as that opt-in); a server is http(s)://host:port.
    tracking_uri: str | None = None
    experiment: str = "psft-megatron"
    run_name: str | None = None  # None: the run_dir's folder name

    def validate(self) -> None:
        if not self.experiment:
            raise FieldError("logging.mlflow.experiment", "must not be empty")


# (recipe field, the module it needs, the extra that installs it)
_PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: the module is None in sys.modules (its import is blocked)
        return False


def missing_packages(wandb: WandbConfig | None, mlflow: MlflowConfig | None) -> list[tuple[str, str, str]]:
    """``(field, module, extra)`` for each tracker the recipe sets whose package is not importable."""
    wanted = {"wandb": wandb, "mlflow": mlflow}
    return [(f"logging.{name}", *_PACKAGES[name]) for name, section in wanted.items()
            if section is not None and not _installed(_PACKAGES[name][0])]
