"""Reading data sets described in metatrain's layout (``systems:`` + ``targets:``).

Structures are read with ASE; targets from the same or another ASE-readable file
(``atoms.info`` for per-structure values, ``atoms.arrays`` for per-atom values) or from
metatensor ``.mts`` files holding a TensorMap with the target's layout.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import metatensor.torch as mts
import numpy as np
import torch
from metatensor.torch import TensorMap

from .structures import Structure, read_frames, structure_from_atoms
from .targets import TargetSpec, check_layout_matches, parse_target_options

__all__ = [
    "MissingDataError",
    "read_dataset",
    "parse_systems_options",
    "read_targets_into",
]

LOGGER = logging.getLogger(__name__)

#: relative size of the antisymmetric part below which a Cartesian tensor is symmetric
SYMMETRY_TOLERANCE = 1e-6


class MissingDataError(KeyError, ValueError):
    """A value a target needs is missing from a structure (a ``KeyError`` for the
    readers that skip optional data, a ``ValueError`` for everyone else)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def check_length_unit(unit: Any, where: str) -> str:
    """Reject length units metatomic does not know (or that are not lengths) when
    the options are read, not at export after the training."""
    from metatomic.torch import unit_conversion_factor

    if not isinstance(unit, str) or not unit:
        raise ValueError(f"{where}: length_unit must be a unit name, got {unit!r}")
    try:
        unit_conversion_factor(unit, "angstrom")
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else repr(error)
        raise ValueError(
            f"{where}: '{unit}' is not a length unit metatomic knows ({message}); "
            "e.g. angstrom, bohr, nm"
        ) from None
    return unit


def parse_systems_options(options: Any, where: str) -> Dict[str, Any]:
    """Expand a ``systems:`` section (a path or a mapping) to a mapping."""
    if isinstance(options, str):
        options = {"read_from": options}
    if not isinstance(options, dict) or "read_from" not in options:
        raise ValueError(
            f"{where}.systems must be a path or a mapping with 'read_from'"
        )
    unknown = set(options) - {"read_from", "reader", "length_unit"}
    if unknown:
        raise ValueError(f"{where}.systems: unknown option(s) {sorted(unknown)}")
    return {
        "read_from": str(options["read_from"]),
        "reader": options.get("reader"),
        "length_unit": check_length_unit(
            options.get("length_unit") or "angstrom", f"{where}.systems.length_unit"
        ),
    }


def _guess_reader(path: str, reader: Optional[str]) -> str:
    if reader is not None:
        if reader not in ("ase", "metatensor"):
            raise ValueError(f"unknown reader '{reader}' (use 'ase' or 'metatensor')")
        return reader
    return "metatensor" if path.endswith(".mts") else "ase"


def read_dataset(
    section: Any,
    where: str,
    target_specs: Optional[Dict[str, TargetSpec]] = None,
) -> Tuple[List[Structure], Dict[str, TargetSpec], Dict[str, Any]]:
    """Read one data set section (``training_set``, ``validation_set``, …).

    :param section: the section: ``{systems: …, targets: …}`` or a path (shorthand for
        an energy data set, like metatrain)
    :param where: name of the section, for error messages
    :param target_specs: the targets learned by the model (from the training set):
        given for validation/test sets, whose own ``targets`` section must then name the
        same targets
    :return: the structures (with their target values), the target specs and the
        expanded ``systems`` options
    """
    if isinstance(section, str):
        section = {"systems": section, "targets": {"energy": {"key": "energy"}}}
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a mapping with 'systems' and 'targets'")
    unknown = set(section) - {"systems", "targets", "extra_data"}
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {sorted(unknown)}")
    if section.get("extra_data"):
        raise ValueError(f"{where}.extra_data is not supported by symatomic")
    if "systems" not in section:
        raise ValueError(f"{where}: missing 'systems'")
    systems = parse_systems_options(section["systems"], where)

    frames = read_frames(systems["read_from"], systems["reader"])
    structures = [
        structure_from_atoms(atoms, f"{systems['read_from']}[{i}]")
        for i, atoms in enumerate(frames)
    ]

    raw_targets = section.get("targets") or {}
    if not isinstance(raw_targets, dict):
        raise ValueError(f"{where}.targets must be a mapping of target names")
    specs: Dict[str, TargetSpec] = {}
    for name, options in raw_targets.items():
        spec = parse_target_options(
            str(name), options, systems["read_from"], where=f"{where}.targets"
        )
        if target_specs is not None:
            if name not in target_specs:
                raise ValueError(
                    f"{where}.targets: target '{name}' is not one of the targets of the "
                    f"model ({sorted(target_specs)})"
                )
            learned = target_specs[name]
            _check_compatible(spec, learned, where)
            spec.symmetric = learned.symmetric
            spec.blocks = learned.blocks
        specs[str(name)] = spec

    read_targets_into(structures, specs)
    return structures, specs, systems


