"""The ``architecture.model`` options: validation, defaults and the ``auto`` choices.

Everything here works on plain dictionaries (no torch modules): the options reader
checks a file with :func:`check_model_hypers` before any data is read, and
:class:`symatomic.model.SymatomicModel` resolves the ``auto`` choices for its targets
with :func:`resolve_model_hypers`.
"""

from typing import Any, Dict

from .data.targets import TargetSpec
from .ecse import check_ecse_options
from .long_range import check_long_range_options
from .pet import PET_DEFAULT_HYPERS, check_pet_hypers

__all__ = [
    "AUTO_CANDIDATES",
    "MODEL_OPTIONS",
    "auto_candidates",
    "SOAP_DEFAULT_HYPERS",
    "check_model_hypers",
    "is_exactly_equivariant",
    "DENSE_NEIGHBORS",
    "backbone_for_data",
    "resolve_model_hypers",
    "tensor_heads_of",
]

#: defaults of ``architecture.model.soap`` (the invariant SOAP backbone)
SOAP_DEFAULT_HYPERS: Dict[str, Any] = {
    "max_radial": 6,
    "max_angular": 4,
    "n_pseudo_species": 4,
    "d_hidden": 128,
    "n_hidden_layers": 2,
    "d_out": 128,
    "d_pair": 32,
}

_BACKBONES = ("auto", "pet", "soap")
_TENSOR_HEADS = ("direct", "basis")
_EDGE_INPUTS = ("auto", "invariant", "cartesian")


def _check_soap_hypers(options: Any, where: str) -> Dict[str, Any]:
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ValueError(f"{where} must be a mapping, got {options!r}")
    unknown = sorted(set(options) - set(SOAP_DEFAULT_HYPERS))
    if unknown:
        raise ValueError(
            f"{where}: unknown option(s) {unknown}; known: {sorted(SOAP_DEFAULT_HYPERS)}"
        )
    result = dict(SOAP_DEFAULT_HYPERS)
    result.update(options)
    for key, value in result.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}.{key} must be an integer, got {value!r}")
        minimum = 0 if key in ("max_angular", "max_radial") else 1
        if value < minimum:
            raise ValueError(f"{where}.{key} must be at least {minimum}, got {value}")
    return result


#: every key of ``architecture.model``: PET's options and the model's own
MODEL_OPTIONS = tuple(PET_DEFAULT_HYPERS) + (
    "ecse",
    "backbone",
    "soap",
    "tensor_heads",
    "basis_hidden",
    "long_range",
)


def check_model_hypers(
    hypers: Dict[str, Any], where: str = "architecture.model"
) -> Dict[str, Any]:
    """Validate the ``architecture.model`` section and fill its defaults.

    ``backbone`` is ``pet`` (default) or ``soap`` (an exactly invariant SOAP power
    spectrum with an MLP, options in ``soap``); ``tensor_heads`` is ``direct``
    (components predicted by the backbone's heads: exact with ECSE, approximate
    without) or ``basis`` (invariant coefficients times a basis of (λ, σ) tensors,
    :mod:`symatomic.basis`); ``basis_hidden`` is the hidden size of the basis' pair
    MLPs; ``long_range`` adds learned charges and their Coulomb potential
    (:func:`symatomic.long_range.check_long_range_options`); ``ecse`` selects the exact symmetrization of PET
    (:func:`symatomic.ecse.check_ecse_options`). Everything else are PET
    hyper-parameters (``cutoff`` and ``cutoff_width`` are shared with SOAP).
    """
    if not isinstance(hypers, dict):
        raise ValueError(f"{where} must be a mapping, got {hypers!r}")
    unknown = sorted(set(hypers) - set(MODEL_OPTIONS))
    if unknown:
        raise ValueError(
            f"{where}: unknown option(s) {unknown}; accepted options are "
            f"{sorted(MODEL_OPTIONS)}"
        )
    hypers = dict(hypers)
    ecse = check_ecse_options(hypers.pop("ecse", None), where + ".ecse")
    backbone = hypers.pop("backbone", "auto")
    if backbone not in _BACKBONES:
        raise ValueError(
            f"{where}.backbone must be one of {_BACKBONES}, got {backbone!r}"
        )
    soap = _check_soap_hypers(hypers.pop("soap", None), where + ".soap")
    tensor_heads = hypers.pop("tensor_heads", None)
    if tensor_heads is not None and tensor_heads not in _TENSOR_HEADS:
        raise ValueError(
            f"{where}.tensor_heads must be one of {_TENSOR_HEADS} (or null: what the "
            f"backbone can do), got {tensor_heads!r}"
        )
    if backbone == "soap" and tensor_heads == "direct":
        raise ValueError(
            f"{where}: the soap backbone is invariant, its tensor outputs need "
            "tensor_heads: basis"
        )
    if backbone == "soap" and ecse["mode"] == "local":
        raise ValueError(
            f"{where}: ecse applies to the pet backbone; the soap backbone is exactly "
            "invariant already"
        )
    edge_inputs = hypers.pop("edge_inputs", "auto")
    if edge_inputs not in _EDGE_INPUTS:
        raise ValueError(
            f"{where}.edge_inputs must be one of {_EDGE_INPUTS}, got {edge_inputs!r}"
        )
    if edge_inputs == "invariant" and ecse["mode"] == "local":
        raise ValueError(
            f"{where}: ecse frames need edge_inputs: cartesian (with edge_inputs: "
            "invariant, PET is exactly invariant without frames)"
        )
    if edge_inputs == "invariant" and tensor_heads == "direct":
        raise ValueError(
            f"{where}: with edge_inputs: invariant, tensor outputs need "
            "tensor_heads: basis (direct heads of an invariant PET are invariant)"
        )
    basis_hidden = hypers.pop("basis_hidden", 0)
    if isinstance(basis_hidden, bool) or not isinstance(basis_hidden, int):
        raise ValueError(
            f"{where}.basis_hidden must be an integer, got {basis_hidden!r}"
        )
    if basis_hidden < 0:
        raise ValueError(f"{where}.basis_hidden must be >= 0, got {basis_hidden}")
    long_range = check_long_range_options(
        hypers.pop("long_range", None), where + ".long_range"
    )
    result = check_pet_hypers(hypers, where)
    result["long_range"] = long_range
    result["edge_inputs"] = edge_inputs
    result["ecse"] = ecse
    result["backbone"] = backbone
    result["soap"] = soap
    result["tensor_heads"] = tensor_heads
    result["basis_hidden"] = basis_hidden
    return result


