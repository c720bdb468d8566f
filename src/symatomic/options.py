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
from .train.budget import parse_duration

__all__ = [
    "ARCHITECTURE_NAMES",
    "TRAINING_DEFAULT_HYPERS",
    "apply_metatrain_loss",
    "check_options",
    "check_training_hypers",
    "load_options",
]

LOGGER = logging.getLogger(__name__)

TRAINING_DEFAULT_HYPERS: Dict[str, Any] = {
    # null: 100 epochs, or as many as fit in time_limit
    "num_epochs": None,
    # null: no limit; "10m", "1.5h", "90s" or seconds
    "time_limit": None,
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
    "uncertainty": True,
    "num_ensemble_members": 16,
}

_TRAINING_TYPES = {
    "num_epochs": (int, type(None)),
    "time_limit": (str, int, float, type(None)),
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
    "uncertainty": bool,
    "num_ensemble_members": int,
    "loss": (str, dict),
}

#: accepted values of ``architecture.name``: ours, and the name under which
#: :func:`symatomic.mtt.register` makes the architecture known to metatrain, so that
#: the same options file works with ``symatomic train`` and ``mtt train``
ARCHITECTURE_NAMES = {"pet", "symatomic.pet", "symatomic", "experimental.symatomic"}

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
    for section in ("training_set", "validation_set", "test_set"):
        value = options.get(section)
        if isinstance(value, list):
            # metatrain's expanded form: a list of data sets; one is the same thing
            if len(value) != 1:
                raise ValueError(
                    f"{section}: lists of {len(value)} data sets are not supported by "
                    "symatomic; merge the files into one"
                )
            options[section] = value[0]
    for flag in ("print_stats", "final_eval"):
        if flag in options and not (
            isinstance(options[flag], bool)
            or (flag == "print_stats" and options[flag] == "auto")
        ):
            raise ValueError(
                f"{flag} must be true or false"
                + (" or 'auto'" if flag == "print_stats" else "")
                + f", got {options[flag]!r}"
            )
    if options.get("wandb") is not None and not isinstance(options["wandb"], dict):
        raise ValueError(f"wandb must be a mapping, got {options['wandb']!r}")
    if options.get("wandb"):
        LOGGER.warning("'wandb' logging is not supported by symatomic; ignoring it")

    architecture = options.get("architecture") or {"name": "pet"}
    if not isinstance(architecture, dict):
        raise ValueError("'architecture' must be a mapping")
    unknown = set(architecture) - {"name", "atomic_types", "model", "training"}
    if unknown:
        raise ValueError(f"architecture: unknown option(s) {sorted(unknown)}")
    name = architecture.get("name", "pet")
    if name not in ARCHITECTURE_NAMES:
        raise ValueError(
            f"architecture.name '{name}' is not a symatomic architecture; use 'pet' "
            f"(or its aliases {sorted(ARCHITECTURE_NAMES - {'pet'})}); a metatrain "
            "options file needs its architecture section replaced"
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
    if precision not in (32, 64) or isinstance(precision, bool):
        raise ValueError(
            f"base_precision must be 32 or 64, got {precision!r} (16 is not "
            "supported by symatomic)"
        )
    options["base_precision"] = precision
    device = options.get("device", "cpu")
    if device not in ("cpu", "cuda", "gpu"):
        raise ValueError(
            f"device must be 'cpu', 'cuda' or 'gpu', got {device!r} (for several "
            "GPUs, run 'torchrun --nproc_per_node=N -m symatomic train' with "
            "device: cuda)"
        )
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
    for section in ("training_set", "validation_set", "test_set"):
        _check_data_section(options[section], section)
    return options


def _check_data_section(section: Any, where: str) -> None:
    """Check the ``systems`` (length unit) and ``targets`` (units, types) of a data
    set section now, before any file is read or any epoch is run; the files
    themselves are checked when they are read."""
    from .data.readers import parse_systems_options
    from .data.targets import parse_target_options

    if not isinstance(section, dict) or "systems" not in section:
        return  # a fraction, {indices: ...} or a path (read and checked later)
    systems = parse_systems_options(section["systems"], where)
    targets = section.get("targets") or {}
    if isinstance(targets, dict):
        for name, target in targets.items():
            parse_target_options(
                str(name), target, systems["read_from"], where=f"{where}.targets"
            )


def check_training_hypers(
    hypers: Dict[str, Any], where: str = "architecture.training"
) -> Dict[str, Any]:
    """Validate ``architecture.training`` and fill its defaults."""
    result = copy.deepcopy(TRAINING_DEFAULT_HYPERS)
    hypers = dict(hypers)
    loss = hypers.pop("loss", None)
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
        elif name == "time_limit":
            parse_duration(value, f"{where}.time_limit")
        elif name == "num_epochs" and value is None:
            pass
        elif not isinstance(value, expected) or (
            expected is not bool and isinstance(value, bool)
        ):
            kinds = expected if isinstance(expected, tuple) else (expected,)
            described = " or ".join(
                "null" if kind is type(None) else kind.__name__ for kind in kinds
            )
            raise ValueError(f"{where}.{name} must be a {described}, got {value!r}")
        result[name] = value
    if result["num_epochs"] is not None and result["num_epochs"] < 0:
        raise ValueError(
            f"{where}.num_epochs must not be negative (0 fits the baselines and "
            "scales only)"
        )
    for name in (
        "batch_size",
        "checkpoint_interval",
        "log_interval",
        "validation_interval",
    ):
        if result[name] < 1:
            raise ValueError(f"{where}.{name} must be positive")
    if result["num_ensemble_members"] < 0:
        raise ValueError(
            f"{where}.num_ensemble_members must not be negative (0: no ensembles)"
        )
    if result["learning_rate"] <= 0:
        raise ValueError(f"{where}.learning_rate must be positive")
    if result["scheduler"] not in ("cosine", "constant"):
        raise ValueError(f"{where}.scheduler must be 'cosine' or 'constant'")
    if not 0 <= result["warmup_fraction"] < 1:
        raise ValueError(f"{where}.warmup_fraction must be in [0, 1)")
    finetune = result["finetune"]
    unknown = set(finetune) - {"read_from"}
    if unknown:
        raise ValueError(
            f"{where}.finetune: unknown option(s) {sorted(unknown)}; symatomic only "
            "supports 'read_from' (full fine-tuning from a checkpoint)"
        )
    if finetune.get("read_from") is None:
        result["finetune"] = {}  # metatrain's spelling of "no fine-tuning"
    elif not isinstance(finetune["read_from"], str):
        raise ValueError(f"{where}.finetune.read_from must be the path of a checkpoint")
    for name, weight in result["loss_weights"].items():
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(
                f"{where}.loss_weights.{name} must be a non-negative number"
            )
    if loss is not None:
        apply_metatrain_loss(result, loss, where + ".loss")
    return result


def apply_metatrain_loss(
    hypers: Dict[str, Any], loss: Any, where: str = "architecture.training.loss"
) -> None:
    """Honour metatrain's ``loss`` section by setting ``loss_weights``,
    ``forces_weight`` and ``stress_weight`` of checked training ``hypers``.

    Our loss is a weighted sum of mean squared errors (normalised per target, see
    the options documentation), so only ``type: mse`` with ``reduction: mean`` is
    accepted. A target's ``weight`` multiplies its ``loss_weights`` entry, and the
    ``weight`` of its ``positions`` (``forces``) and ``strain`` (``stress`` or
    ``virial``) gradients multiply ``forces_weight`` and ``stress_weight``, which are
    shared by all energy targets. Weights multiply, so metatrain's default loss
    (every weight 1) changes nothing.

    :param hypers: checked ``architecture.training`` options, changed in place
    :param loss: ``"mse"`` or a mapping from target names to ``"mse"`` or
        ``{type, weight, reduction, gradients | forces | stress | virial}``
    :param where: location of the section, for error messages
    """
    if isinstance(loss, str):
        _check_loss_type(loss, where)
        return
    if not isinstance(loss, dict):
        raise ValueError(f"{where} must be 'mse' or a mapping of target names")
    gradient_weights: Dict[str, Dict[str, float]] = {"forces": {}, "stress": {}}
    for target, spec in loss.items():
        here = f"{where}.{target}"
        if isinstance(spec, str):
            _check_loss_type(spec, here)
            continue
        if not isinstance(spec, dict):
            raise ValueError(f"{here} must be a loss type or a mapping")
        unknown = set(spec) - {
            "type",
            "weight",
            "reduction",
            "gradients",
            "forces",
            "stress",
            "virial",
        }
        if unknown:
            raise ValueError(f"{here}: unknown option(s) {sorted(unknown)}")
        _check_loss_term(spec, here)
        if "weight" in spec:
            previous = float(hypers["loss_weights"].get(str(target), 1.0))
            hypers["loss_weights"][str(target)] = previous * float(spec["weight"])
        gradients = dict(spec.get("gradients") or {})
        for short, full in (("forces", "positions"), ("stress", "strain")):
            if short in spec:
                gradients[full] = spec[short]
        if "virial" in spec:
            gradients["strain"] = spec["virial"]
        for gradient, term in gradients.items():
            if gradient not in ("positions", "strain"):
                raise ValueError(
                    f"{here}.gradients: unknown gradient '{gradient}' (positions or "
                    "strain)"
                )
            if isinstance(term, str):
                _check_loss_type(term, f"{here}.gradients.{gradient}")
                continue
            if not isinstance(term, dict):
                raise ValueError(f"{here}.gradients.{gradient} must be a mapping")
            _check_loss_term(term, f"{here}.gradients.{gradient}")
            if "weight" in term:
                key = "forces" if gradient == "positions" else "stress"
                gradient_weights[key][str(target)] = float(term["weight"])
    for key, per_target in gradient_weights.items():
        values = set(per_target.values())
        if len(values) > 1:
            raise ValueError(
                f"{where}: different {key} weights per target {per_target} are not "
                f"supported; symatomic has one {key}_weight for all energies"
            )
        if values:
            hypers[f"{key}_weight"] = float(hypers[f"{key}_weight"]) * values.pop()


def _check_loss_type(loss_type: Any, where: str) -> None:
    if loss_type != "mse":
        raise ValueError(
            f"{where}: loss type {loss_type!r} is not supported by symatomic (only "
            "'mse', the normalised mean squared error)"
        )


def _check_loss_term(term: Dict[str, Any], where: str) -> None:
    _check_loss_type(term.get("type", "mse"), where + ".type")
    if term.get("reduction", "mean") != "mean":
        raise ValueError(
            f"{where}.reduction {term['reduction']!r} is not supported (only 'mean')"
        )
    weight = term.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"{where}.weight must be a non-negative number")
    unknown = set(term) - {
        "type",
        "weight",
        "reduction",
        "gradients",
        "forces",
        "stress",
        "virial",
    }
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {sorted(unknown)}")