def _check_compatible(spec: TargetSpec, learned: TargetSpec, where: str) -> None:
    for attribute in ("kind", "sample_kind", "rank", "num_subtargets", "unit"):
        if getattr(spec, attribute) != getattr(learned, attribute):
            raise ValueError(
                f"{where}.targets.{spec.name}: {attribute} is "
                f"{getattr(spec, attribute)!r} here but {getattr(learned, attribute)!r} "
                "in the training set"
            )


def read_targets_into(
    structures: List[Structure], specs: Dict[str, TargetSpec]
) -> None:
    """Read the values of every target in ``specs`` and store them in ``structures``."""
    for spec in specs.values():
        reader = _guess_reader(spec.read_from, spec.reader)
        if reader == "ase":
            _read_ase_target(structures, spec)
        else:
            _read_mts_target(structures, spec)
        if spec.is_energy:
            for gradient in ("forces", "stress", "virial"):
                gradient_spec = getattr(spec, gradient)
                if gradient_spec is None:
                    continue
                try:
                    _read_energy_gradient(structures, spec, gradient)
                except KeyError as error:
                    if gradient in spec.optional_gradients:
                        LOGGER.info(
                            "no %s found for '%s' (%s): training without them",
                            gradient,
                            spec.name,
                            error,
                        )
                        setattr(spec, gradient, None)
                        for structure in structures:
                            if gradient == "forces":
                                structure.forces.pop(spec.name, None)
                            else:
                                structure.stress.pop(spec.name, None)
                    else:
                        raise ValueError(
                            f"target '{spec.name}': {gradient} requested but {error}"
                        ) from None


# ----------------------------------------------------------------------- ASE reader


def _info_or_array(
    atoms: Any, key: str, per_atom: bool, source: str, name: str
) -> np.ndarray:
    container = atoms.arrays if per_atom else atoms.info
    if key not in container:
        where = "atoms.arrays (per-atom)" if per_atom else "atoms.info (per-structure)"
        other = atoms.info if per_atom else atoms.arrays
        hint = ""
        if key in other:
            hint = (
                f"; it is in atoms.{'info' if per_atom else 'arrays'}: "
                f"set sample_kind: {'system' if per_atom else 'atom'}"
            )
        raise MissingDataError(
            f"key '{key}' for target '{name}' not found in {where} of {source}{hint}"
        )
    try:
        values = np.asarray(container[key], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"target '{name}': value of '{key}' in {source} is not numeric: {error}"
        ) from None
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"target '{name}': value of '{key}' in {source} contains NaN/inf"
        )
    return values


