"""Every output of an exported model in float32: invariance and equivariance under
random O(3) operations and permutations, and the difference to float64.

A model is trained for a few epochs (``symatomic train``, the bundled example's
sizes) on each data set; its checkpoint is exported twice, in float32 and in
float64; ``--structures`` test structures are evaluated in their own orientation
and under ``--operations`` random rotations (half of them improper) with their
atoms permuted. For every output (energies, forces, every (λ, σ) block,
uncertainties, ensembles) the script prints

* ``O(3) f32``: the largest relative change under the operations, in float32
  (invariants compared as they are, blocks after applying the Wigner-D matrix and
  the parity, forces after rotating them);
* ``f32 vs f64``: the largest relative difference of the float32 and float64
  evaluations of the same structures.

Relative changes are per entry (``|a - b| / |a|``) for uncertainties, which are
positive, and relative to the largest entry of the output for everything else.

Data sets:

* ``example``: the bundled water clusters (eV; μ, α, β);
* ``methane_hartree``: ``methane_100.xyz`` of the shared data, energies and forces
  converted to Hartree (small residuals in large total energies);
* ``methanol_hartree``: ``benchmarks/data/methanol_liquid.xyz`` in Hartree (periodic
  boxes of 96 atoms).

    python benchmarks/uncertainty_float32.py [--data-sets ...] [--epochs 4]
        [--structures 10] [--operations 5] [--keep folder]
"""

import argparse
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "data")
HARTREE = 27.211386245988  # eV

DATA_SETS = ["example", "methane_hartree", "methanol_hartree"]


def prepare(name: str, folder: str, data: str) -> str:
    """Write ``options.yaml`` for ``name`` in ``folder``; return its path."""
    import ase.io
    import yaml

    from symatomic.cli import example_options_path

    with open(example_options_path()) as file:
        options = yaml.safe_load(file)
    if name == "example":
        systems = os.path.join(
            os.path.dirname(example_options_path()), "water_clusters.xyz"
        )
        options["training_set"]["systems"]["read_from"] = systems
        return _write(options, folder)
    source = {
        "methane_hartree": os.path.join(data, "methane_100.xyz"),
        "methanol_hartree": os.path.join(HERE, "data", "methanol_liquid.xyz"),
    }[name]
    if not os.path.exists(source):
        raise FileNotFoundError(source)
    frames = ase.io.read(source, ":")
    for atoms in frames:
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        atoms.calc = None
        atoms.info["energy"] = energy / HARTREE
        atoms.arrays["forces"] = forces / HARTREE
    converted = os.path.join(folder, "structures.xyz")
    ase.io.write(converted, frames, format="extxyz")
    options["training_set"] = {
        "systems": {"read_from": converted, "length_unit": "angstrom"},
        "targets": {
            "energy": {"key": "energy", "unit": "Hartree", "forces": {"key": "forces"}}
        },
    }
    return _write(options, folder)


def _write(options: Dict, folder: str) -> str:
    import yaml

    path = os.path.join(folder, "options.yaml")
    with open(path, "w") as file:
        yaml.safe_dump(options, file)
    return path


def test_structures(folder: str, options: str, n: int) -> List:
    """The first ``n`` structures of the run's test split."""
    import ase.io
    import yaml

    from symatomic.train.checkpoint import load_checkpoint

    with open(options) as file:
        systems = yaml.safe_load(file)["training_set"]["systems"]["read_from"]
    checkpoint = load_checkpoint(os.path.join(folder, "run", "model.ckpt"))
    indices = checkpoint["split_indices"]["test"][:n]
    frames = ase.io.read(systems, ":")
    chosen = [frames[i] for i in indices]
    for atoms in chosen:
        if not np.any(atoms.cell.array):
            atoms.pbc = False
    return chosen


def exported(checkpoint: str, dtype) -> object:
    from symatomic.train.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(checkpoint)
    model.to(dtype)
    return model.export()


