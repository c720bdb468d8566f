"""Energy conservation of an exported model in NVE molecular dynamics (ASE).

Runs velocity Verlet with ``metatomic_ase.MetatomicCalculator`` from Maxwell-Boltzmann
velocities and prints the drift of the total energy (slope of a linear fit, eV/ps
and meV/ps per atom) and its fluctuation (standard deviation after removing the
drift), next to the fluctuation of the potential energy for scale.

    python benchmarks/nve_drift.py model.pt [--structure file.xyz --index 0]
        [--timestep 0.5] [--steps 2000] [--temperature 300] [--no-relax]

The default structure is the first water trimer of the bundled example. It is first
relaxed with the model (FIRE, largest force below 0.05 eV/Å): the example's
structures are thermal snapshots, and starting MD from one at the model's energy
surface heats a 9-atom cluster to ~1000 K within 25 fs, where a small model trained on
300 structures is far outside its data (water molecules collide, atoms fly off): that
measures extrapolation, not energy conservation.
"""

import argparse
import os

import ase.io
import numpy as np
from ase import units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet
from ase.optimize import FIRE
from metatomic_ase import MetatomicCalculator

from symatomic.cli import example_options_path


def default_structure() -> ase.Atoms:
    path = os.path.join(os.path.dirname(example_options_path()), "water_clusters.xyz")
    for atoms in ase.io.iread(path):
        if len(atoms) == 9:
            return atoms
    raise RuntimeError(f"no water trimer in {path}")


def starting_structure(args: argparse.Namespace, model: str) -> ase.Atoms:
    """The structure of ``--structure``/``--index`` (or the example's first trimer),
    relaxed with the model unless ``--no-relax``."""
    atoms = (
        ase.io.read(args.structure, index=args.index)
        if args.structure
        else default_structure()
    )
    if args.relax:
        relaxed = atoms.copy()
        relaxed.calc = MetatomicCalculator(model)
        FIRE(relaxed, logfile=None).run(fmax=0.05, steps=2000)
        atoms.positions = relaxed.positions
    return atoms


def add_structure_arguments(parser: argparse.ArgumentParser) -> None:
    """``--structure``, ``--index`` and ``--no-relax`` (shared with ipi_nve.py)."""
    parser.add_argument("--structure", help="ASE-readable file (default: example)")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument(
        "--no-relax",
        dest="relax",
        action="store_false",
        help="start from the structure as it is, not relaxed with the model",
    )


def nve_energies(model, atoms, timestep_fs, steps, temperature, seed=0):
    """Total and potential energies (eV) every step, and the times (ps)."""
    atoms = atoms.copy()
    atoms.calc = MetatomicCalculator(model)
    MaxwellBoltzmannDistribution(
        atoms, temperature_K=temperature, rng=np.random.default_rng(seed)
    )
    Stationary(atoms)
    dynamics = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    total, potential = [], []

    def record():
        epot = atoms.get_potential_energy()
        potential.append(epot)
        total.append(epot + atoms.get_kinetic_energy())

    record()
    for _ in range(steps):
        dynamics.run(1)
        record()
    times = np.arange(steps + 1) * timestep_fs / 1000.0
    return times, np.array(total), np.array(potential)


def drift_summary(times, total, potential, n_atoms):
    slope, intercept = np.polyfit(times, total, 1)
    residual = total - (slope * times + intercept)
    return {
        "drift_eV_per_ps": float(slope),
        "drift_meV_per_ps_per_atom": float(1000 * slope / n_atoms),
        "total_std_eV": float(residual.std()),
        "potential_std_eV": float(potential.std()),
        "max_deviation_eV": float(np.abs(total - total[0]).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    add_structure_arguments(parser)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    args = parser.parse_args()

    atoms = starting_structure(args, args.model)
    times, total, potential = nve_energies(
        args.model,
        atoms,
        args.timestep,
        args.steps,
        args.temperature,
    )
    summary = drift_summary(times, total, potential, len(atoms))
    print(
        f"{args.model}: {len(atoms)} atoms, {args.steps} steps of {args.timestep} fs "
        f"({times[-1]:.2f} ps) from {args.temperature:.0f} K"
        + (", relaxed start" if args.relax else "")
    )
    for key, value in summary.items():
        print(f"  {key:28s} {value: .3e}")


if __name__ == "__main__":
    main()