def _read_ase_target(structures: List[Structure], spec: TargetSpec) -> None:
    frames = read_frames(spec.read_from, None)
    if len(frames) != len(structures):
        raise ValueError(
            f"target '{spec.name}': '{spec.read_from}' has {len(frames)} structures but "
            f"the systems file has {len(structures)}"
        )
    if spec.kind == "spherical" and len(spec.blocks) != 1:
        raise ValueError(
            f"target '{spec.name}': spherical targets with several irreps can not be "
            "read from ASE files; store them in a metatensor .mts file (reader: "
            "metatensor)"
        )
    per_structure_size = _flat_size(spec)
    raw: List[np.ndarray] = []
    for index, (atoms, structure) in enumerate(zip(frames, structures)):
        source = f"{spec.read_from}[{index}]"
        if len(atoms) != len(structure):
            raise ValueError(
                f"target '{spec.name}': {source} has {len(atoms)} atoms but the "
                f"structure has {len(structure)}"
            )
        values = _info_or_array(atoms, spec.key, spec.per_atom, source, spec.name)
        n_samples = len(structure) if spec.per_atom else 1
        if values.size != n_samples * per_structure_size:
            raise ValueError(
                f"target '{spec.name}': '{spec.key}' in {source} has {values.size} "
                f"numbers, expected {n_samples} x {per_structure_size} "
                f"({_describe_shape(spec)})"
            )
        raw.append(values.reshape(n_samples, -1))
    _store_values(structures, spec, raw)


def _flat_size(spec: TargetSpec) -> int:
    if spec.kind == "cartesian":
        return 3**spec.rank * spec.num_subtargets
    return sum(b.num_components * b.num_properties for b in spec.blocks)


def _describe_shape(spec: TargetSpec) -> str:
    if spec.kind == "cartesian":
        return f"Cartesian rank {spec.rank}: {3**spec.rank} x {spec.num_subtargets} subtargets"
    if spec.kind == "scalar":
        return f"scalar with {spec.num_subtargets} subtargets"
    block = spec.blocks[0]
    return (
        f"o3_lambda={block.o3_lambda}: {block.num_components} x {block.num_properties}"
    )


def _store_values(
    structures: List[Structure], spec: TargetSpec, raw: List[np.ndarray]
) -> None:
    """Convert flat per-structure arrays ``(n_samples, size)`` to block tensors."""
    if spec.kind == "cartesian":
        flat = [
            torch.tensor(r).reshape(r.shape[0], 3**spec.rank, spec.num_subtargets)
            for r in raw
        ]
        # components are stored row-major, subtargets last (metatrain's layout)
        _decide_symmetry(spec, flat)
        decomposition = spec.decomposition()
        for structure, values in zip(structures, flat):
            blocks = decomposition.to_spherical(values)
            structure.targets[spec.name] = [b.contiguous() for b in blocks]
        return
    for structure, values in zip(structures, raw):
        block = spec.blocks[0]
        tensor = torch.tensor(values).reshape(values.shape[0], block.num_components, -1)
        if spec.kind == "scalar":
            tensor = torch.tensor(values).reshape(values.shape[0], 1, -1)
        structure.targets[spec.name] = [tensor]


def _decide_symmetry(spec: TargetSpec, flat: List[torch.Tensor]) -> None:
    if spec.rank == 1:
        return
    stacked = torch.cat(flat, dim=0).reshape(
        [-1] + [3] * spec.rank + [spec.num_subtargets]
    )
    axes = list(range(1, spec.rank + 1))
    permutations = list(itertools.permutations(axes))
    symmetrized = sum(
        stacked.permute([0] + list(p) + [spec.rank + 1]) for p in permutations
    ) / len(permutations)
    norm = float(stacked.norm())
    asymmetry = float((stacked - symmetrized).norm()) / max(norm, 1e-300)
    is_symmetric = asymmetry <= SYMMETRY_TOLERANCE
    if spec.symmetric is None:
        spec.set_cartesian_blocks(is_symmetric)
        LOGGER.info(
            "target '%s': Cartesian rank-%d tensor is %ssymmetric in the data "
            "(relative antisymmetric part %.1e); learning the blocks %s",
            spec.name,
            spec.rank,
            "" if is_symmetric else "not ",
            asymmetry,
            [(b.o3_lambda, b.o3_sigma) for b in spec.blocks],
        )
    elif spec.symmetric and not is_symmetric:
        raise ValueError(
            f"target '{spec.name}' is learned as a fully symmetric tensor but the data in "
            f"'{spec.read_from}' is not symmetric (relative non-symmetric part "
            f"{asymmetry:.1e})"
        )


