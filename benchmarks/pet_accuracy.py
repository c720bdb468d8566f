"""Accuracy of symatomic's PET on the shared reference data sets.

* ``water_dimer_1000.xyz``: dipole (λ=1) and polarizability (λ=0, 2), atomic units;
  split 700/100/200 with ``numpy.random.default_rng(0).permutation(1000)``
  (train = first 700, validation = next 100, test = last 200);
* ``methane_100.xyz``: energy and forces (eV, eV/Å); split 70/10/20, same rule.

Prints test RMSEs next to the anchors of DESIGN.md (metatrain PET on the same splits)
and the mean-value baselines.

    python benchmarks/pet_accuracy.py [--data ../shared/data] [--epochs-water 150]
"""

import argparse
import copy
import os
import tempfile
import time

import numpy as np
import torch

from symatomic.options import check_options
from symatomic.train import Trainer

ANCHORS = {
    "water_dimer": {"mtt::dipole": 0.0314, "mtt::polarizability": 0.585},
    "methane": {"energy/per_atom": 0.0765, "energy/forces": 1.064},
}

#: metatrain's default PET hyper-parameters, spelled out; plain PET with direct heads
#: (the defaults of symatomic are exactly equivariant models: opt out explicitly)
MODEL = {
    "backbone": "pet",
    "ecse": "none",
    "tensor_heads": "direct",
    "d_pet": 128,
    "d_node": 256,
    "d_head": 128,
    "d_feedforward": 256,
    "num_heads": 8,
    "num_attention_layers": 2,
    "num_gnn_layers": 2,
}

WATER_TARGETS = {
    "mtt::dipole": {"key": "mu", "unit": "e*Bohr", "type": {"cartesian": {"rank": 1}}},
    "mtt::polarizability": {
        "key": "alpha",
        "unit": "Bohr^3",
        "type": {"cartesian": {"rank": 2}},
    },
}

METHANE_TARGETS = {"energy": {"key": "energy", "unit": "eV"}}


def split(n_total, n_train, n_validation, seed=0):
    permutation = np.random.default_rng(seed).permutation(n_total).tolist()
    return (
        permutation[:n_train],
        permutation[n_train : n_train + n_validation],
        permutation[n_train + n_validation :],
    )


def options_for(path, targets, indices, model, training, seed=0):
    """Validated options (the given dictionaries are copied, never modified)."""
    train, validation, test = indices
    return check_options(
        {
            "seed": seed,
            "base_precision": 32,
            "architecture": {
                "name": "pet",
                "model": copy.deepcopy(model),
                "training": copy.deepcopy(training),
            },
            "training_set": {
                "systems": {"read_from": path, "length_unit": "angstrom"},
                "targets": copy.deepcopy(targets),
            },
            "validation_set": {"indices": validation},
            "test_set": {"indices": test},
        }
    )


def run(name, options):
    # the training set is everything not in validation/test (indices are removed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        result = Trainer(options, os.path.join(folder, name), progress=False).run()
    minutes = (time.perf_counter() - start) / 60
    return result, minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"),
    )
    parser.add_argument("--epochs-water", type=int, default=150)
    parser.add_argument("--epochs-methane", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []

    water = os.path.join(args.data, "water_dimer_1000.xyz")
    if os.path.exists(water):
        targets = WATER_TARGETS
        training = {
            "num_epochs": args.epochs_water,
            "batch_size": 16,
            "learning_rate": 5e-4,
        }
        options = options_for(water, targets, split(1000, 700, 100), MODEL, training)
        result, minutes = run("water", options)
        for key in ("mtt::dipole", "mtt::polarizability"):
            rows.append(
                (
                    "water_dimer",
                    key,
                    result.test_errors[key],
                    ANCHORS["water_dimer"][key],
                    minutes,
                )
            )

    methane = os.path.join(args.data, "methane_100.xyz")
    if os.path.exists(methane):
        targets = METHANE_TARGETS
        training = {
            "num_epochs": args.epochs_methane,
            "batch_size": 8,
            "learning_rate": 5e-4,
        }
        options = options_for(methane, targets, split(100, 70, 10), MODEL, training)
        result, minutes = run("methane", options)
        for key in ("energy/per_atom", "energy/forces"):
            rows.append(
                (
                    "methane",
                    key,
                    result.test_errors[key],
                    ANCHORS["methane"][key],
                    minutes,
                )
            )

    print(
        f"{'data set':14s} {'quantity':22s} {'test RMSE':>10s} {'metatrain PET':>14s} {'minutes':>8s}"
    )
    for data_set, key, value, anchor, minutes in rows:
        print(f"{data_set:14s} {key:22s} {value:10.4f} {anchor:14.4f} {minutes:8.1f}")


if __name__ == "__main__":
    main()
