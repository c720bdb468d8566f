"""Accuracy at equal wall-clock budget: which model should ``backbone: auto`` pick?

Variants, each with symatomic's default sizes unless said (what a user gets by
naming nothing but the backbone):

* ``pet``: the default PET (invariant edge inputs, scalar-basis tensor heads),
  metatrain's PET sizes (~2.9 M parameters);
* ``pet-small``: the same with the bundled example's sizes (d_pet 64, 1 attention
  layer per GNN layer; ~0.47 M parameters);
* ``soap``: the SOAP backbone (power spectrum + MLP, scalar-basis heads).

Data sets (``../shared/data`` and the bundled example), targets as a user would
give them (Cartesian tensors, energies with forces), split with
``numpy.random.default_rng(0).permutation``: validation and test are fixed index
lists, the training set is the rest:

* ``water_monomer``, ``water_dimer``: μ, α, β; 700/100/200;
* ``qm7x_chno``: μ, α; 70/10/20; ``qm7x_polarizability``: α; 70/10/20;
* ``methane``: energy + forces; 70/10/20;
* ``example``: the bundled water clusters, every target; 240/30/30.

The budget: the time per epoch of every variant on every data set is measured first
(2 threads, the median of epochs 2-4 of a short run, machine otherwise idle: the
load is printed), and each variant is then trained for as many epochs as fit the budget
(at least 1), with its full learning-rate schedule. The training itself can then
run at any time and with any number of threads (``--jobs 2`` runs two at once, one
thread each): the epoch count, not the clock, decides the result. Test RMSE of
every target and block are printed, with the winner of each column. ``--epochs 10``
also trains every variant for 10 epochs (equal epochs rather than equal time).

    python benchmarks/budget_accuracy.py --budgets 5 30 [--epochs 10] [--data-sets ...]
        [--variants ...] [--jobs 2] [--keep folder]
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "data")

#: metatrain's default PET sizes are symatomic's defaults; the example's sizes
EXAMPLE_SIZES = {
    "d_pet": 64,
    "d_node": 128,
    "d_head": 64,
    "d_feedforward": 128,
    "num_heads": 4,
    "num_attention_layers": 1,
    "num_gnn_layers": 2,
}

VARIANTS: Dict[str, Dict] = {
    "pet": {"backbone": "pet"},
    "pet-small": dict(EXAMPLE_SIZES, backbone="pet"),
    "soap": {"backbone": "soap"},
    # for the epoch time of the default against plain PET (not in the budget runs
    # unless asked for)
    "plain-pet": {"backbone": "pet", "ecse": "none"},
}

_TENSORS = {
    "mu": {"key": "mu", "unit": "e*Bohr", "type": {"cartesian": {"rank": 1}}},
    "alpha": {"key": "alpha", "unit": "Bohr^3", "type": {"cartesian": {"rank": 2}}},
    "beta": {"key": "beta", "unit": "", "type": {"cartesian": {"rank": 3}}},
}

#: name → (file, targets, (n_validation, n_test), n_total)
DATA_SETS: Dict[str, Tuple[str, Dict, Tuple[int, int], int]] = {
    "water_monomer": (
        "water_monomer_1000.xyz",
        {f"mtt::{k}": _TENSORS[k] for k in ("mu", "alpha", "beta")},
        (100, 200),
        1000,
    ),
    "water_dimer": (
        "water_dimer_1000.xyz",
        {f"mtt::{k}": _TENSORS[k] for k in ("mu", "alpha", "beta")},
        (100, 200),
        1000,
    ),
    "qm7x_chno": (
        "qm7x_chno_100_mu_alpha.xyz",
        {f"mtt::{k}": _TENSORS[k] for k in ("mu", "alpha")},
        (10, 20),
        100,
    ),
    "qm7x_polarizability": (
        "qm7x_100_polarizability.xyz",
        {"mtt::alpha": dict(_TENSORS["alpha"], key="polarizability")},
        (10, 20),
        100,
    ),
    "methane": (
        "methane_100.xyz",
        {"energy": {"key": "energy", "unit": "eV"}},
        (10, 20),
        100,
    ),
    "example": ("example", None, (30, 30), 300),
}


def data_file(name: str, data: str) -> Optional[str]:
    if name == "example":
        from symatomic.cli import example_options_path

        return os.path.join(
            os.path.dirname(example_options_path()), "water_clusters.xyz"
        )
    path = os.path.join(data, DATA_SETS[name][0])
    return path if os.path.exists(path) else None


def options_for(name: str, path: str, variant: str, epochs: int) -> Dict:
    from symatomic.cli import example_options_path
    from symatomic.options import load_options

    _, targets, (n_validation, n_test), n_total = DATA_SETS[name]
    order = np.random.default_rng(0).permutation(n_total).tolist()
    validation = order[:n_validation]
    test = order[n_validation : n_validation + n_test]
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
        "validation_set": {"indices": validation},
        "test_set": {"indices": test},
    }


def run_training(options: Dict, folder: str, threads: int) -> Dict:
    """Train in a subprocess (its own thread count); returns test errors and the
    wall time."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "options.json"), "w") as file:
        json.dump(options, file)
    command = [sys.executable, os.path.abspath(__file__), "--train-one", folder]
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(os.path.join(folder, "log.txt"), "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=log, env=environment)
    with open(os.path.join(folder, "result.json")) as file:
        result = json.load(file)
    result["wall_s"] = time.perf_counter() - start
    return result


def _train_one(folder: str) -> None:
    import torch

    from symatomic.options import check_options
    from symatomic.train import Trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    with open(os.path.join(folder, "options.json")) as file:
        options = check_options(json.load(file))
    result = Trainer(
        options, os.path.join(folder, "run"), progress=False, parity_plots=False
    ).run()
    with open(os.path.join(folder, "result.json"), "w") as file:
        json.dump({"test_errors": result.test_errors, "history": result.history}, file)


def epoch_time(name: str, path: str, variant: str, root: str) -> float:
    """Seconds per epoch (2 threads, validation included): the median of epochs
    2-4 of a 5-epoch run (the first epoch warms up, the last one exports)."""
    folder = os.path.join(root, "calibration", name, variant)
    result = run_training(options_for(name, path, variant, 5), folder, 2)
    times = [record["time"] for record in result["history"][1:4]]
    return float(np.median(times))


def load() -> str:
    with open("/proc/loadavg") as file:
        return " ".join(file.read().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=SHARED)
    parser.add_argument("--data-sets", nargs="+", default=list(DATA_SETS))
    parser.add_argument("--variants", nargs="+", default=["pet", "pet-small", "soap"])
    parser.add_argument("--budgets", type=float, nargs="*", default=[5.0, 30.0])
    parser.add_argument(
        "--epochs",
        type=int,
        nargs="+",
        default=[],
        help="also train every variant for these numbers of epochs (equal epochs)",
    )
    parser.add_argument("--jobs", type=int, default=1, choices=[1, 2])
    parser.add_argument("--keep", default=None)
    parser.add_argument(
        "--calibrate-only",
        action="store_true",
        help="measure and print the seconds per epoch, train nothing",
    )
    parser.add_argument("--train-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_one:
        _train_one(args.train_one)
        return

    root = args.keep or tempfile.mkdtemp(prefix="budget-")
    calibration_file = os.path.join(root, "epoch_times.json")
    seconds: Dict[str, Dict[str, float]] = {}
    if os.path.exists(calibration_file):
        with open(calibration_file) as file:
            seconds = json.load(file)
    print(f"calibration (2 threads), load average before: {load()}", flush=True)
    paths = {}
    for name in args.data_sets:
        path = data_file(name, args.data)
        if path is None:
            print(f"  {name}: data not found, skipped")
            continue
        paths[name] = path
        for variant in args.variants:
            if variant not in seconds.setdefault(name, {}):
                seconds[name][variant] = epoch_time(name, path, variant, root)
                with open(calibration_file, "w") as file:
                    json.dump(seconds, file, indent=1)
        line = ", ".join(f"{v} {seconds[name][v]:.2f} s" for v in args.variants)
        print(f"  {name}: seconds per epoch: {line}", flush=True)
    print(f"  load average after: {load()}", flush=True)
    if args.calibrate_only:
        return

    # (label, data set, variant, epochs, folder)
    jobs = []
    labels = []
    for budget in args.budgets:
        label = f"budget {budget:g} min (2 threads)"
        labels.append(label)
        for name in paths:
            for variant in args.variants:
                epochs = max(1, int(budget * 60 / seconds[name][variant]))
                folder = os.path.join(root, f"budget-{budget:g}", name, variant)
                jobs.append((label, name, variant, epochs, folder))
    for count in args.epochs:
        label = f"{count} epochs each"
        labels.append(label)
        for name in paths:
            for variant in args.variants:
                folder = os.path.join(root, f"epochs-{count}", name, variant)
                jobs.append((label, name, variant, count, folder))

    results: Dict[Tuple[str, str, str], Dict] = {}

    def finished(job) -> bool:
        return os.path.exists(os.path.join(job[4], "result.json"))

    pending = [job for job in jobs if not finished(job)]
    if args.jobs == 1:
        for job in pending:
            label, name, variant, epochs, folder = job
            run_training(options_for(name, paths[name], variant, epochs), folder, 2)
    else:
        running: List[Tuple[subprocess.Popen, tuple]] = []
        while pending or running:
            while pending and len(running) < args.jobs:
                job = pending.pop(0)
                label, name, variant, epochs, folder = job
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, "options.json"), "w") as file:
                    json.dump(options_for(name, paths[name], variant, epochs), file)
                log = open(os.path.join(folder, "log.txt"), "w")
                process = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--train-one", folder],
                    stdout=log,
                    stderr=log,
                    env=dict(os.environ, OMP_NUM_THREADS="1"),
                )
                running.append((process, job))
            time.sleep(5)
            for process, job in list(running):
                if process.poll() is not None:
                    running.remove((process, job))
                    if process.returncode != 0:
                        print(f"  failed: {job[1]} {job[2]} (see {job[4]}/log.txt)")
    for job in jobs:
        label, name, variant, epochs, folder = job
        if finished(job):
            with open(os.path.join(folder, "result.json")) as file:
                results[(label, name, variant)] = dict(json.load(file), epochs=epochs)

    for label in labels:
        print(f"\n{label}: test RMSE (epochs in brackets)")
        for name in paths:
            rows = {
                v: results[(label, name, v)]
                for v in args.variants
                if (label, name, v) in results
            }
            if not rows:
                continue
            columns = sorted(
                {
                    k
                    for r in rows.values()
                    for k in r["test_errors"]
                    if not k.startswith("mae:") and k != "loss" and "per_atom" not in k
                }
            )
            print(f"  {name}")
            print(
                "    "
                + f"{'variant':12s}"
                + "".join(f"{c[-28:]:>30s}" for c in columns)
            )
            for variant, row in rows.items():
                cells = []
                for column in columns:
                    value = row["test_errors"].get(column)
                    best = min(
                        r["test_errors"].get(column, float("inf"))
                        for r in rows.values()
                    )
                    mark = "*" if value is not None and value == best else " "
                    cells.append(
                        f"{value:29.4g}{mark}" if value is not None else f"{'':30s}"
                    )
                print(
                    f"    {variant + ' (' + str(row['epochs']) + ')':12s}"
                    + "".join(cells)
                )
    print(f"\nruns in {root}")


if __name__ == "__main__":
    main()