def _read_energy_gradient(
    structures: List[Structure], spec: TargetSpec, gradient: str
) -> None:
    gradient_spec = getattr(spec, gradient)
    if _guess_reader(gradient_spec.read_from, gradient_spec.reader) != "ase":
        if _guess_reader(spec.read_from, spec.reader) == "metatensor":
            return  # read together with the values from the .mts file
        raise ValueError(
            f"target '{spec.name}': {gradient} must be read with ASE or from the .mts "
            "file of the energies"
        )
    frames = read_frames(gradient_spec.read_from, None)
    if len(frames) != len(structures):
        raise ValueError(
            f"target '{spec.name}': '{gradient_spec.read_from}' has {len(frames)} "
            f"structures, expected {len(structures)}"
        )
    for index, (atoms, structure) in enumerate(zip(frames, structures)):
        source = f"{gradient_spec.read_from}[{index}]"
        if gradient == "forces":
            values = _info_or_array(atoms, gradient_spec.key, True, source, spec.name)
            if values.shape != (len(structure), 3):
                raise ValueError(
                    f"target '{spec.name}': forces '{gradient_spec.key}' in {source} have "
                    f"shape {values.shape}, expected ({len(structure)}, 3)"
                )
            structure.forces[spec.name] = torch.tensor(values)
        else:
            values = _info_or_array(atoms, gradient_spec.key, False, source, spec.name)
            if values.size == 6:
                from ase.stress import voigt_6_to_full_3x3_stress

                values = voigt_6_to_full_3x3_stress(values.reshape(6))
            if values.size != 9:
                raise ValueError(
                    f"target '{spec.name}': {gradient} '{gradient_spec.key}' in {source} "
                    f"has {values.size} numbers, expected 9 (3x3) or 6 (Voigt)"
                )
            values = torch.tensor(values).reshape(3, 3)
            if not bool(torch.all(structure.pbc)):
                raise ValueError(
                    f"target '{spec.name}': {gradient} given for {source}, which is not "
                    "periodic in all directions"
                )
            if gradient == "virial":
                # virial = -volume * stress
                values = -values / float(abs(torch.det(structure.cell)))
            structure.stress[spec.name] = values


# ------------------------------------------------------------------ metatensor reader


def _read_mts_target(structures: List[Structure], spec: TargetSpec) -> None:
    path = spec.read_from
    if not os.path.exists(path):
        raise FileNotFoundError(f"target '{spec.name}': file '{path}' does not exist")
    try:
        tensor = mts.load(path)
    except Exception as error:
        raise ValueError(
            f"target '{spec.name}': failed to load '{path}': {error}"
        ) from error
    tensor = tensor.to(dtype=torch.float64)
    if spec.kind == "cartesian":
        _read_mts_cartesian(structures, spec, tensor, path)
        return
    check_layout_matches(spec, tensor, f"'{path}'")
    n_structures = len(structures)
    per_block: List[List[torch.Tensor]] = []
    for key, block_spec in zip(spec.keys(), spec.blocks):
        block = tensor.block(tensor.keys.position(key))
        values = block.values
        if spec.is_scalar:
            values = values.reshape(values.shape[0], 1, values.shape[-1])
        samples = block.samples.values.to(torch.long)
        per_structure = _split_samples(
            samples, values, n_structures, spec, structures, block_spec, path
        )
        per_block.append(per_structure)
        if spec.is_energy:
            _read_mts_energy_gradients(structures, spec, block, path)
    for index, structure in enumerate(structures):
        structure.targets[spec.name] = [blocks[index] for blocks in per_block]


