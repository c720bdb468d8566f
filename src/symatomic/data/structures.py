"""Atomic structures: reading with ASE, validation and neighbor lists (vesin)."""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import ase
import ase.io
import numpy as np
import torch
import vesin

from ..neighbors import pair_vectors, reverse_pair_index, sort_pairs

__all__ = [
    "OVERLAP_DISTANCE",
    "OverlappingAtomsWarning",
    "Structure",
    "compute_neighbors",
    "read_frames",
    "structure_from_atoms",
    "warn_overlapping_atoms",
]

#: two atoms closer than this (in Å, converted to the data's length unit) are
#: reported as overlapping: no physical structure has them, a model's predictions
#: there are meaningless and its forces can be huge (a duplicated atom, coordinates in
#: the wrong unit)
OVERLAP_DISTANCE = 0.1


class OverlappingAtomsWarning(UserWarning):
    """Two atoms of a structure are closer than :data:`OVERLAP_DISTANCE`."""


LOGGER = logging.getLogger(__name__)


@dataclass
class Structure:
    """One atomic structure with its neighbor list and reference values.

    :param positions: ``(n_atoms, 3)`` float64, in the data set's length unit
    :param types: ``(n_atoms,)`` int32 atomic numbers
    :param cell: ``(3, 3)`` float64, cell vectors as rows; zero rows where not periodic
    :param pbc: ``(3,)`` bool
    :param source: ``"file[index]"``, used in error messages
    :param targets: target name → one tensor per block, ``(n_samples, 2λ+1, p)``
    :param forces: energy target name → ``(n_atoms, 3)`` forces
    :param stress: energy target name → ``(3, 3)`` stress (energy / volume)
    """

    positions: torch.Tensor
    types: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    source: str = ""
    targets: Dict[str, List[torch.Tensor]] = field(default_factory=dict)
    forces: Dict[str, torch.Tensor] = field(default_factory=dict)
    stress: Dict[str, torch.Tensor] = field(default_factory=dict)
    # neighbor list, filled by ``compute_neighbors``
    cutoff: float = 0.0
    centers: Optional[torch.Tensor] = None
    neighbors: Optional[torch.Tensor] = None
    cell_shifts: Optional[torch.Tensor] = None
    reverse: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.types.shape[0])

    def pair_vectors(self) -> torch.Tensor:
        """``(n_pairs, 3)`` vectors ``r_j - r_i + S @ cell`` of the neighbor list."""
        if self.centers is None or self.neighbors is None or self.cell_shifts is None:
            raise ValueError(f"{self.source}: no neighbor list (compute_neighbors)")
        return pair_vectors(
            self.positions,
            self.cell.unsqueeze(0),
            torch.zeros(len(self), dtype=torch.long),
            self.centers,
            self.neighbors,
            self.cell_shifts,
        )


_FRAME_CACHE: Dict[tuple, List[ase.Atoms]] = {}


def read_frames(path: str, reader: Optional[str] = None) -> List[ase.Atoms]:
    """Read every frame of an ASE-readable file (cached by path and modification time).

    Values stored by a single-point calculator (``energy``, ``forces``, ``stress``)
    are also made available under those keys in ``info`` / ``arrays``, like metatrain
    does.
    """
    if reader not in (None, "ase"):
        raise ValueError(
            f"cannot read structures from '{path}' with reader '{reader}': structures "
            "are read with ASE (reader: ase)"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"structure file '{path}' does not exist")
    key = (os.path.abspath(path), os.path.getmtime(path))
    if key not in _FRAME_CACHE:
        try:
            frames = ase.io.read(path, ":")
        except Exception as error:
            raise ValueError(f"failed to read '{path}' with ASE: {error}") from error
        if isinstance(frames, ase.Atoms):
            frames = [frames]
        for atoms in frames:
            _expose_calculator_results(atoms)
        _FRAME_CACHE.clear()  # keep one file in memory at a time
        _FRAME_CACHE[key] = frames
    return _FRAME_CACHE[key]


_PER_ATOM_RESULTS = ("forces", "charges", "magmoms", "energies", "stresses")


def _expose_calculator_results(atoms: ase.Atoms) -> None:
    """Copy results of a single-point calculator (ASE stores ``energy``, ``forces``,
    ``stress``, ``dipole``… of extended XYZ files there) to ``info`` / ``arrays``."""
    calc = atoms.calc
    if calc is None:
        return
    for name, value in getattr(calc, "results", {}).items():
        if name in _PER_ATOM_RESULTS:
            if name not in atoms.arrays:
                atoms.arrays[name] = np.asarray(value)
        elif name not in atoms.info:
            if name == "stress" and np.asarray(value).shape == (6,):
                from ase.stress import voigt_6_to_full_3x3_stress

                value = voigt_6_to_full_3x3_stress(np.asarray(value))
            atoms.info[name] = value