def tensor_heads_of(hypers: Dict[str, Any]) -> str:
    """The tensor heads of a model: ``tensor_heads``, or ``basis`` when it is
    ``None`` (the default: measured more accurate than ``direct`` on the dipoles and
    hyperpolarizabilities of the reference data, and cheaper; see
    ``benchmarks/tensor_accuracy.py`` and ``benchmarks/tensor_heads_cost.py``)."""
    choice = hypers.get("tensor_heads")
    if choice is None:
        return "basis"
    return str(choice)


#: options that only PET uses (the SOAP backbone shares the cutoff and the heads)
_PET_ONLY_OPTIONS = set(PET_DEFAULT_HYPERS) - {"cutoff", "cutoff_width", "d_head"}

#: below this many training structures, without an energy target, the SOAP
#: backbone is the more accurate at a few minutes of training (``docs/heads.rst``)
SMALL_TRAINING_SET = 200

#: from this many neighbors per atom (the cutoff-weighted count of the training
#: set, :func:`symatomic.statistics.average_neighbors`: gas-phase molecules and
#: clusters 2-8, liquids ~40 at a 4.5 Å cutoff) the SOAP backbone is taken
DENSE_NEIGHBORS = 20.0


def backbone_for_data(
    hypers: Dict[str, Any],
    targets: Dict[str, TargetSpec],
    n_train: int,
    neighbors: float = 0.0,
) -> str:
    """What ``backbone: auto`` becomes for this training set (``symatomic train``
    decides with the data; without data, :func:`resolve_model_hypers` takes
    ``pet``).

    Measured at equal wall-clock budgets (``benchmarks/budget_accuracy.py``, 5
    minutes on 2 cores): PET is ahead or level on every set with an energy target
    or with 1000 structures; on ~80 training molecules with tensor targets only
    (QM7-X), SOAP is ahead or level (polarizability 1.2-1.8x better). So:
    ``soap`` when there are fewer than :data:`SMALL_TRAINING_SET` training
    structures, no target is an energy (nor has forces, stress or virial) and the
    options ask for nothing of PET's (its sizes such as ``d_pet``, an ``ecse``
    mode, ``edge_inputs``, direct tensor heads).

    Dense matter: on liquid methanol and liquid water (periodic boxes of 96
    atoms, ~40 neighbors per atom, GFN1-xTB energies and forces), the SOAP backbone
    learned the forces in 5 minutes (5.2x and 5.2x below predicting zero) where
    PET of either size had not started to (one epoch of the default PET on 160
    boxes takes 6 minutes on one core; 100 epochs, the default without a time
    limit, ten hours). So ``soap`` also when the training atoms have on average
    :data:`DENSE_NEIGHBORS` neighbors or more, unless the options ask for PET;
    ``pet`` otherwise.

    :param hypers: the ``architecture.model`` options (given or checked)
    :param targets: the targets of the training set
    :param n_train: number of training structures
    :param neighbors: the training set's average number of neighbors per atom
        (:func:`symatomic.statistics.average_neighbors` at the model's cutoff)
    """
    checked = check_model_hypers(hypers)
    if checked["backbone"] != "auto":
        return str(checked["backbone"])
    asks_for_pet = _asks_for_pet(checked)
    energy_like = any(
        target.quantity == "energy"
        or target.name == "energy"
        or target.forces is not None
        or target.stress is not None
        or target.virial is not None
        for target in targets.values()
    )
    if not asks_for_pet and not energy_like and n_train < SMALL_TRAINING_SET:
        return "soap"
    if not asks_for_pet and neighbors >= DENSE_NEIGHBORS:
        return "soap"
    return "pet"


