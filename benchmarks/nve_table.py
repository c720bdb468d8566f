"""Energy conservation of the default model against plain PET in NVE (ASE).

Two models of the bundled example (its options and sizes, every target), trained the
same way (``--epochs``, default the example's 100): symatomic's default (PET with
invariant edge inputs) and plain PET (``ecse: none``); optionally also PET with ECSE
frames (``--ecse``). Each runs velocity Verlet for 1 ps from 300 K
(Maxwell-Boltzmann, seed 0), at 0.5 and 1 fs, from

* the first water trimer of the example, as it is (a thermal snapshot, not relaxed);
* a periodic box of 64 water molecules at 1 g/cm³ (``systems.water_box(4)``).

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

import torch
from nve_drift import default_structure, drift_summary, nve_energies
from smoothness import VARIANTS
from systems import water_box

from symatomic.cli import example_options_path
from symatomic.options import load_options
from symatomic.train import Trainer


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

    systems = {
        "water trimer (unrelaxed)": default_structure(),
        "64 waters, periodic": water_box(4),
    }
    print(
        f"NVE, {args.time} ps from 300 K; drift in meV/ps/atom, fluctuations of "
        "the total (and potential) energy in meV"
    )
    for label, atoms in systems.items():
        for timestep in args.timesteps:
            steps = int(round(1000 * args.time / timestep))
            rows = {}
            for name, model in models.items():
                times, total, potential = nve_energies(
                    model, atoms, timestep, steps, 300.0
                )
                rows[name] = drift_summary(times, total, potential, len(atoms))
            reference = rows["plain PET"]["total_std_eV"]
            print(f"\n{label}, {len(atoms)} atoms, {timestep} fs, {steps} steps")
            for name, row in rows.items():
                print(
                    f"  {name:12s} drift {row['drift_meV_per_ps_per_atom']:+9.3f}  "
                    f"fluctuation {1000 * row['total_std_eV']:9.3f} "
                    f"(potential {1000 * row['potential_std_eV']:8.1f})  "
                    f"max |E - E0| {1000 * row['max_deviation_eV']:9.2f}  "
                    f"ratio {row['total_std_eV'] / reference:5.2f}"
                )
    print(f"\nmodels in {folder}")


if __name__ == "__main__":
    main()
