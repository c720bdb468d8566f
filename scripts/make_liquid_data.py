#!/usr/bin/env python
"""Generate a condensed-phase data set: periodic boxes of a molecular liquid sampled by
tight-binding molecular dynamics, with energies, forces and stress.

Used by the tests and benchmarks (``benchmarks/budget_accuracy.py``): the shared data
sets are all gas-phase, and a model's start on dense matter (every atom with ~40
neighbours) is what a user fitting an MD potential sees first.

How the boxes are made
----------------------
* ``--molecules`` rigid copies of the molecule (ASE's ``molecule()`` geometry) with
  random orientations, their centres drawn one by one in a cubic box sized for the
  liquid's density at room temperature, each kept only if every atom is at least
  ``1.7 Å`` from every atom of the molecules already placed (periodic images
  included);
* 30 steps of FIRE with the tight-binding forces remove the worst contacts;
* Langevin dynamics (ASE, ``--timestep`` fs, ``--temperature`` K, friction 0.02/fs)
  with GFN1-xTB (``--method``; tblite), equilibrated for ``--equilibration`` steps,
  then one structure every ``--stride`` steps, ``--samples`` per trajectory;
* ``--trajectories`` independent trajectories (each from its own packing), seeded
  from ``--seed``.

Every structure stores, in eV and Å (extended XYZ):

========================  ========  =================================================
key                       where     meaning (units)
========================  ========  =================================================
``energy``                info      total tight-binding energy (eV)
``forces``                arrays    ``-dE/dR`` (eV/Å)
``stress``                info      ``(1/V) dE/dε``, 3×3 (eV/Å³)
``trajectory``, ``step``  info      where the structure was sampled
``liquid``, ``method``    info      what was computed
========================  ========  =================================================

The tight-binding forces are checked against finite differences of the energy on a
small box (``--self-check``, also run by ``tests/test_liquid_data.py``).

    python scripts/make_liquid_data.py --liquid methanol -o benchmarks/data/methanol_liquid.xyz
    python scripts/make_liquid_data.py --liquid water -o water_liquid.xyz

Needs ``tblite`` (``pip install tblite``) and ASE.
"""

import argparse
import os
import sys
import time
from typing import Dict, List, Tuple

import numpy as np

#: liquid → (ASE molecule name, density at ~300 K in g/cm³, molar mass in g/mol)
LIQUIDS: Dict[str, Tuple[str, float, float]] = {
    "methanol": ("CH3OH", 0.792, 32.042),
    "water": ("H2O", 0.997, 18.015),
    "ammonia": ("NH3", 0.682, 17.031),
    "acetonitrile": ("CH3CN", 0.786, 41.053),
}

AVOGADRO = 6.02214076e23


def box_length(liquid: str, n_molecules: int) -> float:
    """Side of the cubic box (Å) of ``n_molecules`` at the liquid's density."""
    _, density, molar_mass = LIQUIDS[liquid]
    volume_cm3 = n_molecules * molar_mass / (density * AVOGADRO)
    return (volume_cm3 * 1e24) ** (1.0 / 3.0)


def pack_box(
    liquid: str,
    n_molecules: int,
    rng: np.random.Generator,
    min_distance: float = 1.7,
    max_tries: int = 100_000,
):
    """A periodic cubic box of ``n_molecules`` randomly oriented rigid molecules at
    the liquid's density, no two atoms of different molecules closer than
    ``min_distance`` (Å, minimum image).

    :return: ``ase.Atoms`` with ``pbc=True``
    """
    import ase
    from ase.build import molecule

    template = molecule(LIQUIDS[liquid][0])
    template.positions -= template.get_center_of_mass()
    length = box_length(liquid, n_molecules)
    placed: List[np.ndarray] = []
    numbers: List[int] = []
    tries = 0
    while len(placed) < n_molecules:
        tries += 1
        if tries > max_tries:
            raise RuntimeError(
                f"could not pack {n_molecules} {liquid} molecules in a {length:.2f} Å "
                f"box after {max_tries} tries; lower --min-distance"
            )
        rotation = _random_rotation(rng)
        candidate = template.positions @ rotation.T + rng.random(3) * length
        if placed:
            others = np.concatenate(placed)
            delta = candidate[:, None, :] - others[None, :, :]
            delta -= length * np.round(delta / length)
            if np.sqrt((delta**2).sum(-1)).min() < min_distance:
                continue
        placed.append(candidate)
        numbers.extend(template.numbers.tolist())
    atoms = ase.Atoms(
        numbers=numbers,
        positions=np.concatenate(placed),
        cell=np.eye(3) * length,
        pbc=True,
    )
    atoms.wrap()
    return atoms


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def tight_binding(method: str = "GFN1-xTB"):
    """tblite's ASE calculator (energies in eV, forces in eV/Å, stress in eV/Å³)."""
    try:
        from tblite.ase import TBLite
    except ImportError:
        raise SystemExit("this script needs tblite: pip install tblite") from None
    return TBLite(method=method, verbosity=0, max_iterations=300)