def evaluate(model, atoms) -> Dict[str, Tuple[np.ndarray, bool, int, int]]:
    """Output name → (values, is uncertainty, o3_lambda or -1, o3_sigma): every
    output of the model, energy forces as ``forces``."""
    import symatomic.io

    names = [n for n in model.capabilities().outputs if not n.endswith("features")]
    names = [n for n in names if n != "feature"]
    results = symatomic.io.predict(model, [atoms], outputs=names, stress=False)
    values: Dict[str, Tuple[np.ndarray, bool, int, int]] = {}
    for name, tensor in results.items():
        for key, block in tensor.items():
            label = name
            o3_lambda, o3_sigma = -1, 1
            if "o3_lambda" in key.names:
                o3_lambda = int(key["o3_lambda"])
                o3_sigma = int(key["o3_sigma"])
                label += f" λ={o3_lambda}"
            if len(block.components) == 0:
                o3_lambda = -1  # invariant values (uncertainties of a block)
            array = block.values.detach().numpy()
            if "atom" in block.samples.names:
                array = array[np.argsort(block.samples.column("atom").numpy())]
            values[label] = (array, "uncertainty" in name, o3_lambda, o3_sigma)
            if "positions" in block.gradients_list():
                gradient = block.gradient("positions")
                forces = -gradient.values.detach().numpy().reshape(-1, 3)
                atoms_index = gradient.samples.column("atom").numpy()
                values[name + " forces"] = (
                    forces[np.argsort(atoms_index)],
                    False,
                    -2,
                    1,
                )
    return values


def compare(a: np.ndarray, b: np.ndarray, per_entry: bool) -> float:
    if per_entry:
        return float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-300)))
    scale = max(float(np.abs(a).max()), float(np.abs(b).max()), 1e-300)
    return float(np.abs(a - b).max() / scale)


def transformed(reference, rotation: np.ndarray, wigner, permutation, improper):
    """What ``reference`` becomes under the operation."""
    values, _, o3_lambda, o3_sigma = reference
    if o3_lambda == -2:  # forces
        return values[permutation] @ rotation.T
    if o3_lambda < 0:
        return values if values.shape[0] == 1 else values[permutation]
    parity = o3_sigma * (-1) ** o3_lambda if improper else 1
    rotated = np.einsum("mk,nk...->nm...", wigner[o3_lambda], values) * parity
    return rotated if rotated.shape[0] == 1 else rotated[permutation]


def measure(checkpoint: str, frames: List, n_operations: int, seed: int) -> Dict:
    import torch
    from metatomic.torch.o3 import random_transformations

    model32 = exported(checkpoint, torch.float32)
    model64 = exported(checkpoint, torch.float64)
    rng = np.random.default_rng(seed)
    changes: Dict[str, List[float]] = {}
    differences: Dict[str, List[float]] = {}
    for atoms in frames:
        original = evaluate(model32, atoms)
        double = evaluate(model64, atoms)
        for label, value in original.items():
            differences.setdefault(label, []).append(
                compare(double[label][0], value[0], value[1])
            )
        for _ in range(n_operations):
            generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
            transformation = random_transformations(
                1,
                4,
                device=torch.device("cpu"),
                dtype=torch.float64,
                generator=generator,
            )
            proper = transformation.matrices[0].numpy()
            wigner = [
                transformation.wigner_D_matrices(lam)[0].numpy() for lam in range(5)
            ]
            improper = bool(rng.integers(2))
            rotation = -proper if improper else proper
            permutation = rng.permutation(len(atoms))
            moved = atoms.copy()
            moved.positions = atoms.positions @ rotation.T
            if atoms.pbc.any():
                moved.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
            moved = moved[permutation]
            result = evaluate(model32, moved)
            for label, value in original.items():
                expected = transformed(value, rotation, wigner, permutation, improper)
                changes.setdefault(label, []).append(
                    compare(expected, result[label][0], value[1])
                )
    return {label: (max(changes[label]), max(differences[label])) for label in changes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=SHARED)
    parser.add_argument("--data-sets", nargs="+", default=DATA_SETS, choices=DATA_SETS)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--structures", type=int, default=10)
    parser.add_argument("--operations", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None)
    args = parser.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="uq-float32-")
    with open("/proc/loadavg") as file:
        print(f"runs in {root}; load average: {' '.join(file.read().split()[:3])}")
    for name in args.data_sets:
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        checkpoint = os.path.join(folder, "run", "model.ckpt")
        try:
            options = prepare(name, folder, args.data)
        except FileNotFoundError as error:
            print(f"{name}: data not found ({error}), skipped")
            continue
        if not os.path.exists(checkpoint):
            command = [sys.executable, "-m", "symatomic", "train", options, "-o"]
            command += ["run", "--epochs", str(args.epochs), "--no-progress"]
            with open(os.path.join(folder, "train.log"), "w") as log:
                subprocess.run(command, cwd=folder, check=True, stdout=log, stderr=log)
        frames = test_structures(folder, options, args.structures)
        table = measure(checkpoint, frames, args.operations, args.seed)
        print(f"\n{name}: {len(frames)} test structures x {args.operations} operations")
        print(f"  {'output':45s}{'O(3) f32':>12s}{'f32 vs f64':>12s}")
        for label, (change, difference) in table.items():
            print(f"  {label:45s}{change:12.2e}{difference:12.2e}")


if __name__ == "__main__":
    main()
