"""Accuracy of tensor outputs: symatomic's models against metatrain's SOAP-BPNN (with
its TensorBasis) and metatrain's PET, trained side by side on the same data.

Data (``../shared/data``), targets as single spherical blocks (atomic units), split
with ``numpy.random.default_rng(0).permutation`` (train = first part, validation =
next, test = rest):

* ``water_monomer_1000.xyz``, ``water_dimer_1000.xyz``: 700/100/200; μ (λ=1), α (λ=0,
  λ=2), β (λ=1, λ=3);
* ``qm7x_chno_100_mu_alpha.xyz``: 70/10/20; μ (λ=1), α (λ=0, λ=2).

Every model is trained for the same number of epochs with its own default
hyper-parameters (symatomic's variants use metatrain's default PET sizes), then
evaluated on the test set through its exported metatomic model with the same code
(``symatomic.io.predict``): RMSE over structures and components, in the units of the
data. The spherical blocks come from symatomic's orthonormal Cartesian → spherical
decomposition, so all models learn the same numbers.

    python benchmarks/tensor_accuracy.py --epochs 100
    python benchmarks/tensor_accuracy.py --data-sets water_dimer --models soap_bpnn pet-ecse

Requires ``pip install metatrain[soap-bpnn]`` (torch-spex) for the SOAP-BPNN runs.
"""

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import ase
import ase.io
import numpy as np
import torch
import yaml

DATA_SETS: Dict[str, Tuple[str, List[str], Tuple[int, int]]] = {
    "water_monomer": ("water_monomer_1000.xyz", ["mu", "alpha", "beta"], (700, 100)),
    "water_dimer": ("water_dimer_1000.xyz", ["mu", "alpha", "beta"], (700, 100)),
    "qm7x": ("qm7x_chno_100_mu_alpha.xyz", ["mu", "alpha"], (70, 10)),
}

#: Cartesian key → (rank, blocks kept as (λ, σ))
TENSORS = {
    "mu": (1, [(1, 1)]),
    "alpha": (2, [(0, 1), (2, 1)]),
    "beta": (3, [(1, 1), (3, 1)]),
}

#: metatrain's default PET sizes, for symatomic's variants
PET_SIZES = {
    "d_pet": 128,
    "d_node": 256,
    "d_head": 128,
    "d_feedforward": 256,
    "num_heads": 8,
    "num_attention_layers": 2,
    "num_gnn_layers": 2,
}

#: symatomic variants: name → architecture.model additions
OURS: Dict[str, Dict] = {
    # exactly equivariant: invariant SOAP coefficients times the tensor basis
    "soap-basis": {"backbone": "soap"},
    # the same, narrower
    "soap-basis-medium": {
        "backbone": "soap",
        "soap": {"n_pseudo_species": 2, "d_hidden": 64, "d_out": 64},
        "d_head": 64,
    },
    # fewer parameters than metatrain's SOAP-BPNN (43k against 82k on water)
    "soap-basis-small": {
        "backbone": "soap",
        "soap": {"n_pseudo_species": 2, "d_hidden": 32, "d_out": 32},
        "d_head": 32,
    },
    # exactly equivariant, no frames: PET with invariant edge inputs (the default)
    "pet-invariant-basis": {"backbone": "pet", "edge_inputs": "invariant"},
    # exactly equivariant: ECSE-averaged PET features as coefficients (the default
    # before invariant edge inputs)
    "pet-ecse-basis": {
        "backbone": "pet",
        "ecse": {"mode": "local", "frame_layers": 1},
        "tensor_heads": "basis",
    },
    # exactly equivariant: PET heads in every frame, rotated back (ECSE)
    "pet-ecse": {
        "backbone": "pet",
        "ecse": {"mode": "local", "frame_layers": 1},
        "tensor_heads": "direct",
    },
    # approximate (random O(3) augmentation): plain PET coefficients, or components
    "pet-basis": {"backbone": "pet", "ecse": "none", "tensor_heads": "basis"},
    "pet": {"backbone": "pet", "ecse": "none", "tensor_heads": "direct"},
}

