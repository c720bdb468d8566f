"""A data set where long range matters and the answer is known: periodic boxes of
point charges (two species, +q and -q) with a short-range Born-Mayer repulsion.

Energies and forces are exact to ~1e-10 relative: the Coulomb part by Ewald
summation (torch-pme, with a real-space cutoff and k-space resolution far beyond
what the model uses), the repulsion ``A exp(-r/ρ)`` summed directly.

Usage::

    python benchmarks/point_charges.py point_charges.xyz [--structures 600]
"""

import argparse
import os
import sys
from typing import List

import ase
import ase.io
import numpy as np
import torch

#: charges (e) of the two species: Na-like (+) and Cl-like (-)
CHARGES = {11: 0.6, 17: -0.6}
#: Born-Mayer repulsion A exp(-r / ρ) between every pair (eV, Å)
REPULSION_A = 500.0
REPULSION_RHO = 0.35
#: e² / (4π ε0) in eV Å
COULOMB = 14.399645478425668


def coulomb_energy(
    positions: torch.Tensor, cell: torch.Tensor, charges: torch.Tensor
) -> torch.Tensor:
    """Ewald energy (eV) of point charges (e) in a periodic cell (Å), converged to
    ~1e-10: smearing 1 Å, real-space cutoff 8 Å, k-space wavelength 0.5 Å."""
    import vesin
    from torchpme import CoulombPotential, EwaldCalculator

    calculator = EwaldCalculator(
        CoulombPotential(smearing=1.0), lr_wavelength=0.5, full_neighbor_list=False
    ).to(positions.dtype)
    i, j, shifts = vesin.NeighborList(cutoff=8.0, full_list=False).compute(
        points=positions.detach().numpy(),
        box=cell.detach().numpy(),
        periodic=True,
        quantities="ijS",
    )
    i = torch.tensor(i, dtype=torch.long)
    j = torch.tensor(j, dtype=torch.long)
    shifts = torch.tensor(shifts, dtype=positions.dtype)
    distances = torch.linalg.vector_norm(
        positions[j] - positions[i] + shifts @ cell, dim=1
    )
    potential = calculator(
        charges=charges.reshape(-1, 1),
        cell=cell,
        positions=positions,
        neighbor_indices=torch.stack([i, j], dim=1),
        neighbor_distances=distances,
    )
    return COULOMB * (charges.reshape(-1, 1) * potential).sum()


def repulsion_energy(positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """Σ_pairs A exp(-r/ρ) (eV), pairs within 7 Å (the term is < 1e-6 eV there)."""
    import vesin

    i, j, shifts = vesin.NeighborList(cutoff=7.0, full_list=False).compute(
        points=positions.detach().numpy(),
        box=cell.detach().numpy(),
        periodic=True,
        quantities="ijS",
    )
    vectors = (
        positions[torch.tensor(j, dtype=torch.long)]
        - positions[torch.tensor(i, dtype=torch.long)]
        + torch.tensor(shifts, dtype=positions.dtype) @ cell
    )
    distances = torch.linalg.vector_norm(vectors, dim=1)
    return (REPULSION_A * torch.exp(-distances / REPULSION_RHO)).sum()


def label(atoms: ase.Atoms) -> ase.Atoms:
    """``atoms`` with its exact energy and forces in ``info`` / ``arrays``."""
    positions = torch.tensor(atoms.positions, dtype=torch.float64, requires_grad=True)
    cell = torch.tensor(atoms.cell.array, dtype=torch.float64)
    charges = torch.tensor(
        [CHARGES[int(z)] for z in atoms.numbers], dtype=torch.float64
    )
    energy = coulomb_energy(positions, cell, charges) + repulsion_energy(
        positions, cell
    )
    forces = -torch.autograd.grad(energy, positions)[0]
    labelled = atoms.copy()
    labelled.info = {"energy": float(energy.detach())}
    labelled.arrays["forces"] = forces.numpy()
    return labelled


def random_box(rng: np.random.Generator, n_pairs: int = 16) -> ase.Atoms:
    """``n_pairs`` cations and anions at random in a cubic box (density drawn in
    ±10 % of 0.034 atoms/Å³), no two closer than 2.1 Å."""
    n_atoms = 2 * n_pairs
    length = (n_atoms / (0.034 * rng.uniform(0.9, 1.1))) ** (1 / 3)
    cell = np.eye(3) * length
    positions: List[np.ndarray] = []
    while len(positions) < n_atoms:
        candidate = rng.uniform(0, length, 3)
        if positions:
            delta = np.array(positions) - candidate
            delta -= length * np.round(delta / length)
            if np.linalg.norm(delta, axis=1).min() < 2.1:
                continue
        positions.append(candidate)
    numbers = np.array([11] * n_pairs + [17] * n_pairs)
    rng.shuffle(numbers)
    return ase.Atoms(numbers=numbers, positions=positions, cell=cell, pbc=True)


def point_charge_frames(n_structures: int, seed: int = 0) -> List[ase.Atoms]:
    """``n_structures`` labelled random boxes."""
    rng = np.random.default_rng(seed)
    return [label(random_box(rng)) for _ in range(n_structures)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="extended XYZ file to write")
    parser.add_argument("--structures", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    frames = point_charge_frames(args.structures, args.seed)
    temporary = args.output + ".partial"
    ase.io.write(temporary, frames, format="extxyz")
    os.replace(temporary, args.output)
    print(f"wrote {len(frames)} structures to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
