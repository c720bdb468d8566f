"""Training, validation and test sets from an options file (metatrain's rules)."""

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .readers import read_dataset
from .structures import (
    Structure,
    check_atomic_types,
    check_overlapping_atoms,
    compute_neighbors,
)
from .targets import TargetSpec

__all__ = ["DataSets", "load_data_sets", "load_indices"]

LOGGER = logging.getLogger(__name__)


@dataclass
class DataSets:
    """The three data sets, the targets and where they came from."""

    train: List[Structure]
    validation: List[Structure]
    test: List[Structure]
    targets: Dict[str, TargetSpec]
    length_unit: str
    atomic_types: List[int]
    #: indices in the training file of the structures in each set (None when a set
    #: comes from its own file)
    indices: Dict[str, Optional[List[int]]] = field(default_factory=dict)


def load_indices(spec: Any, where: str) -> List[int]:
    """Indices given as a list or as a text file with one index per line."""
    if isinstance(spec, str):
        if not os.path.exists(spec):
            raise FileNotFoundError(f"{where}.indices: file '{spec}' does not exist")
        with open(spec) as file:
            try:
                return [int(line) for line in file if line.strip()]
            except ValueError as error:
                raise ValueError(f"{where}.indices: '{spec}': {error}") from None
    if not isinstance(spec, list) or not all(isinstance(i, int) for i in spec):
        raise ValueError(f"{where}.indices must be a list of integers or a file path")
    return list(spec)


def _check_indices(indices: Sequence[int], size: int, where: str) -> None:
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise ValueError(
            f"{where}.indices: {bad[:10]} out of range for a data set of {size} structures"
        )
    if len(set(indices)) != len(indices):
        raise ValueError(f"{where}.indices contains duplicates")


def load_data_sets(
    options: Dict[str, Any],
    cutoff: float,
    atomic_types: Optional[Sequence[int]] = None,
    targets: Optional[Dict[str, TargetSpec]] = None,
) -> DataSets:
    """Read and split the data sets of an options file and compute neighbor lists.

    Fractions for ``validation_set`` / ``test_set`` split the training file randomly
    (``numpy.random.default_rng(seed)``; the test set is taken first, then the
    validation set); ``{indices: …}`` selects structures of the training file (they
    are then removed from the training set); a full ``{systems, targets}`` section
    reads another file.

    :param targets: targets of an existing model (when restarting): the training set
        must provide the same ones
    """
    train_options = (
        dict(options["training_set"])
        if isinstance(options["training_set"], dict)
        else options["training_set"]
    )
    if isinstance(train_options, list):
        raise ValueError(
            "training_set: lists of data sets are not supported yet; merge the files"
        )
    explicit_train = None
    if isinstance(train_options, dict) and "indices" in train_options:
        explicit_train = load_indices(train_options.pop("indices"), "training_set")
    all_structures, specs, systems = read_dataset(
        train_options, "training_set", targets
    )
    if not specs:
        raise ValueError("training_set.targets is empty: nothing to learn")
    n_total = len(all_structures)
    rng = np.random.default_rng(options.get("seed", 0))

    if explicit_train is not None:
        _check_indices(explicit_train, n_total, "training_set")
        available = list(explicit_train)
    else:
        available = list(range(n_total))

    sets: Dict[str, List[Structure]] = {}
    indices: Dict[str, Optional[List[int]]] = {}
    excluded: set = set()
    fractions: Dict[str, float] = {}
    for section in ("test_set", "validation_set"):
        value = options.get(section, 0.0)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            fractions[section] = float(value)
        elif isinstance(value, dict) and set(value) == {"indices"}:
            chosen = load_indices(value["indices"], section)
            _check_indices(chosen, n_total, section)
            sets[section] = [all_structures[i] for i in chosen]
            indices[section] = chosen
            excluded.update(chosen)
        elif isinstance(value, (dict, str)):
            other, other_specs, other_systems = read_dataset(value, section, specs)
            missing = sorted(set(specs) - set(other_specs))
            if missing:
                raise ValueError(
                    f"{section}.targets lacks {missing}: validation and test sets need "
                    "every target of the training set"
                )
            if other_systems["length_unit"] != systems["length_unit"]:
                raise ValueError(
                    f"{section}.systems.length_unit ({other_systems['length_unit']}) "
                    f"differs from the training set's ({systems['length_unit']})"
                )
            sets[section] = other
            indices[section] = None
        else:
            raise ValueError(
                f"{section} must be a fraction, {{indices: …}} or a data set section"
            )
    if excluded and explicit_train is None:
        LOGGER.info(
            "%d structures selected by indices for validation/test are excluded from "
            "the training set",
            len(excluded),
        )
    pool = [i for i in available if i not in excluded]
    permutation = [pool[i] for i in rng.permutation(len(pool))]
    for section in ("test_set", "validation_set"):
        if section in fractions:
            count = int(np.floor(fractions[section] * len(pool)))
            if fractions[section] > 0 and count == 0:
                raise ValueError(
                    f"{section}: a fraction of {fractions[section]} of {len(pool)} "
                    "structures is empty"
                )
            chosen = sorted(permutation[:count])
            permutation = permutation[count:]
            sets[section] = [all_structures[i] for i in chosen]
            indices[section] = chosen
    train_indices = sorted(permutation)
    if not train_indices:
        raise ValueError("no structures left in the training set after the splits")
    train = [all_structures[i] for i in train_indices]

    types = sorted({int(t) for s in train for t in s.types.tolist()})
    if atomic_types is not None:
        missing = set(types) - set(atomic_types)
        if missing:
            raise ValueError(
                f"the training set contains atomic types {sorted(missing)} that are not "
                f"in architecture.atomic_types {sorted(atomic_types)}"
            )
        types = sorted(int(t) for t in atomic_types)
    check_atomic_types(sets.get("validation_set", []), types, "validation_set")
    check_atomic_types(sets.get("test_set", []), types, "test_set")

    for structure in train + sets.get("validation_set", []) + sets.get("test_set", []):
        if structure.centers is None or structure.cutoff != cutoff:
            compute_neighbors(structure, cutoff)
    check_overlapping_atoms(
        train + sets.get("validation_set", []) + sets.get("test_set", []),
        systems["length_unit"],
    )

    return DataSets(
        train=train,
        validation=sets.get("validation_set", []),
        test=sets.get("test_set", []),
        targets=specs,
        length_unit=systems["length_unit"],
        atomic_types=types,
        indices={
            "train": train_indices,
            "validation": indices.get("validation_set"),
            "test": indices.get("test_set"),
        },
    )
