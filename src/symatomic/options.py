"""The options file of ``symatomic train``: metatrain's layout plus our ``architecture``.

Everything but ``architecture:`` follows metatrain (``training_set``,
``validation_set``, ``test_set``, ``seed``, ``base_precision``, ``device``…), so a
metatrain options file works unchanged once its ``architecture:`` section is replaced.
"""

import copy
import logging
import os
from typing import Any, Dict

import yaml

from .model import check_model_hypers

__all__ = ["load_options", "check_options", "TRAINING_DEFAULT_HYPERS"]

LOGGER = logging.getLogger(__name__)

TRAINING_DEFAULT_HYPERS: Dict[str, Any] = {
    "num_epochs": 100,
    "batch_size": 16,
    "learning_rate": 5e-4,
    "weight_decay": 0.0,
    "warmup_fraction": 0.05,
    "scheduler": "cosine",
    "min_learning_rate_ratio": 0.01,
    "grad_clip_norm": 1.0,
    "augmentation": "auto",
    "loss_weights": {},
    "forces_weight": 1.0,
    "stress_weight": 1.0,
    "checkpoint_interval": 100,
    "log_interval": 1,
    "validation_interval": 1,
    "finetune": {},
}

_TRAINING_TYPES = {
    "num_epochs": int,
    "batch_size": int,
    "learning_rate": float,
    "weight_decay": float,
    "warmup_fraction": float,
    "scheduler": str,
    "min_learning_rate_ratio": float,
    "grad_clip_norm": float,
    "augmentation": (bool, str),
    "loss_weights": dict,
    "forces_weight": float,
    "stress_weight": float,
    "checkpoint_interval": int,
    "log_interval": int,
    "validation_interval": int,
    "finetune": dict,
}

_TOP_LEVEL = {
    "architecture",
    "device",
    "base_precision",
    "seed",
    "training_set",
    "validation_set",
    "test_set",
    "print_stats",
    "final_eval",
    "wandb",
}


def load_options(path: str) -> Dict[str, Any]:
    """Read and validate an options file; relative data paths are resolved against
    the file's folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"options file '{path}' does not exist")
    with open(path) as file:
        try:
            options = yaml.safe_load(file)
        except yaml.YAMLError as error:
            raise ValueError(
                f"options file '{path}' is not valid YAML: {error}"
            ) from None
    if not isinstance(options, dict):
        raise ValueError(f"options file '{path}' must contain a mapping")
    _resolve_paths(options, os.path.dirname(os.path.abspath(path)))
    return check_options(options)


def _resolve_paths(node: Any, base: str) -> None:
    """Make file paths (``read_from``, ``systems``, ``indices``) relative to the
    options file's folder."""
    if isinstance(node, dict):
        for key, value in node.items():
            if (
                key in ("read_from", "systems", "indices")
                and isinstance(value, str)
                and not os.path.isabs(value)
            ):
                node[key] = os.path.normpath(os.path.join(base, value))
            else:
                _resolve_paths(value, base)
    elif isinstance(node, list):
        for value in node:
            _resolve_paths(value, base)


def check_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """Validate the top level and the ``architecture`` section, filling defaults."""
    options = copy.deepcopy(options)
    unknown = set(options) - _TOP_LEVEL
    if unknown:
        raise ValueError(
            f"unknown top-level option(s) {sorted(unknown)}; known options are "
            f"{sorted(_TOP_LEVEL)}"
        )
    if "training_set" not in options:
        raise ValueError("the options file needs a 'training_set' section")
    if options.get("wandb"):
        LOGGER.warning("'wandb' logging is not supported by symatomic; ignoring it")

    architecture = options.get("architecture") or {"name": "pet"}
    if not isinstance(architecture, dict):
        raise ValueError("'architecture' must be a mapping")
    unknown = set(architecture) - {"name", "atomic_types", "model", "training"}
    if unknown:
        raise ValueError(f"architecture: unknown option(s) {sorted(unknown)}")
    name = architecture.get("name", "pet")
    if name not in ("pet", "symatomic.pet"):
        raise ValueError(
            f"architecture.name '{name}' is not a symatomic architecture; use 'pet' "
            "(a metatrain options file needs its architecture section replaced)"
        )
    architecture["name"] = "pet"
    architecture["model"] = check_model_hypers(architecture.get("model") or {})
    architecture["training"] = check_training_hypers(architecture.get("training") or {})
    if "atomic_types" in architecture:
        types = architecture["atomic_types"]
        if not isinstance(types, list) or not all(
            isinstance(t, int) and t > 0 for t in types
        ):
            raise ValueError(
                "architecture.atomic_types must be a list of atomic numbers"
            )
    options["architecture"] = architecture

    precision = options.get("base_precision", 32)
    if precision not in (32, 64):
        raise ValueError(f"base_precision must be 32 or 64, got {precision!r}")
    options["base_precision"] = precision
    device = options.get("device", "cpu")
    if device not in ("cpu", "cuda", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    options["device"] = "cuda" if device == "gpu" else device
    seed = options.get("seed", 0)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    options["seed"] = seed
    options.setdefault("validation_set", 0.1)
    options.setdefault("test_set", 0.0)
    for section in ("validation_set", "test_set"):
        value = options[section]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not 0.0 <= value < 1.0:
                raise ValueError(
                    f"{section} as a fraction must be in [0, 1), got {value}"
                )
    return options


def check_training_hypers(
    hypers: Dict[str, Any], where: str = "architecture.training"
) -> Dict[str, Any]:
    """Validate ``architecture.training`` and fill its defaults."""
    result = copy.deepcopy(TRAINING_DEFAULT_HYPERS)
    for name, value in hypers.items():
        if name not in _TRAINING_TYPES:
            raise ValueError(
                f"{where}: unknown option '{name}'; known options are "
                f"{sorted(_TRAINING_TYPES)}"
            )
        expected = _TRAINING_TYPES[name]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if name == "augmentation":
            if value not in (True, False, "auto"):
                raise ValueError(f"{where}.augmentation must be true, false or 'auto'")
        elif not isinstance(value, expected) or (
            expected is not bool and isinstance(value, bool)
        ):
            raise ValueError(
                f"{where}.{name} must be a {expected.__name__}, got {value!r}"
            )
        result[name] = value
    for name in (
        "num_epochs",
        "batch_size",
        "checkpoint_interval",
        "log_interval",
        "validation_interval",
    ):
        if result[name] < 1:
            raise ValueError(f"{where}.{name} must be positive")
    if result["learning_rate"] <= 0:
        raise ValueError(f"{where}.learning_rate must be positive")
    if result["scheduler"] not in ("cosine", "constant"):
        raise ValueError(f"{where}.scheduler must be 'cosine' or 'constant'")
    if not 0 <= result["warmup_fraction"] < 1:
        raise ValueError(f"{where}.warmup_fraction must be in [0, 1)")
    finetune = result["finetune"]
    unknown = set(finetune) - {"read_from"}
    if unknown:
        raise ValueError(f"{where}.finetune: unknown option(s) {sorted(unknown)}")
    if finetune and not isinstance(finetune.get("read_from"), str):
        raise ValueError(f"{where}.finetune.read_from must be the path of a checkpoint")
    for name, weight in result["loss_weights"].items():
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(
                f"{where}.loss_weights.{name} must be a non-negative number"
            )
    return result
