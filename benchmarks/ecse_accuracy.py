"""Accuracy of PET with and without ECSE, on the shared reference data.

Same backbone (metatrain's default PET hyper-parameters), same splits as
``pet_accuracy.py`` (``numpy.random.default_rng(0)``: water dimer 700/100/200 for μ
and α; methane 70/10/20 for energy and forces), same number of epochs:

* ``PET``: unconstrained, trained with random O(3) augmentation;
* ``PET+ECSE (in the loop)``: ``ecse: {mode: local, frame_layers: 1}``, trained
  symmetrized (no augmentation: it would change nothing);
* ``PET, symmetrized``: the first model's weights evaluated with local ECSE in
  every layer, no retraining (``symatomic export --ecse local``);
* ``PET fine-tuned with ECSE``: the first model fine-tuned with ECSE in the loop
  for a quarter of the epochs (``finetune: {read_from: …}``);
* the previous default (ECSE in the first attention layer, scalar-basis tensor
  heads) and the default (invariant edge inputs, no frames, scalar-basis heads).

Prints the test RMSEs and the training time of each.

    python benchmarks/ecse_accuracy.py [--epochs-water 20] [--epochs-methane 100]
"""

import argparse
import os
import tempfile
import time

import torch
from pet_accuracy import METHANE_TARGETS, MODEL, WATER_TARGETS, options_for, split

from symatomic.data.sets import load_data_sets
from symatomic.train import Trainer, evaluate_structures, model_from_checkpoint


def train(options, folder, name):
    start = time.perf_counter()
    result = Trainer(options, os.path.join(folder, name), progress=False).run()
    return result, (time.perf_counter() - start) / 60


def symmetrized_test_errors(checkpoint_path, options, batch_size):
    """Test errors of a checkpoint's weights evaluated with local ECSE."""
    model = model_from_checkpoint(checkpoint_path, "best", ecse="local")
    model.eval()
    specs = model.target_specs
    data = load_data_sets(
        options, model.cutoff, atomic_types=model.atomic_types, targets=specs
    )
    return evaluate_structures(model, data.test, specs, batch_size)


def compare(path, targets, indices, epochs, batch_size, frame_layers, keys, folder):
    """The four variants on one data set: rows (variant, {key: RMSE}, minutes)."""
    training = {"num_epochs": epochs, "batch_size": batch_size, "learning_rate": 5e-4}
    rows = []

    options = options_for(path, targets, indices, MODEL, training)
    pet, minutes = train(options, folder, "pet")
    rows.append(("PET", pet.test_errors, minutes))

    model = {**MODEL, "ecse": {"mode": "local"}}  # direct heads, as MODEL
    if frame_layers:
        model["ecse"]["frame_layers"] = frame_layers
    options = options_for(path, targets, indices, model, training)
    ecse, minutes = train(options, folder, "ecse")
    rows.append(("PET+ECSE (in the loop)", ecse.test_errors, minutes))

    start = time.perf_counter()
    errors = symmetrized_test_errors(pet.checkpoint, options, batch_size)
    rows.append(("PET, symmetrized", errors, (time.perf_counter() - start) / 60))

    # fine-tuning keeps the backbone: ECSE in every layer, as the weights were
    # trained to see rotated environments everywhere
    model = {**MODEL, "ecse": {"mode": "local"}}
    finetune = {
        **training,
        "num_epochs": max(1, epochs // 4),
        "learning_rate": 2e-4,
        "finetune": {"read_from": pet.checkpoint},
    }
    options = options_for(path, targets, indices, model, finetune)
    tuned, minutes = train(options, folder, "finetune")
    rows.append(("PET fine-tuned with ECSE", tuned.test_errors, minutes))

    # the defaults, with their scalar-basis tensor heads: before (ECSE frames in
    # the first attention layer) and now (invariant edge inputs, no frames)
    for label, changes in (
        (
            "previous default (ECSE fl 1)",
            {"ecse": {"mode": "local", "frame_layers": 1}},
        ),
        ("default (invariant inputs)", {"ecse": "auto", "edge_inputs": "invariant"}),
    ):
        model = {**MODEL, "tensor_heads": "basis", **changes}
        options = options_for(path, targets, indices, model, training)
        result, minutes = train(options, folder, label.split()[0])
        rows.append((label, result.test_errors, minutes))
    return [(variant, {k: e[k] for k in keys}, m) for variant, e, m in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"),
    )
    parser.add_argument("--epochs-water", type=int, default=20)
    parser.add_argument("--epochs-methane", type=int, default=100)
    parser.add_argument(
        "--frame-layers",
        type=int,
        default=1,
        help="ECSE frame_layers of the model trained in the loop (default 1, as in "
        "the bundled example; 0 for all layers)",
    )
    parser.add_argument("--only", choices=["water", "methane"], default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tables = []
    with tempfile.TemporaryDirectory() as folder:
        methane = os.path.join(args.data, "methane_100.xyz")
        if os.path.exists(methane) and args.only in (None, "methane"):
            keys = ["energy/per_atom", "energy/forces"]
            rows = compare(
                methane,
                METHANE_TARGETS,
                split(100, 70, 10),
                args.epochs_methane,
                8,
                args.frame_layers,
                keys,
                os.path.join(folder, "methane"),
            )
            tables.append((f"methane, {args.epochs_methane} epochs", keys, rows))

        water = os.path.join(args.data, "water_dimer_1000.xyz")
        if os.path.exists(water) and args.only in (None, "water"):
            keys = ["mtt::dipole", "mtt::polarizability"]
            rows = compare(
                water,
                WATER_TARGETS,
                split(1000, 700, 100),
                args.epochs_water,
                16,
                args.frame_layers,
                keys,
                os.path.join(folder, "water"),
            )
            tables.append((f"water dimer, {args.epochs_water} epochs", keys, rows))

    for title, keys, rows in tables:
        print(f"\n{title} (test RMSE)")
        print(f"  {'variant':30s}" + "".join(f"{k:>22s}" for k in keys) + "  minutes")
        for variant, errors, minutes in rows:
            values = "".join(f"{errors[k]:22.4f}" for k in keys)
            print(f"  {variant:30s}{values}  {minutes:7.1f}")


if __name__ == "__main__":
    main()
