"""Energy conservation of the default model against plain PET in NVE (ASE).

Two models of the bundled example (its options and sizes, every target), trained the
same way (``--epochs``, default the example's 100): symatomic's default (PET with
invariant edge inputs) and plain PET (``ecse: none``); optionally also PET with ECSE
frames (``--ecse``). Each runs velocity Verlet for 1 ps from 300 K
(Maxwell-Boltzmann, seed 0), at 0.5 and 1 fs, from

* the first water trimer of the example, as it is (a thermal snapshot, not relaxed);
* a periodic box of 64 water molecules at 1 g/cm³ (``systems.water_box(4)``),
  relaxed with the model first. The models know gas-phase clusters only: a run
  stops, and says so, when two atoms come closer than 0.5 Å (both models collapse
  there: the example has no bulk data and nothing that teaches short-range
  repulsion), and the statistics are those of the time before.

Printed: the drift of the total energy (slope of a linear fit, meV/ps per atom),
its fluctuation (standard deviation after removing the drift, meV) and the ratio of
fluctuations to plain PET's (goal: ≤ 1.5), next to the fluctuation of the potential
energy for scale.

    python benchmarks/nve_table.py [--epochs 100] [--models default.pt plain.pt]
        [--time 1.0] [--ecse]
"""

import argparse
import os
import tempfile
from typing import Dict

import numpy as np
import torch
from ase import units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet
from ase.optimize import FIRE
from metatomic_ase import MetatomicCalculator
from nve_drift import default_structure, drift_summary
from smoothness import VARIANTS
from systems import water_box

from symatomic.cli import example_options_path
from symatomic.options import load_options
from symatomic.train import Trainer

#: a run stops when two atoms come closer than this (Å): the model is then far
#: outside its training data (nothing below ~0.9 Å in the example), and what is
#: measured is no longer energy conservation
COLLAPSE_DISTANCE = 0.5


def train(name: str, epochs: int, folder: str) -> str:
    options = load_options(example_options_path())
    model = {
        k: v
        for k, v in options["architecture"]["model"].items()
        if k not in ("ecse", "edge_inputs")
    }
    model.update(VARIANTS[name])
    options["architecture"]["model"] = model
    options["architecture"]["training"]["num_epochs"] = epochs
    run = os.path.join(folder, name.replace(" ", "-"))
    path = os.path.join(run, "model.pt")
    if os.path.exists(path):
        return path
    result = Trainer(options, run, progress=False, parity_plots=False).run()
    return result.exported_model


def nve_run(model: str, atoms, timestep: float, steps: int, relax: bool):
    """Velocity Verlet from 300 K; stops early if atoms collapse. Returns the times
    (ps), total and potential energies (eV) and the time of a collapse (or None)."""
    atoms = atoms.copy()
    atoms.calc = MetatomicCalculator(model)
    if relax:
        FIRE(atoms, logfile=None).run(fmax=0.05, steps=1000)
    MaxwellBoltzmannDistribution(
        atoms, temperature_K=300.0, rng=np.random.default_rng(0)
    )
    Stationary(atoms)
    dynamics = VelocityVerlet(atoms, timestep=timestep * units.fs)
    total, potential = [], []
    collapse = None
    for step in range(steps + 1):
        if step > 0:
            dynamics.run(1)
        epot = atoms.get_potential_energy()
        potential.append(epot)
        total.append(epot + atoms.get_kinetic_energy())
        distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
        np.fill_diagonal(distances, np.inf)
        if distances.min() < COLLAPSE_DISTANCE:
            collapse = step * timestep / 1000.0
            break
    times = np.arange(len(total)) * timestep / 1000.0
    return times, np.array(total), np.array(potential), collapse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--models", nargs=2, metavar=("DEFAULT", "PLAIN"))
    parser.add_argument("--ecse", action="store_true", help="also PET + ECSE frames")
    parser.add_argument("--time", type=float, default=1.0, help="ps per run")
    parser.add_argument("--timesteps", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = args.workdir or tempfile.mkdtemp(prefix="nve-")
    if args.models:
        models: Dict[str, str] = dict(zip(["default", "plain PET"], args.models))
    else:
        names = ["default", "plain PET"] + (["ECSE local"] if args.ecse else [])
        models = {name: train(name, args.epochs, folder) for name in names}

    # (structure, relaxed with the model first)
    systems = {
        "water trimer (unrelaxed)": (default_structure(), False),
        "64 waters, periodic, relaxed with the model": (water_box(4), True),
    }
    print(
        f"NVE, {args.time} ps from 300 K; drift in meV/ps/atom, fluctuations of "
        "the total (and potential) energy in meV"
    )
    for label, (atoms, relax) in systems.items():
        for timestep in args.timesteps:
            steps = int(round(1000 * args.time / timestep))
            rows = {}
            for name, model in models.items():
                times, total, potential, collapse = nve_run(
                    model, atoms, timestep, steps, relax
                )
                rows[name] = drift_summary(times, total, potential, len(atoms))
                rows[name]["collapse"] = collapse
            reference = rows["plain PET"]["total_std_eV"]
            print(f"\n{label}, {len(atoms)} atoms, {timestep} fs, {steps} steps")
            for name, row in rows.items():
                print(
                    f"  {name:12s} drift {row['drift_meV_per_ps_per_atom']:+9.3f}  "
                    f"fluctuation {1000 * row['total_std_eV']:9.3f} "
                    f"(potential {1000 * row['potential_std_eV']:8.1f})  "
                    f"max |E - E0| {1000 * row['max_deviation_eV']:9.2f}  "
                    f"ratio {row['total_std_eV'] / reference:5.2f}"
                    + (
                        f"  (atoms closer than {COLLAPSE_DISTANCE} Å after "
                        f"{1000 * row['collapse']:.0f} fs: stopped there)"
                        if row["collapse"] is not None
                        else ""
                    )
                )
    print(f"\nmodels in {folder}")


if __name__ == "__main__":
    main()