METATRAIN = ["soap_bpnn", "metatrain-pet"]


def block_name(key: str, o3_lambda: int, o3_sigma: int) -> str:
    return f"{key}_l{o3_lambda}" + ("" if o3_sigma == 1 else "_odd")


def prepare(data: str, name: str, folder: str) -> Dict[str, List[ase.Atoms]]:
    """Split a data set and store its tensors as single spherical blocks."""
    from symatomic.o3 import CartesianDecomposition

    file, keys, (n_train, n_validation) = DATA_SETS[name]
    frames = ase.io.read(os.path.join(data, file), ":")
    for atoms in frames:
        if not np.any(atoms.cell.array):  # the water files: zero lattice, pbc=True
            atoms.pbc = False
        for key in keys:
            rank, blocks = TENSORS[key]
            values = torch.tensor(np.asarray(atoms.info[key], dtype=np.float64))
            values = values.reshape([1] + [3] * rank + [1])
            decomposition = CartesianDecomposition(rank, symmetric=True)
            spherical = dict(
                zip(decomposition.irreps, decomposition.to_spherical(values))
            )
            for o3_lambda, o3_sigma in blocks:
                block = spherical[(o3_lambda, o3_sigma)].reshape(-1).numpy()
                atoms.info[block_name(key, o3_lambda, o3_sigma)] = block
    order = np.random.default_rng(0).permutation(len(frames))
    parts = {
        "train": order[:n_train],
        "validation": order[n_train : n_train + n_validation],
        "test": order[n_train + n_validation :],
    }
    result = {}
    for part, indices in parts.items():
        selected = [frames[i] for i in indices]
        ase.io.write(os.path.join(folder, f"{part}.xyz"), selected, format="extxyz")
        result[part] = selected
    return result


def targets_section(name: str, file: str) -> Dict:
    targets = {}
    for key in DATA_SETS[name][1]:
        for o3_lambda, o3_sigma in TENSORS[key][1]:
            block = block_name(key, o3_lambda, o3_sigma)
            targets[f"mtt::{block}"] = {
                "read_from": file,
                "key": block,
                "unit": "",
                "type": {
                    "spherical": {
                        "irreps": [{"o3_lambda": o3_lambda, "o3_sigma": o3_sigma}]
                    }
                },
            }
    return targets


def options(name: str, folder: str, architecture: Dict, epochs: int) -> Dict:
    """A metatrain-layout options file (read by both ``mtt`` and ``symatomic``)."""
    sets = {}
    for part in ("train", "validation", "test"):
        file = os.path.join(folder, f"{part}.xyz")
        sets[part] = {
            "systems": {"read_from": file, "length_unit": "angstrom"},
            "targets": targets_section(name, file),
        }
    architecture = copy.deepcopy(architecture)
    architecture.setdefault("training", {})["num_epochs"] = epochs
    return {
        "seed": 0,
        "base_precision": 32,
        "architecture": architecture,
        "training_set": sets["train"],
        "validation_set": sets["validation"],
        "test_set": sets["test"],
    }


def train_metatrain(kind: str, options_file: str, folder: str) -> str:
    command = [sys.executable, "-m", "metatrain", "train", options_file, "-o"]
    command += [os.path.join(folder, "model.pt")]
    with open(os.path.join(folder, "train.log"), "w") as log:
        subprocess.run(command, cwd=folder, check=True, stdout=log, stderr=log)
    return os.path.join(folder, "model.pt")


def train_ours(options_file: str, folder: str) -> str:
    command = [sys.executable, "-m", "symatomic", "train", options_file]
    command += ["-o", os.path.join(folder, "run"), "--no-progress"]
    with open(os.path.join(folder, "train.log"), "w") as log:
        subprocess.run(command, cwd=folder, check=True, stdout=log, stderr=log)
    return os.path.join(folder, "run", "model.pt")


