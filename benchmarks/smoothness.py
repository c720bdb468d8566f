"""Smoothness of trained models on one-atom scans: the largest force change per Å.

Models of the bundled example's energies and forces (its sizes; 8 epochs unless
``--epochs``), all trained the same way, seed 0:

* ``default``: symatomic's default (PET with invariant edge inputs);
* ``plain PET``: ``ecse: none`` (Cartesian inputs, augmentation);
* ``ECSE local``: ``ecse: {mode: local, frame_layers: 1}`` (the default before).

Scans: an atom of the example's first water trimer moved along a random direction,
from -0.8 to +0.8 Å in 1601 steps (1 mÅ), for several atoms and directions (the
first O atom first). For each scan: the largest change of any force component
between consecutive points, divided by the step (eV/Å²), and where it happens.
Printed per scan and as the median and maximum over scans, with the ratio to plain
PET (goal: the exact model within 2x of plain PET).

    python benchmarks/smoothness.py [--epochs 8] [--directions 3] [--atoms 0 1 3]
"""

import argparse
import os
import statistics
import tempfile
from typing import Dict, List, Tuple

import ase
import ase.io
import numpy as np
import torch

import symatomic.io
from symatomic.cli import example_options_path
from symatomic.options import check_options, load_options
from symatomic.train import Trainer

VARIANTS = {
    "default": {},
    "plain PET": {"ecse": "none"},
    "ECSE local": {"ecse": {"mode": "local", "frame_layers": 1}},
}


def example_options(model_changes: dict, epochs: int) -> dict:
    """The bundled example's options, energies and forces only."""
    options = load_options(example_options_path())
    options["training_set"]["targets"] = {
        "energy": options["training_set"]["targets"]["energy"]
    }
    model = {
        k: v
        for k, v in options["architecture"]["model"].items()
        if k not in ("ecse", "edge_inputs")
    }
    model.update(model_changes)
    options["architecture"]["model"] = model
    options["architecture"]["training"]["num_epochs"] = epochs
    return check_options(options)


def first_trimer() -> ase.Atoms:
    folder = os.path.dirname(example_options_path())
    for atoms in ase.io.iread(os.path.join(folder, "water_clusters.xyz")):
        if len(atoms) == 9:
            return atoms
    raise RuntimeError("no trimer in the example data")


def scan(model: str, atoms: ase.Atoms, atom: int, direction: np.ndarray, steps: int):
    """Forces along the scan, ``(steps, n_atoms, 3)``, and the displacements."""
    displacements = np.linspace(-0.8, 0.8, steps)
    frames = []
    for t in displacements:
        moved = atoms.copy()
        moved.positions[atom] += t * direction
        frames.append(moved)
    energy = symatomic.io.predict(model, frames, ["energy"], batch_size=64)["energy"]
    gradient = energy.block().gradient("positions")
    forces = -gradient.values.detach().reshape(steps, len(atoms), 3).numpy()
    return displacements, forces


def largest_slope(displacements, forces) -> Tuple[float, float]:
    step = displacements[1] - displacements[0]
    changes = np.abs(np.diff(forces, axis=0)).reshape(len(displacements) - 1, -1)
    worst = changes.max(axis=1)
    index = int(worst.argmax())
    return float(worst[index] / step), float(displacements[index])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--directions", type=int, default=3)
    parser.add_argument("--atoms", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--steps", type=int, default=1601)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = args.workdir or tempfile.mkdtemp(prefix="smoothness-")
    models: Dict[str, str] = {}
    for name in args.variants:
        run = os.path.join(folder, name.replace(" ", "-"))
        path = os.path.join(run, "model.pt")
        if not os.path.exists(path):
            options = example_options(VARIANTS[name], args.epochs)
            result = Trainer(options, run, progress=False, parity_plots=False).run()
            path = result.exported_model
        models[name] = path

    atoms = first_trimer()
    rng = np.random.default_rng(0)
    paths: List[Tuple[int, np.ndarray]] = []
    for atom in args.atoms:
        for _ in range(args.directions):
            direction = rng.normal(size=3)
            paths.append((atom, direction / np.linalg.norm(direction)))

    slopes: Dict[str, List[float]] = {name: [] for name in models}
    print(
        f"largest force change per Å (eV/Å²) on {len(paths)} scans of ±0.8 Å in "
        f"{args.steps} steps; models trained {args.epochs} epochs"
    )
    print("  atom  direction       " + "".join(f"{n:>24s}" for n in models))
    for atom, direction in paths:
        cells = []
        for name, model in models.items():
            slope, where = largest_slope(
                *scan(model, atoms, atom, direction, args.steps)
            )
            slopes[name].append(slope)
            cells.append(f"{slope:10.3g} at {where:+.3f} Å")
        label = f"{atoms.get_chemical_symbols()[atom]}{atom}"
        text = np.array2string(direction, precision=2, suppress_small=True)
        print(f"  {label:5s} {text:18s}" + "".join(f"{c:>24s}" for c in cells))
    reference = slopes.get("plain PET")
    for name, values in slopes.items():
        line = f"  {name:12s} median {statistics.median(values):9.3g}  max {max(values):9.3g}"
        if reference is not None:
            ratios = [a / b for a, b in zip(values, reference)]
            line += (
                f"  ratio to plain PET: median {statistics.median(ratios):.2f}, "
                f"of maxima {max(values) / max(reference):.2f}"
            )
        print(line)
    print(f"models in {folder}")


if __name__ == "__main__":
    main()