#: PET sizes of the small candidate of ``backbone: auto`` (the bundled example's,
#: ~0.47 M parameters against ~2.9 M for the default sizes)
SMALL_PET_SIZES: Dict[str, Any] = {
    "d_pet": 64,
    "d_node": 128,
    "d_head": 64,
    "d_feedforward": 128,
    "num_heads": 4,
    "num_attention_layers": 1,
}

#: what ``backbone: auto`` chooses from, with a time limit, by short probes on the
#: user's data (:mod:`symatomic.train.probes`): name → changes to the options
AUTO_CANDIDATES: Dict[str, Dict[str, Any]] = {
    "soap": {"backbone": "soap"},
    "pet-small": dict(SMALL_PET_SIZES, backbone="pet"),
    "pet": {"backbone": "pet"},
}


def auto_candidates(hypers: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The checked options of every candidate of ``backbone: auto`` for these
    options: the :data:`AUTO_CANDIDATES`, each with the user's other options;
    none when the backbone is given or the options ask for something of PET's
    (its sizes, an ``ecse`` mode, ``edge_inputs``, direct tensor heads), which
    makes the choice ``pet``.

    :param hypers: the ``architecture.model`` options (given or checked)
    """
    checked = check_model_hypers(hypers)
    if checked["backbone"] != "auto" or _asks_for_pet(checked):
        return {}
    result = {}
    for name, changes in AUTO_CANDIDATES.items():
        candidate = dict(checked)
        candidate.update(changes)
        result[name] = check_model_hypers(candidate)
    return result


def _asks_for_pet(checked: Dict[str, Any]) -> bool:
    """Whether checked options ask for something only PET has: an option that
    differs from its default (options files reach the trainer with the defaults
    filled in)."""
    defaults = check_model_hypers({})
    return (
        any(checked.get(key) != defaults.get(key) for key in _PET_ONLY_OPTIONS)
        or checked["ecse"]["mode"] != "auto"
        or checked.get("tensor_heads") == "direct"
    )


def resolve_model_hypers(
    hypers: Dict[str, Any], targets: Dict[str, TargetSpec]
) -> Dict[str, Any]:
    """Replace the ``auto`` choices of checked hyper-parameters by what works best
    for these targets (measured: ``benchmarks/tensor_accuracy.py``,
    ``benchmarks/pet_accuracy.py``, ``benchmarks/ecse_accuracy.py``):

    - ``backbone: auto`` → ``pet`` (``symatomic train`` first applies
      :func:`backbone_for_data`, which takes ``soap`` for small training sets
      without energies);
    - ``edge_inputs: auto`` → ``invariant`` (PET exactly invariant without
      frames, tensor outputs through the scalar basis) unless an ``ecse`` mode is
      given, then ``cartesian``;
    - ``ecse.mode: auto`` → ``none`` with invariant inputs and for SOAP; ``local``
      with ``frame_layers: 1`` (unless given) for PET with Cartesian inputs.

    Either way the model is exactly O(3)-equivariant; ``backbone: pet`` with
    ``ecse: none`` is the approximately equivariant model one opts into.
    """
    result = dict(hypers)
    ecse = dict(result["ecse"])
    if result["backbone"] == "auto":
        result["backbone"] = "pet"
    if result.get("edge_inputs", "auto") == "auto":
        # an explicit ecse mode asks for PET's Cartesian inputs (frames, or the
        # unconstrained PET one opts into); otherwise invariant inputs
        result["edge_inputs"] = "invariant" if ecse["mode"] == "auto" else "cartesian"
    if result["backbone"] == "soap":
        result["edge_inputs"] = "cartesian"
    if result["edge_inputs"] == "invariant":
        if ecse["mode"] == "local":
            raise ValueError(
                "ecse frames need edge_inputs: cartesian; with edge_inputs: "
                "invariant PET is exactly invariant without frames"
            )
        ecse["mode"] = "none"
    if ecse["mode"] == "auto":
        if result["backbone"] == "pet":
            ecse["mode"] = "local"
            if ecse["frame_layers"] is None:
                ecse["frame_layers"] = 1
        else:
            ecse["mode"] = "none"
    if result["backbone"] == "soap" and ecse["mode"] == "local":
        raise ValueError(
            "ecse applies to the pet backbone; the soap backbone is exactly "
            "invariant already"
        )
    result["ecse"] = ecse
    result["tensor_heads"] = tensor_heads_of(result)
    return result


def is_exactly_equivariant(hypers: Dict[str, Any]) -> bool:
    """Whether a model with these (checked) hyper-parameters is exactly
    O(3)-equivariant in every output: the SOAP backbone, or PET with ECSE."""
    return (
        hypers["backbone"] == "soap"
        or hypers["ecse"]["mode"] != "none"
        or hypers.get("edge_inputs") == "invariant"
    )