def _split_samples(
    samples: torch.Tensor,
    values: torch.Tensor,
    n_structures: int,
    spec: TargetSpec,
    structures: List[Structure],
    block_spec: Any,
    path: str,
) -> List[torch.Tensor]:
    systems = samples[:, 0]
    if samples.shape[0] > 0 and (
        int(systems.min()) < 0 or int(systems.max()) >= n_structures
    ):
        raise ValueError(
            f"target '{spec.name}' in '{path}': sample 'system' indices range from "
            f"{int(systems.min())} to {int(systems.max())}, but there are {n_structures} "
            "structures"
        )
    order = torch.argsort(
        systems * (1 << 31) + (samples[:, 1] if samples.shape[1] > 1 else 0)
    )
    samples = samples[order]
    values = values[order]
    counts = torch.bincount(samples[:, 0], minlength=n_structures)
    result = list(torch.split(values, counts.tolist()))
    sample_rows = list(torch.split(samples, counts.tolist()))
    for index, structure in enumerate(structures):
        if spec.per_atom:
            if block_spec.atom_type is not None:
                expected = torch.nonzero(structure.types == block_spec.atom_type)[:, 0]
            else:
                expected = torch.arange(len(structure))
            if not torch.equal(sample_rows[index][:, 1], expected):
                raise ValueError(
                    f"target '{spec.name}' in '{path}': structure {index} has samples for "
                    f"atoms {sample_rows[index][:, 1].tolist()[:20]}, expected "
                    f"{expected.tolist()[:20]}"
                )
        elif int(counts[index]) != 1:
            raise ValueError(
                f"target '{spec.name}' in '{path}': structure {index} has "
                f"{int(counts[index])} samples, expected 1"
            )
        result[index] = result[index].contiguous()
    return result


def _read_mts_cartesian(
    structures: List[Structure], spec: TargetSpec, tensor: TensorMap, path: str
) -> None:
    if len(tensor) != 1:
        raise ValueError(
            f"target '{spec.name}' in '{path}': a Cartesian target must have a single "
            f"block, found {len(tensor)}"
        )
    block = tensor.block(0)
    expected = ["xyz"] if spec.rank == 1 else [f"xyz_{i + 1}" for i in range(spec.rank)]
    names = [c.names[0] for c in block.components]
    if names != expected or any(len(c) != 3 for c in block.components):
        raise ValueError(
            f"target '{spec.name}' in '{path}': components are {names}, expected {expected}"
        )
    values = block.values.reshape(block.values.shape[0], 3**spec.rank, -1)
    if values.shape[-1] != spec.num_subtargets:
        raise ValueError(
            f"target '{spec.name}' in '{path}': {values.shape[-1]} properties, expected "
            f"num_subtargets={spec.num_subtargets}"
        )
    samples = block.samples.values.to(torch.long)
    from .targets import BlockSpec

    dummy = BlockSpec(0, 1, ["n"], [[0]])
    per_structure = _split_samples(
        samples, values, len(structures), spec, structures, dummy, path
    )
    raw = [v.reshape(v.shape[0], -1).numpy() for v in per_structure]
    _store_values(structures, spec, raw)


def _read_mts_energy_gradients(
    structures: List[Structure], spec: TargetSpec, block: Any, path: str
) -> None:
    gradients = {name: gradient for name, gradient in block.gradients()}
    if spec.forces is not None:
        if "positions" not in gradients:
            if "forces" in spec.optional_gradients:
                spec.forces = None
            else:
                raise ValueError(
                    f"target '{spec.name}' in '{path}': no 'positions' gradients"
                )
        else:
            gradient = gradients["positions"]
            rows = gradient.samples.values.to(torch.long)  # sample, system, atom
            parents = block.samples.values.to(torch.long)[rows[:, 0], 0]
            for index, structure in enumerate(structures):
                mask = parents == index
                forces = torch.zeros(len(structure), 3, dtype=torch.float64)
                forces[rows[mask, 2]] = -gradient.values[mask].reshape(-1, 3)
                structure.forces[spec.name] = forces
    if spec.stress is not None or spec.virial is not None:
        if "strain" not in gradients:
            optional = {"stress", "virial"} & set(spec.optional_gradients)
            if optional:
                spec.stress = None
                spec.virial = None
                return
            raise ValueError(f"target '{spec.name}' in '{path}': no 'strain' gradients")
        gradient = gradients["strain"]
        rows = gradient.samples.values.to(torch.long)
        parents = block.samples.values.to(torch.long)[rows[:, 0], 0]
        for row, parent in enumerate(parents.tolist()):
            structure = structures[parent]
            volume = float(abs(torch.det(structure.cell)))
            structure.stress[spec.name] = gradient.values[row].reshape(3, 3) / volume