def structure_from_atoms(atoms: ase.Atoms, source: str) -> Structure:
    """Build a validated :class:`Structure` from ASE atoms.

    Directions whose cell vector is zero are made non-periodic (some extended XYZ files
    write an all-zero ``Lattice``, which ASE reads as periodic).
    """
    if len(atoms) == 0:
        raise ValueError(f"structure {source} has no atoms")
    positions = np.asarray(atoms.get_positions(), dtype=np.float64)
    if not np.all(np.isfinite(positions)):
        bad = np.nonzero(~np.all(np.isfinite(positions), axis=1))[0]
        raise ValueError(
            f"structure {source} has non-finite (NaN or infinite) positions for atom(s) "
            f"{bad.tolist()[:10]}"
        )
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    if not np.all(np.isfinite(cell)):
        raise ValueError(f"structure {source} has a non-finite cell")
    pbc = np.asarray(atoms.pbc, dtype=bool).copy()
    zero_vectors = np.linalg.norm(cell, axis=1) == 0.0
    pbc[zero_vectors] = False
    cell[~pbc] = 0.0
    if np.any(pbc):
        periodic = cell[pbc]
        if np.linalg.matrix_rank(periodic) < periodic.shape[0]:
            raise ValueError(f"structure {source} has linearly dependent cell vectors")
    numbers = np.asarray(atoms.numbers)
    if np.any(numbers <= 0):
        raise ValueError(
            f"structure {source} contains atoms with atomic number <= 0 "
            f"({sorted(set(numbers[numbers <= 0].tolist()))})"
        )
    return Structure(
        positions=torch.tensor(positions),
        types=torch.tensor(numbers, dtype=torch.int32),
        cell=torch.tensor(cell),
        pbc=torch.tensor(pbc),
        source=source,
    )


def compute_neighbors(structure: Structure, cutoff: float) -> None:
    """Fill the full neighbor list (pairs closer than ``cutoff``) of ``structure``.

    Pairs are sorted by center then neighbor, and ``reverse`` holds the index of the
    reverse pair of every pair.
    """
    calculator = vesin.NeighborList(cutoff=cutoff, full_list=True)
    pbc = structure.pbc.numpy()
    box = structure.cell.numpy()
    i, j, shifts, distances = calculator.compute(
        points=structure.positions.numpy(),
        box=box,
        periodic=pbc.tolist() if np.any(pbc) else False,
        quantities="ijSd",
        copy=True,
    )
    keep = distances < cutoff
    centers = torch.tensor(i[keep], dtype=torch.long)
    neighbors = torch.tensor(j[keep], dtype=torch.long)
    cell_shifts = torch.tensor(shifts[keep], dtype=torch.long).reshape(-1, 3)
    order = sort_pairs(centers, neighbors, len(structure))
    structure.centers = centers[order]
    structure.neighbors = neighbors[order]
    structure.cell_shifts = cell_shifts[order]
    structure.reverse = reverse_pair_index(
        structure.centers, structure.neighbors, structure.cell_shifts, len(structure)
    )
    structure.cutoff = cutoff


def overlap_threshold(length_unit: str) -> float:
    """:data:`OVERLAP_DISTANCE` (Å) in ``length_unit``."""
    from metatomic.torch import unit_conversion_factor

    try:
        return OVERLAP_DISTANCE * unit_conversion_factor("angstrom", length_unit)
    except Exception:
        return OVERLAP_DISTANCE


def warn_overlapping_atoms(
    source: str,
    first: torch.Tensor,
    second: torch.Tensor,
    distances: torch.Tensor,
    length_unit: str,
) -> bool:
    """Warn (:class:`OverlappingAtomsWarning`) when pairs of a neighbor list are
    closer than :data:`OVERLAP_DISTANCE`; returns whether some are.

    :param source: name of the structure, for the message
    :param first: ``(n_pairs,)`` index of the first atom of each pair
    :param second: ``(n_pairs,)`` index of the second atom
    :param distances: ``(n_pairs,)`` distances, in ``length_unit``
    """
    threshold = overlap_threshold(length_unit)
    close = torch.nonzero(distances.detach() < threshold)[:, 0]
    if close.numel() == 0:
        return False
    pairs = {}
    for index in close.tolist():
        i, j = int(first[index]), int(second[index])
        key = (min(i, j), max(i, j))
        distance = float(distances[index])
        pairs[key] = min(distance, pairs.get(key, math.inf))
    shown = sorted(pairs.items(), key=lambda item: item[1])[:5]
    described = ", ".join(
        f"{i} and {j} ({distance:.3g} {length_unit})" for (i, j), distance in shown
    )
    more = (
        f" and {len(pairs) - len(shown)} more pairs" if len(pairs) > len(shown) else ""
    )
    warnings.warn(
        f"structure {source}: atoms {described}{more} overlap (closer than "
        f"{OVERLAP_DISTANCE} Å): check the structure (duplicated atoms? positions in "
        "another length unit?); predictions for it are meaningless",
        OverlappingAtomsWarning,
        stacklevel=2,
    )
    return True


def check_overlapping_atoms(structures: Sequence[Structure], length_unit: str) -> int:
    """Warn for every structure (with a neighbor list) that has overlapping atoms;
    returns how many have."""
    count = 0
    for structure in structures:
        if structure.centers is None or structure.centers.numel() == 0:
            continue
        distances = torch.linalg.vector_norm(structure.pair_vectors(), dim=1)
        if warn_overlapping_atoms(
            structure.source,
            structure.centers,
            structure.neighbors,
            distances,
            length_unit,
        ):
            count += 1
    return count


def check_atomic_types(
    structures: Sequence[Structure], atomic_types: Sequence[int], what: str
) -> None:
    """Raise a clear error if a structure contains an atomic type the model lacks."""
    known = set(int(t) for t in atomic_types)
    for structure in structures:
        present = set(structure.types.tolist())
        unknown = present - known
        if unknown:
            raise ValueError(
                f"{what}: structure {structure.source} contains atomic type(s) "
                f"{sorted(unknown)} that the model does not know (it was trained for "
                f"types {sorted(known)})"
            )


def finite_or_raise(values: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what} contains NaN or infinite values")


def volume(cell: torch.Tensor, pbc: torch.Tensor) -> float:
    if not bool(torch.all(pbc)):
        return math.inf
    return float(abs(torch.det(cell)))
