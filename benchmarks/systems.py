"""Benchmark systems: a rattled 512-atom silicon crystal and a 648-atom water box."""

import ase
import ase.build
import numpy as np


def silicon_512(seed: int = 0) -> ase.Atoms:
    """Diamond silicon, 4x4x4 conventional cells (512 atoms), rattled by 0.05 Å."""
    atoms = ase.build.bulk("Si", "diamond", a=5.43, cubic=True).repeat((4, 4, 4))
    atoms.rattle(0.05, seed=seed)
    return atoms


def water_box(n_side: int = 6, density: float = 1.0, seed: int = 0) -> ase.Atoms:
    """``n_side**3`` water molecules (648 atoms for 6) on a jittered grid with random
    orientations, in a cubic periodic box at ``density`` g/cm³."""
    rng = np.random.default_rng(seed)
    n_molecules = n_side**3
    mass = n_molecules * 18.015 / 6.02214076e23  # g
    length = (mass / density) ** (1 / 3) * 1e8  # Å
    monomer = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.2400, 0.9266, 0.0]])
    positions = []
    spacing = length / n_side
    for index in np.ndindex(n_side, n_side, n_side):
        center = (np.array(index) + 0.5) * spacing + rng.normal(scale=0.1, size=3)
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        w, x, y, z = q
        rotation = np.array(
            [
                [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
            ]
        )
        positions.extend(center + monomer @ rotation.T)
    numbers = [8, 1, 1] * n_molecules
    return ase.Atoms(numbers=numbers, positions=positions, cell=[length] * 3, pbc=True)