def evaluate(
    model_path: str, frames: List[ase.Atoms], names: List[str]
) -> Tuple[Dict[str, float], int]:
    """Test RMSE per block target, and the number of parameters of the model."""
    from metatomic.torch import load_atomistic_model

    import symatomic.io

    folder = os.path.dirname(model_path)
    extensions = os.path.join(folder, "extensions")
    model = load_atomistic_model(
        model_path,
        extensions_directory=extensions if os.path.isdir(extensions) else None,
    )
    predictions = symatomic.io.predict(model, frames, outputs=names, forces=False)
    errors = {}
    for name in names:
        key = name[len("mtt::") :]
        predicted = predictions[name].block().values.reshape(len(frames), -1)
        # (one row per structure: a one-number block read back from a file is a
        # scalar, and (n, 1) - (n,) would broadcast)
        reference = torch.tensor(
            np.stack([np.asarray(a.info[key]).reshape(-1) for a in frames])
        )
        errors[name] = float(((predicted - reference) ** 2).mean().sqrt())
    parameters = sum(p.numel() for p in model.parameters())
    return errors, parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"),
    )
    parser.add_argument("--data-sets", nargs="+", default=list(DATA_SETS))
    parser.add_argument(
        "--models",
        nargs="+",
        default=METATRAIN
        + ["soap-basis", "soap-basis-small", "pet-invariant-basis", "pet-basis"],
    )
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", help="keep the runs in this folder")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    unknown = set(args.models) - set(METATRAIN) - set(OURS)
    if unknown:
        parser.error(
            f"unknown models {sorted(unknown)}; known: {METATRAIN + list(OURS)}"
        )

    root = args.keep or tempfile.mkdtemp(prefix="tensor-accuracy-")
    rows = []
    for data_set in args.data_sets:
        if not os.path.exists(os.path.join(args.data, DATA_SETS[data_set][0])):
            print(f"skipping {data_set}: data file not found in {args.data}")
            continue
        data_folder = os.path.join(root, data_set)
        os.makedirs(data_folder, exist_ok=True)
        parts = prepare(args.data, data_set, data_folder)
        for model_name in args.models:
            folder = os.path.join(data_folder, model_name)
            os.makedirs(folder, exist_ok=True)
            if model_name == "soap_bpnn":
                architecture = {"name": "soap_bpnn"}
            elif model_name == "metatrain-pet":
                architecture = {"name": "pet"}
            else:
                model = copy.deepcopy(OURS[model_name])
                if model["backbone"] == "pet":
                    model.update(PET_SIZES)
                architecture = {"name": "pet", "model": model}
            options_file = os.path.join(folder, "options.yaml")
            with open(options_file, "w") as handle:
                yaml.safe_dump(
                    options(data_set, data_folder, architecture, args.epochs), handle
                )
            start = time.perf_counter()
            if model_name in METATRAIN:
                model_path = train_metatrain(model_name, options_file, folder)
            else:
                model_path = train_ours(options_file, folder)
            minutes = (time.perf_counter() - start) / 60
            names = list(targets_section(data_set, "").keys())
            errors, parameters = evaluate(model_path, parts["test"], names)
            rows.append((data_set, model_name, errors, parameters, minutes))
            print(
                f"{data_set} {model_name}: {errors} ({parameters} parameters, "
                f"{minutes:.1f} min)",
                flush=True,
            )

    print(f"\ntest RMSE, {args.epochs} epochs, runs in {root}")
    names = sorted({n for row in rows for n in row[2]})
    header = f"{'data set':14s} {'model':14s} " + " ".join(
        f"{n[5:]:>9s}" for n in names
    )
    print(header + f" {'params':>9s} {'min':>5s}")
    for data_set, model_name, errors, parameters, minutes in rows:
        values = " ".join(
            f"{errors[n]:9.4f}" if n in errors else f"{'':9s}" for n in names
        )
        print(
            f"{data_set:14s} {model_name:14s} {values} {parameters:9d} {minutes:5.1f}"
        )


if __name__ == "__main__":
    main()
