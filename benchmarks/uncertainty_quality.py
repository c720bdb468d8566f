"""Do the calibrated last-layer uncertainties mean something, and what do they cost?

Quality: the default model and ``backbone: soap`` (the bundled example's sizes) are
trained on shared data sets (validation set: calibration; test set held back), and
on the test set, per target block, the script prints

* the Spearman correlation between the uncertainty and the actual error of every
  test sample (RMS over the block's components and properties);
* ``mean(e² / u²)`` (1 when calibrated, as on the validation set by construction),
  the fractions of errors within 1 and 2 uncertainties (Gaussian: 0.68 and 0.95)
  and the Gaussian negative log-likelihood;
* for forces (the example), per test atom: the spread of the forces of the energy
  ensemble's members against the force error (the ensemble is calibrated on
  energies only, so ``mean(e²/u²)`` shows how far that carries to forces);
* a calibration curve (``calibration-<set>.png``): test samples sorted by
  uncertainty in bins, RMSE of each bin against its RMS uncertainty.

Data sets (``../shared/data`` and the bundled example), fixed splits
(``numpy.random.default_rng(0).permutation``):

* ``example``: the bundled water clusters, energy + forces, μ, α, β; 180/45/75;
* ``water_dimer``: μ, α; 600/100/300;
* ``methane``: energy; 55/15/30.

Cost (``--cost``): an energy + forces call of the default model on the 648-atom
water box, alone and with the per-atom energy uncertainty, with the energy
ensemble, and with both; exported model, calls alternating, medians, 2 threads.

    python benchmarks/uncertainty_quality.py [--data-sets ...] [--epochs N]
        [--variants default soap] [--cost] [--keep folder]
"""

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from training import (  # noqa: E402
    CARTESIAN_TARGETS,
    EXAMPLE_SIZES,
    SHARED,
    data_file,
    load,
    run_training,
)

VARIANTS = {
    "default": dict(EXAMPLE_SIZES, backbone="pet"),
    "soap": {"backbone": "soap"},
}

#: name → (targets or None for the example's, (n_validation, n_test), n_total,
#: epochs)
DATA_SETS = {
    "example": (None, (45, 75), 300, 40),
    "water_dimer": (
        {f"mtt::{k}": CARTESIAN_TARGETS[k] for k in ("mu", "alpha")},
        (100, 300),
        1000,
        15,
    ),
    "methane": ({"energy": {"key": "energy", "unit": "eV"}}, (15, 30), 100, 40),
}


