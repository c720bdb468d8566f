"""Short range against long range on periodic point charges (benchmarks/point_charges.py).

Trains the default model (exactly invariant PET, the example's sizes) without and
with ``long_range`` on the same boxes of ±0.6 e charges with a Born-Mayer
repulsion (energies and forces exact by Ewald), at equal epochs and at an equal
wall-clock budget, and prints the test errors of energies (per atom) and forces
against the spread of the reference. Then times an energy + forces call of each
model on a large box (calls alternating, medians, 2 threads) and prints the ratio.

Usage::

    python benchmarks/long_range.py [--epochs 40] [--budget 6] [--structures 600]
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from typing import Dict, List

import ase.io
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from point_charges import point_charge_frames, random_box  # noqa: E402
from training import EXAMPLE_SIZES, load, run_training  # noqa: E402

VARIANTS: Dict[str, Dict] = {
    "short-range": dict(EXAMPLE_SIZES),
    # the default: use_ewald auto (Ewald for these 32-atom boxes)
    "long-range": dict(EXAMPLE_SIZES, long_range={"enable": True}),
    "long-range-p3m": dict(
        EXAMPLE_SIZES, long_range={"enable": True, "use_ewald": False}
    ),
    "long-range-ewald": dict(
        EXAMPLE_SIZES, long_range={"enable": True, "use_ewald": True}
    ),
}


def options_for(path: str, variant: str, epochs: int, n_total: int) -> Dict:
    n_validation = n_test = max(10, n_total // 12)
    order = np.random.default_rng(0).permutation(n_total).tolist()
    return {
        "seed": 0,
        "base_precision": 32,
        "architecture": {
            "name": "pet",
            "model": copy.deepcopy(VARIANTS[variant]),
            "training": {
                "num_epochs": epochs,
                "batch_size": 16,
                "learning_rate": 1e-3,
                "forces_weight": 1.0,
            },
        },
        "training_set": {
            "systems": {"read_from": path, "length_unit": "angstrom"},
            "targets": {
                "energy": {"key": "energy", "unit": "eV", "forces": {"key": "forces"}}
            },
        },
        "validation_set": {"indices": order[:n_validation]},
        "test_set": {"indices": order[n_validation : n_validation + n_test]},
    }


def train(options: Dict, folder: str) -> Dict:
    """Train in ``folder`` (2 threads), or read the result a previous run left
    there; adds ``epoch_s``, the median time of an epoch."""
    path = os.path.join(folder, "result.json")
    if os.path.exists(path):
        with open(path) as file:
            result = json.load(file)
        result.setdefault("wall_s", float("nan"))
    else:
        result = run_training(options, folder, 2)
    result["epoch_s"] = float(np.median([h["time"] for h in result["history"]]))
    return result


def errors_line(result: Dict, n_atoms: int) -> str:
    """Test RMSE (MAE) of energies per atom and of forces."""
    errors = result["test_errors"]
    return (
        f"energy {1000 * errors['energy/per_atom']:.2f} "
        f"({1000 * errors['mae:energy/per_atom']:.2f}) meV/atom, forces "
        f"{1000 * errors['energy/forces']:.0f} "
        f"({1000 * errors['mae:energy/forces']:.0f}) meV/Å"
    )


def cost(n_pairs: int, repeats: int, n_structures: int = 1) -> None:
    import torch

    import symatomic.io
    from symatomic.data.targets import parse_target_options
    from symatomic.model import SymatomicModel

    torch.set_num_threads(2)
    rng = np.random.default_rng(1)
    frames = [random_box(rng, n_pairs) for _ in range(n_structures)]
    spec = {"energy": parse_target_options("energy", {"unit": "eV"}, "x")}
    models = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        models[variant] = SymatomicModel(
            copy.deepcopy(VARIANTS[variant]), [11, 17], spec
        ).export()
    times: Dict[str, List[float]] = {name: [] for name in models}
    for _ in range(repeats + 1):
        for name, model in models.items():
            start = time.perf_counter()
            symatomic.io.predict(model, frames, ["energy"], batch_size=n_structures)
            times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(values[1:])) for name, values in times.items()}
    print(
        f"\nenergy + forces, {n_structures} x {2 * n_pairs} atoms, 2 threads, "
        f"median of {repeats} "
        f"alternating calls (load {load()}):"
    )
    for name, value in medians.items():
        print(
            f"  {name:18s} {value:.3f} s   {value / medians['short-range']:.2f}x "
            "short-range"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structures", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--budget", type=float, default=6.0, help="minutes per model (0: skip)"
    )
    parser.add_argument("--variants", nargs="*", default=["short-range", "long-range"])
    parser.add_argument("--cost-atoms", type=int, default=1024)
    parser.add_argument("--cost-only", action="store_true")
    parser.add_argument("--keep", help="folder to keep the runs in")
    args = parser.parse_args()

    if not args.cost_only:
        root = args.keep or tempfile.mkdtemp(prefix="long-range-")
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, "point_charges.xyz")
        if not os.path.exists(path):
            ase.io.write(path, point_charge_frames(args.structures), format="extxyz")
        frames = ase.io.read(path, ":")
        n_atoms = len(frames[0])
        energies = np.array([f.get_potential_energy() for f in frames]) / n_atoms
        forces = np.concatenate([f.get_forces().ravel() for f in frames])
        print(
            f"{len(frames)} boxes of {n_atoms} charges; reference spread: energy "
            f"{1000 * energies.std():.1f} meV/atom, forces "
            f"{1000 * forces.std():.0f} meV/Å (load {load()})"
        )
        seconds = {}
        for variant in args.variants:
            folder = os.path.join(root, f"epochs-{args.epochs}", variant)
            result = train(options_for(path, variant, args.epochs, len(frames)), folder)
            seconds[variant] = result["epoch_s"]
            print(
                f"{args.epochs} epochs, {variant:16s} ({result['epoch_s']:.1f} s per "
                "epoch): " + errors_line(result, n_atoms)
            )
        if args.budget > 0:
            for variant in args.variants:
                epochs = max(1, int(args.budget * 60 / seconds[variant]))
                folder = os.path.join(root, f"budget-{args.budget:g}", variant)
                result = train(options_for(path, variant, epochs, len(frames)), folder)
                print(
                    f"{args.budget:g} min, {variant:16s} ({epochs} epochs, "
                    f"{result['wall_s']:.0f} s): " + errors_line(result, n_atoms)
                )
    cost(args.cost_atoms // 2, 5)
    # a training batch: 16 boxes of 32 charges
    cost(16, 5, 16)


if __name__ == "__main__":
    main()