def check_forces(method: str = "GFN1-xTB", seed: int = 0, step: float = 1e-3) -> float:
    """Largest difference (eV/Å) between the tight-binding forces of a small
    rattled water box and central finite differences of its energy, for three
    atoms and every direction."""
    rng = np.random.default_rng(seed)
    atoms = pack_box("water", 4, rng)
    atoms.rattle(0.05, seed=seed)
    atoms.calc = tight_binding(method)
    forces = atoms.get_forces()
    worst = 0.0
    for atom in (0, 4, 9):
        for direction in range(3):
            energies = []
            for sign in (1.0, -1.0):
                moved = atoms.copy()
                moved.positions[atom, direction] += sign * step
                moved.calc = tight_binding(method)
                energies.append(moved.get_potential_energy())
            numeric = -(energies[0] - energies[1]) / (2 * step)
            worst = max(worst, abs(numeric - forces[atom, direction]))
    return worst


def sample_trajectory(
    liquid: str,
    n_molecules: int,
    rng: np.random.Generator,
    method: str,
    temperature: float,
    timestep: float,
    equilibration: int,
    stride: int,
    samples: int,
    trajectory: int,
):
    """One Langevin trajectory from a fresh packing: the sampled structures, with
    their energies, forces and stress stored in ``info``/``arrays``."""
    from ase import units
    from ase.md.langevin import Langevin

    try:
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # ASE < 3.28
        from ase.md.velocitydistribution import (
            MaxwellBoltzmannDistribution as thermalize_momenta,
        )
    from ase.optimize import FIRE

    atoms = pack_box(liquid, n_molecules, rng)
    atoms.calc = tight_binding(method)
    FIRE(atoms, logfile=None).run(fmax=1.0, steps=30)
    thermalize_momenta(
        atoms, temperature_K=temperature, rng=np.random.default_rng(rng.integers(2**31))
    )
    dynamics = Langevin(
        atoms,
        timestep * units.fs,
        temperature_K=temperature,
        friction=0.02 / units.fs,
        fixcm=False,
        rng=np.random.default_rng(rng.integers(2**31)),
        logfile=None,
    )
    dynamics.run(equilibration)
    result = []
    for sample in range(samples):
        dynamics.run(stride)
        snapshot = atoms.copy()
        snapshot.wrap()
        snapshot.arrays.pop("momenta", None)
        snapshot.info = {
            "energy": float(atoms.get_potential_energy()),
            "stress": atoms.get_stress(voigt=False).copy(),
            "liquid": liquid,
            "method": method,
            "trajectory": trajectory,
            "step": equilibration + (sample + 1) * stride,
        }
        snapshot.arrays["forces"] = atoms.get_forces().copy()
        result.append(snapshot)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--liquid", choices=sorted(LIQUIDS), default="methanol")
    parser.add_argument("--molecules", type=int, default=16)
    parser.add_argument("--trajectories", type=int, default=8)
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--stride", type=int, default=12)
    parser.add_argument("--equilibration", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=400.0)
    parser.add_argument("--timestep", type=float, default=1.0, help="fs")
    parser.add_argument("--method", default="GFN1-xTB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", default=None)
    parser.add_argument(
        "--self-check",
        action="store_true",
        help="only compare forces with finite differences of the energy",
    )
    args = parser.parse_args(argv)
    if args.self_check:
        worst = check_forces(args.method)
        print(f"largest |F - (-dE/dx)|: {worst:.2e} eV/Å")
        return 0 if worst < 1e-3 else 1
    if args.output is None:
        parser.error("-o/--output is required")

    import ase.io

    from symatomic.files import atomic_write

    rng = np.random.default_rng(args.seed)
    structures = []
    start = time.time()
    for trajectory in range(args.trajectories):
        structures.extend(
            sample_trajectory(
                args.liquid,
                args.molecules,
                np.random.default_rng(rng.integers(2**31)),
                args.method,
                args.temperature,
                args.timestep,
                args.equilibration,
                args.stride,
                args.samples,
                trajectory,
            )
        )
        print(
            f"trajectory {trajectory + 1}/{args.trajectories}: "
            f"{len(structures)} structures, {time.time() - start:.0f} s",
            flush=True,
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_write(args.output) as temporary:
        ase.io.write(temporary, structures, format="extxyz")
    energies = np.array([s.info["energy"] / len(s) for s in structures])
    forces = np.concatenate([s.arrays["forces"].reshape(-1) for s in structures])
    print(
        f"wrote {len(structures)} structures of {len(structures[0])} atoms to "
        f"{args.output}: energy per atom spread {energies.std() * 1000:.1f} meV, "
        f"force RMS {np.sqrt((forces**2).mean()):.3f} eV/Å"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
