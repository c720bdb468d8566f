"""Energy conservation of an exported model in NVE molecular dynamics in i-PI.

i-PI runs velocity Verlet with the model in-process (``<ffdirect>`` with i-PI's own
metatomic PES). The starting configuration, masses and velocities are those of
``nve_drift.py`` (the same ASE Maxwell-Boltzmann draw, centre of mass at rest), so the
two scripts follow the same trajectory and their numbers can be compared. Prints the
agreement of i-PI's energy and forces with the model's at the start, then the drift
of i-PI's conserved quantity (slope of a linear fit, eV/ps and meV/ps per atom), its
fluctuation and largest deviation, next to the fluctuation of the potential energy.

    python benchmarks/ipi_nve.py model.pt [--structure file.xyz --index 0]
        [--timestep 0.5] [--steps 2000] [--temperature 300] [--seed 0] [--no-relax]

The default structure is the first water trimer of the bundled example, relaxed with
the model as in ``nve_drift.py``, in a
periodic box wider than itself plus the model's cutoff (i-PI needs a cell; its
metatomic PES treats any cell as periodic).
"""

import argparse
import os
import tempfile
import time

import ase
import ase.io
import metatomic.torch as mta
import numpy as np
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ipi.scripting import InteractiveSimulation
from ipi.utils.depend import dstrip
from ipi.utils.softexit import softexit
from ipi.utils.units import unit_to_internal
from nve_drift import add_structure_arguments, drift_summary, starting_structure

import symatomic.io


def write_inputs(atoms: ase.Atoms, folder: str, box: float) -> tuple:
    """Write the model's template (extended XYZ) and i-PI's starting configuration
    (i-PI's XYZ in Å, read with i-PI's own Å), centred in a cubic box; return their
    paths and the centred atoms."""
    centred = ase.Atoms(numbers=atoms.numbers, positions=atoms.positions)
    centred.positions += box / 2 - centred.positions.mean(axis=0)
    centred.positions = np.round(centred.positions, 8)
    centred.cell = np.eye(3) * box
    centred.pbc = True
    template = os.path.join(folder, "template.xyz")
    ase.io.write(template, centred, format="extxyz")
    start = os.path.join(folder, "start.xyz")
    with open(start, "w") as file:
        file.write(f"{len(centred)}\n")
        file.write(
            f"# CELL(abcABC): {box} {box} {box} 90 90 90 cell{{angstrom}} "
            "positions{angstrom}\n"
        )
        for symbol, (x, y, z) in zip(centred.get_chemical_symbols(), centred.positions):
            file.write(f"{symbol} {x:.8f} {y:.8f} {z:.8f}\n")
    return template, start, centred


def ipi_input(
    model: str,
    template: str,
    start: str,
    masses: np.ndarray,
    timestep: float,
    steps: int,
) -> str:
    """i-PI input: NVE, the model in-process, every step's energies to ``nve.out``."""
    masses_text = ", ".join(f"{m:.10f}" for m in masses)
    return f"""
<simulation verbosity='quiet'>
  <ffdirect name='symatomic'>
    <pes>metatomic</pes>
    <parameters>{{template: {template}, model: {model}}}</parameters>
  </ffdirect>
  <output prefix='nve'>
    <properties stride='1' filename='out'>
      [ step, time{{picosecond}}, conserved{{electronvolt}}, potential{{electronvolt}},
        kinetic_md{{electronvolt}} ]
    </properties>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>0</seed></prng>
  <system>
    <initialize nbeads='1'>
      <file mode='xyz' units='angstrom' cell_units='angstrom'>{start}</file>
      <masses mode='manual' units='dalton'>[{masses_text}]</masses>
    </initialize>
    <forces><force forcefield='symatomic'/></forces>
    <motion mode='dynamics'>
      <dynamics mode='nve'>
        <timestep units='femtosecond'>{timestep}</timestep>
      </dynamics>
    </motion>
  </system>
</simulation>
"""


def starting_agreement(simulation, model: str, atoms: ase.Atoms) -> dict:
    """Relative differences of i-PI's energy and forces (atomic units) at the start
    and the model's (eV, eV/Å, converted with i-PI's factors)."""
    system = simulation.syslist[0]
    energy = float(dstrip(system.forces.pot))
    forces = dstrip(system.forces.f).reshape(-1, 3)
    isolated = atoms.copy()
    isolated.pbc = False
    block = symatomic.io.predict(model, isolated, outputs=["energy"])["energy"].block()
    expected_energy = unit_to_internal("energy", "electronvolt", block.values.item())
    gradient = block.gradient("positions").values.reshape(-1, 3).numpy()
    expected_forces = unit_to_internal("force", "ev/ang", -gradient)
    return {
        "start_energy_relative_error": abs(energy - expected_energy)
        / abs(expected_energy),
        "start_forces_relative_error": float(
            np.abs(forces - expected_forces).max() / np.abs(expected_forces).max()
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    add_structure_arguments(parser)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument("--seed", type=int, default=0, help="of the velocities")
    args = parser.parse_args()

    model = os.path.abspath(args.model)
    atoms = starting_structure(args, model)
    cutoff = max(
        options.cutoff
        for options in mta.load_atomistic_model(model).requested_neighbor_lists()
    )
    extent = np.ptp(atoms.positions, axis=0).max()
    box = max(30.0, float(np.ceil(extent + 2 * cutoff + 10.0)))

    # velocities exactly as nve_drift.py draws them
    masses = atoms.get_masses()
    MaxwellBoltzmannDistribution(
        atoms, temperature_K=args.temperature, rng=np.random.default_rng(args.seed)
    )
    Stationary(atoms)
    momenta = atoms.get_momenta()

    with tempfile.TemporaryDirectory() as folder:
        here = os.getcwd()
        os.chdir(folder)  # i-PI writes its outputs (and RESTART) here
        try:
            template, start, centred = write_inputs(atoms, folder, box)
            simulation = InteractiveSimulation(
                ipi_input(model, template, start, masses, args.timestep, args.steps)
            )
            agreement = starting_agreement(simulation, model, centred)
            simulation.syslist[0].beads.p[0] = momenta.flatten() * unit_to_internal(
                "momentum", "ase", 1.0
            )
            begin = time.perf_counter()
            simulation.run(args.steps)
            elapsed = time.perf_counter() - begin
            data = np.loadtxt(os.path.join(folder, "nve.out"))
        finally:
            os.chdir(here)
            softexit.reset()

    times, total, potential = data[:, 1], data[:, 2], data[:, 3]
    summary = dict(agreement)
    summary.update(drift_summary(times, total, potential, len(atoms)))
    print(
        f"{args.model} in i-PI: {len(atoms)} atoms in a {box:.0f} Å box, "
        f"{args.steps} steps of {args.timestep} fs ({times[-1]:.2f} ps) from "
        f"{args.temperature:.0f} K"
        + (", relaxed start" if args.relax else "")
        + f", {1000 * elapsed / args.steps:.1f} ms/step"
    )
    for key, value in summary.items():
        print(f"  {key:28s} {value: .3e}")


if __name__ == "__main__":
    main()
