"""Cost and exactness of the symmetrizations of PET.

On a molecule of the shared data (QM7-X) and a 648-atom water box, for the same PET
(metatrain's default hyper-parameters, energy output):

* unsymmetrized PET;
* ECSE local, frames in every attention layer (``frame_layers: null``);
* ECSE local, frames in the first attention layer only (``frame_layers: 1``);
* ECSE global (``symatomic symmetrize``) around the unsymmetrized model;
* metatomic's ``SymmetrizedModel`` (Lebedev x circle grid, + inversion) at its
  default grid for an energy, around the unsymmetrized model.

It prints the median energy + forces time (float32, exported models, neighbor lists
included, calls alternating between variants), the ratio to the unsymmetrized
model, the number of frames per atom (and per structure in global mode), and the equivariance error of
energy and forces (float64 copies of the same models, random O(3) operation with
inversion plus a random permutation; relative to the size of the values).

    python benchmarks/ecse_cost.py [--repeats 5] [--threads 2] [--skip-grid-box]
"""

import argparse
import os
import statistics
import time

import ase.io
import numpy as np
import torch
from metatomic.torch.o3 import SymmetrizedModel, random_transformations
from pet_speed import energy_and_forces
from systems import water_box

import symatomic.io
from symatomic.data import compute_neighbors, structure_from_atoms
from symatomic.data.targets import parse_target_options
from symatomic.ecse import (
    ECSE_DEFAULTS,
    ECSE_GLOBAL_DEFAULTS,
    ECSEFrames,
    frames_per_group,
)
from symatomic.model import SymatomicModel
from symatomic.symmetrize import symmetrize_model


def build_models(types, dtype):
    spec = {"energy": parse_target_options("energy", {"unit": "eV"}, "")}
    models = {}
    for name, ecse in [
        ("PET", {"mode": "none"}),
        ("ECSE local (all layers)", {"mode": "local"}),
        ("ECSE local (frame_layers=1)", {"mode": "local", "frame_layers": 1}),
    ]:
        torch.manual_seed(0)
        model = SymatomicModel({"ecse": ecse}, types, spec).to(dtype)
        # non-trivial outputs: the composition baseline would hide the model
        model.readouts["energy"].scale.fill_(1.0)
        models[name] = model.export()
    models["ECSE global"] = symmetrize_model(models["PET"])
    models["metatomic SymmetrizedModel"] = SymmetrizedModel.wrap(models["PET"])
    return models


def frame_counts(atoms):
    """Frames per atom (local mode, its default pruning) and frames of the structure
    (global mode, pruned over the whole structure); before mirror images."""
    structure = structure_from_atoms(atoms, "x")
    compute_neighbors(structure, 4.5)
    n = len(structure)
    vectors = structure.pair_vectors()
    local = ECSEFrames(4.5, **ECSE_DEFAULTS)(
        structure.centers, vectors, n, torch.arange(n), n
    )
    pooled = ECSEFrames(4.5, **ECSE_GLOBAL_DEFAULTS)(
        structure.centers, vectors, n, torch.zeros(n, dtype=torch.long), 1
    )
    return float(frames_per_group(local, n).double().mean()), int(
        pooled.weights.shape[0]
    )


def equivariance_error(model, atoms, seed):
    generator = torch.Generator().manual_seed(seed)
    transformation = random_transformations(
        1,
        0,
        device=torch.device("cpu"),
        dtype=torch.float64,
        add_inversions=True,
        generator=generator,
    )
    rotation = transformation.matrices[0].numpy()
    permutation = np.random.default_rng(seed).permutation(len(atoms))
    transformed = atoms.copy()
    transformed.positions = atoms.positions @ rotation.T
    transformed.cell = atoms.cell.array @ rotation.T
    transformed = transformed[permutation]
    first = symatomic.io.predict(model, [atoms], ["energy"], stress=False)["energy"]
    second = symatomic.io.predict(model, [transformed], ["energy"], stress=False)[
        "energy"
    ]
    e1 = first.block().values.item()
    e2 = second.block().values.item()
    f1 = -first.block().gradient("positions").values[:, :, 0].numpy()
    f2 = -second.block().gradient("positions").values[:, :, 0].numpy()
    expected = (f1 @ rotation.T)[permutation]
    energy_error = abs(e1 - e2) / max(abs(e1), 1e-300)
    force_error = np.abs(expected - f2).max() / max(np.abs(f1).max(), 1e-300)
    return energy_error, force_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--data",
        default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"),
    )
    parser.add_argument(
        "--max-global-evaluations",
        type=int,
        default=200,
        help="time global ECSE only when it evaluates the model at most this many "
        "times per call (otherwise print the projected cost)",
    )
    parser.add_argument(
        "--skip-grid-box",
        action="store_true",
        help="skip metatomic's grid average on the water box (it runs out of memory "
        "on small machines)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    systems = []
    molecule_path = os.path.join(args.data, "qm7x_chno_100_mu_alpha.xyz")
    if os.path.exists(molecule_path):
        molecule = ase.io.read(molecule_path, 0)
        systems.append((f"QM7-X molecule ({len(molecule)} atoms)", molecule))
    systems.append(("water box (648 atoms)", water_box()))

    for label, atoms in systems:
        types = sorted(set(atoms.numbers.tolist()))
        models = build_models(types, torch.float32)
        models64 = build_models(types, torch.float64)
        per_atom, pooled = frame_counts(atoms)
        print(
            f"\n{label}: {per_atom:.2f} frames per atom (local mode); "
            f"{pooled} frames for the whole structure (global mode), x2 with "
            "mirror images"
        )
        runs = {}
        skipped = []
        for name, model in models.items():
            if args.skip_grid_box and "SymmetrizedModel" in name and len(atoms) > 100:
                skipped.append(f"{name}: skipped (out of memory on 648 atoms)")
                continue
            if name == "ECSE global" and 2 * pooled > args.max_global_evaluations:
                skipped.append(
                    f"{name}: not timed, {2 * pooled} evaluations of the whole model "
                    f"per call, projected ratio ~{2 * pooled}"
                )
                continue
            runs[name] = energy_and_forces(model, atoms)
            runs[name]()
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        reference = statistics.median(times["PET"])
        print(
            f"  {'variant':30s} {'time (s)':>9s} {'ratio':>7s} {'E error':>9s} {'F error':>9s}"
        )
        for name in runs:
            median = statistics.median(times[name])
            errors = [
                equivariance_error(models64[name], atoms, seed) for seed in (1, 2)
            ]
            energy_error = max(e for e, _ in errors)
            force_error = max(f for _, f in errors)
            print(
                f"  {name:30s} {median:9.3f} {median / reference:7.2f} "
                f"{energy_error:9.1e} {force_error:9.1e}"
            )
        for line in skipped:
            print("  " + line)


if __name__ == "__main__":
    main()
