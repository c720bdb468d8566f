"""Batches of structures as plain tensors, and random O(3) augmentation."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from metatomic.torch.o3 import random_transformations

from .structures import Structure
from .targets import TargetSpec

__all__ = ["Batch", "collate", "random_o3_augmentation"]


@dataclass
class Batch:
    """Several structures concatenated, with their reference values.

    Shapes use ``N`` atoms, ``S`` structures and ``E`` pairs in the batch.

    :param positions: ``(N, 3)``
    :param types: ``(N,)`` atomic numbers
    :param system_index: ``(N,)`` structure of every atom
    :param cells: ``(S, 3, 3)``, cell vectors as rows
    :param pbc: ``(S, 3)``
    :param centers: ``(E,)`` pairs, sorted by center
    :param neighbors: ``(E,)``
    :param cell_shifts: ``(E, 3)`` integer shifts
    :param reverse: ``(E,)`` index of the reverse pair
    :param n_atoms: ``(S,)`` number of atoms of every structure
    :param targets: name → one tensor per block, samples in order (structures for
        per-structure targets, atoms — of the block's type — for per-atom ones)
    :param forces: energy target name → ``(N, 3)``
    :param stress: energy target name → ``(S, 3, 3)``
    """

    positions: torch.Tensor
    types: torch.Tensor
    system_index: torch.Tensor
    cells: torch.Tensor
    pbc: torch.Tensor
    centers: torch.Tensor
    neighbors: torch.Tensor
    cell_shifts: torch.Tensor
    reverse: torch.Tensor
    n_atoms: torch.Tensor
    targets: Dict[str, List[torch.Tensor]] = field(default_factory=dict)
    forces: Dict[str, torch.Tensor] = field(default_factory=dict)
    stress: Dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device) -> "Batch":
        """A copy of this batch on ``device``."""
        moved = Batch(
            **{
                name: getattr(self, name).to(device)
                for name in (
                    "positions",
                    "types",
                    "system_index",
                    "cells",
                    "pbc",
                    "centers",
                    "neighbors",
                    "cell_shifts",
                    "reverse",
                    "n_atoms",
                )
            }
        )
        moved.targets = {k: [v.to(device) for v in b] for k, b in self.targets.items()}
        moved.forces = {k: v.to(device) for k, v in self.forces.items()}
        moved.stress = {k: v.to(device) for k, v in self.stress.items()}
        return moved

    @property
    def n_systems(self) -> int:
        return int(self.cells.shape[0])

    def sample_systems(self, spec: TargetSpec, block_index: int) -> torch.Tensor:
        """Structure of every sample of one block of a target."""
        if not spec.per_atom:
            return torch.arange(self.n_systems, device=self.positions.device)
        atom_type = spec.blocks[block_index].atom_type
        if atom_type is None:
            return self.system_index
        return self.system_index[self.types == atom_type]


def collate(
    structures: Sequence[Structure],
    dtype: torch.dtype = torch.float64,
    device: Optional[torch.device] = None,
) -> Batch:
    """Concatenate structures (which must have neighbor lists) into a :class:`Batch`
    of ``dtype`` floats on ``device``."""
    positions = []
    types = []
    system_index = []
    centers = []
    neighbors = []
    shifts = []
    reverse = []
    offset = 0
    pair_offset = 0
    for index, structure in enumerate(structures):
        if structure.centers is None:
            raise ValueError(f"structure {structure.source} has no neighbor list")
        n = len(structure)
        positions.append(structure.positions)
        types.append(structure.types)
        system_index.append(torch.full((n,), index, dtype=torch.long))
        centers.append(structure.centers + offset)
        neighbors.append(structure.neighbors + offset)
        shifts.append(structure.cell_shifts)
        reverse.append(structure.reverse + pair_offset)
        offset += n
        pair_offset += structure.centers.shape[0]

    batch = Batch(
        positions=torch.cat(positions).to(dtype),
        types=torch.cat(types),
        system_index=torch.cat(system_index),
        cells=torch.stack([s.cell for s in structures]).to(dtype),
        pbc=torch.stack([s.pbc for s in structures]),
        centers=torch.cat(centers),
        neighbors=torch.cat(neighbors),
        cell_shifts=torch.cat(shifts),
        reverse=torch.cat(reverse),
        n_atoms=torch.tensor([len(s) for s in structures], dtype=torch.long),
    )
    first = structures[0]
    for name in first.targets:
        n_blocks = len(first.targets[name])
        batch.targets[name] = [
            torch.cat([s.targets[name][b] for s in structures]).to(dtype)
            for b in range(n_blocks)
        ]
    for name in first.forces:
        batch.forces[name] = torch.cat([s.forces[name] for s in structures]).to(dtype)
    for name in first.stress:
        batch.stress[name] = torch.stack([s.stress[name] for s in structures]).to(dtype)
    if device is not None and device.type != "cpu":
        batch = batch.to(device)
    return batch


def random_o3_augmentation(
    batch: Batch,
    specs: Dict[str, TargetSpec],
    generator: Optional[torch.Generator] = None,
    matrices: Optional[torch.Tensor] = None,
) -> Batch:
    """Apply an independent uniformly random O(3) operation to every structure.

    Positions, cells, forces and stresses rotate as Cartesian tensors; a target block
    ``(λ, σ)`` rotates with the Wigner-D matrix of the proper part of the operation
    and picks up ``σ (-1)^λ`` under improper ones. Wigner-D matrices are those of
    :func:`metatomic.torch.o3.random_transformations`.

    :param matrices: optional ``(S, 3, 3)`` operations to use instead of random ones
    """
    max_lambda = max(
        [b.o3_lambda for spec in specs.values() for b in spec.blocks] + [0]
    )
    dtype = batch.positions.dtype
    if matrices is None:
        transformations = random_transformations(
            batch.n_systems,
            max_lambda,
            device=torch.device("cpu"),
            dtype=torch.float64,
            add_inversions=True,
            generator=generator,
        )
    else:
        from metatomic.torch.o3 import O3Transformations

        transformations = O3Transformations(matrices.to(torch.float64), max_lambda)
    device = batch.positions.device
    rotations = transformations.matrices.to(dtype=dtype, device=device)
    improper = transformations.improper_mask.to(device)

    atom_rotations = rotations.index_select(0, batch.system_index)
    positions = torch.bmm(batch.positions.unsqueeze(1), atom_rotations.transpose(1, 2))
    cells = torch.bmm(batch.cells, rotations.transpose(1, 2))
    result = Batch(
        positions=positions.squeeze(1),
        types=batch.types,
        system_index=batch.system_index,
        cells=cells,
        pbc=batch.pbc,
        centers=batch.centers,
        neighbors=batch.neighbors,
        cell_shifts=batch.cell_shifts,
        reverse=batch.reverse,
        n_atoms=batch.n_atoms,
    )
    for name, forces in batch.forces.items():
        result.forces[name] = torch.bmm(
            forces.unsqueeze(1), atom_rotations.transpose(1, 2)
        ).squeeze(1)
    for name, stress in batch.stress.items():
        result.stress[name] = rotations @ stress @ rotations.transpose(1, 2)
    for name, blocks in batch.targets.items():
        spec = specs[name]
        rotated = []
        for block_index, (block, values) in enumerate(zip(spec.blocks, blocks)):
            wigner = transformations.wigner_D_matrices(block.o3_lambda).to(
                dtype=dtype, device=device
            )
            systems = batch.sample_systems(spec, block_index)
            parity = float(block.o3_sigma * (-1) ** block.o3_lambda)
            factor = torch.where(
                improper.index_select(0, systems),
                torch.tensor(parity, dtype=dtype, device=device),
                torch.tensor(1.0, dtype=dtype, device=device),
            )
            new = torch.bmm(wigner.index_select(0, systems), values)
            rotated.append(new * factor.reshape(-1, 1, 1))
        result.targets[name] = rotated
    return result