def options_for(name: str, path: str, variant: str, epochs: int) -> Dict:
    from symatomic.cli import example_options_path
    from symatomic.options import load_options

    targets, (n_validation, n_test), n_total, _ = DATA_SETS[name]
    order = np.random.default_rng(0).permutation(n_total).tolist()
    if targets is None:
        example = load_options(example_options_path())
        targets = example["training_set"]["targets"]
        training = dict(example["architecture"]["training"])
    else:
        training = {"batch_size": 16, "learning_rate": 1e-3}
    training["num_epochs"] = epochs
    return {
        "seed": 0,
        "base_precision": 32,
        "architecture": {
            "name": "pet",
            "model": copy.deepcopy(VARIANTS[variant]),
            "training": training,
        },
        "training_set": {
            "systems": {"read_from": path, "length_unit": "angstrom"},
            "targets": copy.deepcopy(targets),
        },
        "validation_set": {"indices": order[:n_validation]},
        "test_set": {"indices": order[n_validation : n_validation + n_test]},
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties broken by order; continuous data)."""
    ranks_a = np.argsort(np.argsort(a)).astype(float)
    ranks_b = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def test_samples(folder: str, options: Dict) -> Dict[str, Dict[str, np.ndarray]]:
    """Per block label: squared errors ``(n, P)`` (mean over components) and
    uncertainties ``(n, P)`` of the test set, from the trained checkpoint."""
    import torch

    from symatomic.data.sets import load_data_sets
    from symatomic.options import check_options
    from symatomic.train.calibration import last_layer_samples, readout_label
    from symatomic.train.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(os.path.join(folder, "run", "model.ckpt"))
    model.to(torch.float64)
    test = load_data_sets(check_options(options), model.cutoff).test
    names = [n for n in model.target_specs if model.readouts[n].has_last_layer]
    result: Dict[str, Dict[str, List[np.ndarray]]] = {}
    for predictions, references, features in last_layer_samples(model, test, names, 16):
        for name in names:
            for index, block in enumerate(model.readouts[name].uncertainty):
                label = readout_label(model.target_specs[name], index)
                with torch.no_grad():
                    sigma = block(features[name][index])
                error = predictions[name][index] - references[name][index]
                entry = result.setdefault(label, {"squared": [], "sigma": []})
                entry["squared"].append((error**2).mean(dim=1).numpy())
                entry["sigma"].append(sigma.numpy())
    return {
        label: {k: np.concatenate(v) for k, v in entry.items()}
        for label, entry in result.items()
    }


def force_samples(folder: str, options: Dict) -> Dict[str, np.ndarray]:
    """Per test atom: the squared force error (mean over x, y, z) and the force
    uncertainty from the energy ensemble, ``u_i² = mean_m mean_xyz (F_m - F̄)²``
    with member forces ``F_m = -∂E_m/∂r`` by automatic differentiation (what an
    engine computes); empty when the energy has no forces."""
    import ase.io
    import torch
    from metatomic.torch import ModelEvaluationOptions, ModelOutput, systems_to_torch

    import symatomic.io
    from symatomic.train.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(os.path.join(folder, "run", "model.ckpt"))
    energy = options["training_set"]["targets"].get("energy")
    if (
        energy is None
        or "forces" not in energy
        or "energy_ensemble" not in (model.output_names())
    ):
        return {}
    exported = model.to(torch.float64).export()
    frames = ase.io.read(options["training_set"]["systems"]["read_from"], ":")
    key = energy["forces"]["key"]
    squared: List[np.ndarray] = []
    sigma: List[np.ndarray] = []
    evaluation = ModelEvaluationOptions(
        length_unit="angstrom",
        outputs={
            "energy": ModelOutput(sample_kind="system"),
            "energy_ensemble": ModelOutput(sample_kind="system"),
        },
    )
    for index in options["test_set"]["indices"]:
        atoms = frames[index]
        reference = atoms.arrays[key] if key in atoms.arrays else atoms.get_forces()
        systems = systems_to_torch([atoms], dtype=torch.float64)
        systems[0].positions.requires_grad_(True)
        symatomic.io.add_neighbor_lists(systems, exported)
        result = exported(systems, evaluation, check_consistency=False)
        positions = systems[0].positions
        total = result["energy"].block().values.sum()
        forces = -torch.autograd.grad(total, positions, retain_graph=True)[0]
        members = result["energy_ensemble"].block().values[0]
        member_forces = torch.stack(
            [
                -torch.autograd.grad(members[m], positions, retain_graph=True)[0]
                for m in range(members.shape[0])
            ]
        )
        spread = member_forces - member_forces.mean(dim=0)
        sigma.append(spread.pow(2).mean(dim=(0, 2)).sqrt().detach().numpy())
        error = forces.detach().numpy() - reference
        squared.append((error**2).mean(axis=1))
    return {
        "squared": np.concatenate(squared)[:, None],
        "sigma": np.concatenate(sigma)[:, None],
    }


def quality(squared: np.ndarray, sigma: np.ndarray) -> Dict[str, float]:
    error = np.sqrt(squared.mean(axis=1))
    u = np.sqrt((sigma**2).mean(axis=1))
    z2 = squared / sigma**2
    return {
        "spearman": spearman(u, error),
        "z2": float(z2.mean()),
        "within1": float((z2 <= 1).mean()),
        "within2": float((z2 <= 4).mean()),
        "nll": float(0.5 * np.mean(np.log(2 * np.pi * sigma**2) + z2)),
        "rmse": float(np.sqrt(squared.mean())),
        "rmu": float(np.sqrt((sigma**2).mean())),
    }


def calibration_plot(curves: Dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({label for variant in curves.values() for label in variant})
    columns = min(3, len(labels))
    rows = (len(labels) + columns - 1) // columns
    figure, axes = plt.subplots(
        rows, columns, figsize=(4 * columns, 3.6 * rows), squeeze=False
    )
    for axis, label in zip(axes.flat, labels):
        low, high = np.inf, 0.0
        for variant, blocks in curves.items():
            if label not in blocks:
                continue
            squared, sigma = blocks[label]["squared"], blocks[label]["sigma"]
            u2 = (sigma**2).mean(axis=1)
            order = np.argsort(u2)
            bins = np.array_split(order, min(8, len(order)))
            rmu = [np.sqrt(u2[b].mean()) for b in bins]
            rmse = [np.sqrt(squared[b].mean()) for b in bins]
            axis.loglog(rmu, rmse, "o-", label=variant)
            low = min(low, min(rmu), min(rmse))
            high = max(high, max(rmu), max(rmse))
        axis.loglog([low, high], [low, high], "k--", lw=0.8)
        axis.set_title(label, fontsize=8)
        axis.set_xlabel("RMS uncertainty of the bin")
        axis.set_ylabel("RMSE of the bin")
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(labels) :]:
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def cost(repeats: int) -> None:
    import torch
    from metatomic.torch import ModelEvaluationOptions, ModelOutput, systems_to_torch
    from systems import water_box

    import symatomic.io
    from symatomic.data.targets import parse_target_options
    from symatomic.model import SymatomicModel

    torch.set_num_threads(2)
    torch.manual_seed(0)
    specs = {"energy": parse_target_options("energy", {"unit": "eV"}, "x")}
    model = SymatomicModel({}, [1, 8], specs)
    block = model.readouts["energy"].uncertainty[0]
    size = block.n_features
    block.covariance_root = torch.eye(size)
    block.calibration = torch.ones(1)
    block.ensemble_weights = torch.randn(size, 16, 1) * 1e-3
    exported = model.export()
    atoms = water_box()
    variants = {
        "energy + forces": {"energy": "system"},
        "+ energy_uncertainty (per atom)": {
            "energy": "system",
            "energy_uncertainty": "atom",
        },
        "+ energy_ensemble (16)": {"energy": "system", "energy_ensemble": "system"},
    }

    def call(outputs: Dict[str, str]) -> float:
        systems = systems_to_torch([atoms], dtype=torch.float32)
        systems[0].positions.requires_grad_(True)
        start = time.perf_counter()
        symatomic.io.add_neighbor_lists(systems, exported)
        options = ModelEvaluationOptions(
            length_unit="angstrom",
            outputs={k: ModelOutput(sample_kind=v) for k, v in outputs.items()},
        )
        result = exported(systems, options, check_consistency=False)
        result["energy"].block().values.sum().backward()
        return time.perf_counter() - start

    for outputs in variants.values():
        call(outputs)
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, outputs in variants.items():
            times[name].append(call(outputs))
    base = statistics.median(times["energy + forces"])
    print(f"\ncost, default model, {len(atoms)} water atoms, float32, 2 threads")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:34s} {median:7.3f} s  {median / base:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-sets", nargs="*", default=list(DATA_SETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--data", default=SHARED)
    parser.add_argument("--keep", default=None, help="folder for runs and plots")
    parser.add_argument("--cost", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="uncertainty-")
    print(f"load before: {load()}; runs in {root}")
    for name in args.data_sets:
        path = data_file(name, args.data)
        if path is None:
            print(f"{name}: data not found, skipped")
            continue
        epochs = args.epochs or DATA_SETS[name][3]
        curves = {}
        print(f"\n{name} ({epochs} epochs), test set")
        print(
            f"  {'variant':8s} {'block':44s} {'spearman':>8s} {'<e²/u²>':>8s} "
            f"{'≤1u':>5s} {'≤2u':>5s} {'NLL':>8s} {'RMSE':>9s} {'RMS u':>9s}"
        )
        for variant in args.variants:
            folder = os.path.join(root, name, variant)
            options = options_for(name, path, variant, epochs)
            if not os.path.exists(os.path.join(folder, "run", "model.ckpt")):
                run_training(options, folder, 2)
            blocks = test_samples(folder, options)
            forces = force_samples(folder, options)
            if forces:
                blocks["energy forces (per atom, from the ensemble)"] = forces
            curves[variant] = blocks
            for label, entry in blocks.items():
                q = quality(entry["squared"], entry["sigma"])
                print(
                    f"  {variant:8s} {label:44s} {q['spearman']:8.3f} {q['z2']:8.2f} "
                    f"{q['within1']:5.2f} {q['within2']:5.2f} {q['nll']:8.3f} "
                    f"{q['rmse']:9.4g} {q['rmu']:9.4g}"
                )
        plot = os.path.join(root, f"calibration-{name}.png")
        calibration_plot(curves, plot, f"{name}: test set, binned by uncertainty")
        print(f"  calibration curves: {plot}")
    if args.cost:
        cost(args.repeats)
    print(f"\nload after: {load()}")


if __name__ == "__main__":
    main()
