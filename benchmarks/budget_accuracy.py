"""Accuracy at equal wall-clock budget: symatomic's ``--time-limit`` run (``auto``),
each of its variants, metatrain's PET and SOAP-BPNN and MACE, trained side by side.

Models (each gets the same budget, one thread, two runs at a time with ``--jobs 2``):

* ``auto``: ``symatomic train --time-limit B`` with no model options (what a user
  gets: ``backbone: auto`` probes the candidates on the data, the winner trains for
  the rest of the limit);
* ``pet``, ``pet-small``, ``soap``: the same with the backbone (and size) given;
* ``mtt-pet``, ``mtt-soap-bpnn``: ``mtt train`` with metatrain's defaults; metatrain
  has no time limit, so its seconds per epoch are measured first (a 4-epoch run under
  the same conditions, from the timestamps of its log) and it trains for as many
  epochs as fit the budget after its start-up;
* ``mace``: MACE (mace-torch, ``ScaleShiftMACE`` with 128x0e, 2 interactions,
  max_ell 3, correlation 3, r_max 5 Å), energies and forces only, trained by
  :func:`peers.train_mace` for the budget (Adam, cosine over the epochs that fit,
  the best validation epoch kept).

Data sets, split with ``numpy.random.default_rng(0).permutation`` (validation, test,
the rest for training). Tensors are given to every model as the same spherical blocks
(μ: λ=1; α: λ=0, λ=2; β: λ=1, λ=3); energies with forces (no stress):

* ``water_monomer``, ``water_dimer``: μ, α, β; 100/200 of 1000;
* ``qm7x_chno``: μ, α; 10/20 of 100; ``qm7x_polarizability``: α; 10/20 of 100;
* ``methane``: energy + forces; 10/20 of 100;
* ``example``: the bundled water clusters: energy + forces, μ, α, β; 30/30 of 300;
  ``example_ef``: the same, energy + forces only (what MACE is trained on);
* ``methanol_liquid``: periodic boxes of 16 methanol molecules, GFN1-xTB energies
  and forces (``benchmarks/data/methanol_liquid.xyz``, made by
  ``scripts/make_liquid_data.py``); 20/20 of 200;
* ``water_liquid``: the same for liquid water (32 molecules), a set not used while
  tuning (``--water-liquid FILE``, made by ``scripts/make_liquid_data.py --liquid
  water``); 20/20.

Test RMSE: energies per atom (meV/atom), forces (meV/Å), tensor blocks in the data's
units, all from the exported models through the same code
(:func:`symatomic.io.predict`). The load average is printed before and after.

    python benchmarks/budget_accuracy.py --budgets 5 [30] [--data-sets ...]
        [--models ...] [--jobs 2] [--keep folder] [--water-liquid FILE]
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from typing import Dict, List, Optional, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from training import SHARED, load  # noqa: E402

from symatomic.model_options import SMALL_PET_SIZES  # noqa: E402

#: symatomic variants: name → architecture.model (empty: everything auto)
OURS: Dict[str, Dict] = {
    "auto": {},
    "pet": {"backbone": "pet"},
    "pet-small": dict(SMALL_PET_SIZES, backbone="pet"),
    "soap": {"backbone": "soap"},
}
METATRAIN = {"mtt-pet": "pet", "mtt-soap-bpnn": "soap_bpnn"}
MODELS = list(OURS) + list(METATRAIN) + ["mace"]

#: Cartesian key → (rank, blocks kept as (λ, σ))
TENSORS = {
    "mu": (1, [(1, 1)]),
    "alpha": (2, [(0, 1), (2, 1)]),
    "beta": (3, [(1, 1), (3, 1)]),
}

#: name → (file, tensors {file key: name}, energy?, (n_validation, n_test))
DATA_SETS: Dict[str, Tuple[str, Dict[str, str], bool, Tuple[int, int]]] = {
    "water_monomer": (
        "water_monomer_1000.xyz",
        {"mu": "mu", "alpha": "alpha", "beta": "beta"},
        False,
        (100, 200),
    ),
    "water_dimer": (
        "water_dimer_1000.xyz",
        {"mu": "mu", "alpha": "alpha", "beta": "beta"},
        False,
        (100, 200),
    ),
    "qm7x_chno": (
        "qm7x_chno_100_mu_alpha.xyz",
        {"mu": "mu", "alpha": "alpha"},
        False,
        (10, 20),
    ),
    "qm7x_polarizability": (
        "qm7x_100_polarizability.xyz",
        {"polarizability": "alpha"},
        False,
        (10, 20),
    ),
    "methane": ("methane_100.xyz", {}, True, (10, 20)),
    "example": (
        "example",
        {"dipole": "mu", "polarizability": "alpha", "hyperpolarizability": "beta"},
        True,
        (30, 30),
    ),
    "example_ef": ("example", {}, True, (30, 30)),
    "methanol_liquid": ("methanol_liquid", {}, True, (20, 20)),
    "water_liquid": ("water_liquid", {}, True, (20, 20)),
}


def data_file(name: str, args: argparse.Namespace) -> Optional[str]:
    file = DATA_SETS[name][0]
    if file == "example":
        from symatomic.cli import example_options_path

        path = os.path.join(
            os.path.dirname(example_options_path()), "water_clusters.xyz"
        )
    elif file == "methanol_liquid":
        path = os.path.join(HERE, "data", "methanol_liquid.xyz")
    elif file == "water_liquid":
        path = args.water_liquid or ""
    else:
        path = os.path.join(args.data, file)
    return path if path and os.path.exists(path) else None


def block_name(key: str, o3_lambda: int) -> str:
    return f"{key}_l{o3_lambda}"


def prepare(name: str, path: str, folder: str) -> Dict[str, List]:
    """Split a data set into train/validation/test files, tensors as spherical
    blocks; returns the structures of each part."""
    import ase.io
    import torch

    from symatomic.o3 import CartesianDecomposition

    _, tensors, energy, (n_validation, n_test) = DATA_SETS[name]
    frames = ase.io.read(path, ":")
    for atoms in frames:
        if not np.any(atoms.cell.array):  # the water files: zero lattice, pbc=True
            atoms.pbc = False
        for key, short in tensors.items():
            rank, blocks = TENSORS[short]
            values = torch.tensor(np.asarray(_value(atoms, key), dtype=np.float64))
            decomposition = CartesianDecomposition(rank, symmetric=True)
            spherical = dict(
                zip(
                    decomposition.irreps,
                    decomposition.to_spherical(values.reshape([1] + [3] * rank + [1])),
                )
            )
            for o3_lambda, o3_sigma in blocks:
                block = spherical[(o3_lambda, o3_sigma)].reshape(-1).numpy()
                atoms.info[block_name(short, o3_lambda)] = block
    order = np.random.default_rng(0).permutation(len(frames))
    parts = {
        "validation": order[:n_validation],
        "test": order[n_validation : n_validation + n_test],
        "train": order[n_validation + n_test :],
    }
    result = {}
    for part, indices in parts.items():
        selected = [frames[i] for i in indices]
        ase.io.write(os.path.join(folder, f"{part}.xyz"), selected, format="extxyz")
        result[part] = selected
    return result


def _value(atoms, key: str):
    """``atoms.info[key]``, or the result of ASE's single-point calculator (ASE
    moves ``energy``, ``forces``, ``dipole``… of extended XYZ files there)."""
    if key in atoms.info:
        return atoms.info[key]
    if atoms.calc is not None and key in atoms.calc.results:
        return atoms.calc.results[key]
    raise KeyError(f"no '{key}' in a structure")


def targets_section(name: str, file: str) -> Dict:
    _, tensors, energy, _ = DATA_SETS[name]
    targets: Dict = {}
    if energy:
        targets["energy"] = {
            "read_from": file,
            "key": "energy",
            "unit": "eV",
            "forces": {"read_from": file, "key": "forces"},
            "stress": False,
        }
    for short in tensors.values():
        for o3_lambda, o3_sigma in TENSORS[short][1]:
            block = block_name(short, o3_lambda)
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


def options(name: str, folder: str, architecture: Dict) -> Dict:
    """A metatrain-layout options file (read by both ``mtt`` and ``symatomic``)."""
    sets = {}
    for part in ("train", "validation", "test"):
        file = os.path.join(folder, f"{part}.xyz")
        sets[part] = {
            "systems": {"read_from": file, "length_unit": "angstrom"},
            "targets": targets_section(name, file),
        }
    return {
        "seed": 0,
        "base_precision": 32,
        "architecture": architecture,
        "training_set": sets["train"],
        "validation_set": sets["validation"],
        "test_set": sets["test"],
    }


def _environment() -> Dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _run(command: List[str], folder: str, log_name: str = "train.log") -> float:
    start = time.perf_counter()
    with open(os.path.join(folder, log_name), "w") as log:
        subprocess.run(
            command, cwd=folder, check=True, stdout=log, stderr=log, env=_environment()
        )
    return time.perf_counter() - start


def train_ours(name: str, data: str, folder: str, variant: str, budget: float) -> str:
    import yaml

    architecture = {
        "name": "pet",
        "model": copy.deepcopy(OURS[variant]),
        "training": {"time_limit": f"{budget * 60:.0f}s"},
    }
    with open(os.path.join(folder, "options.yaml"), "w") as file:
        yaml.safe_dump(options(name, data, architecture), file)
    command = [sys.executable, "-m", "symatomic", "train", "options.yaml"]
    _run(command + ["-o", "run", "--no-progress"], folder)
    return os.path.join(folder, "run", "model.pt")


def _mtt_options(name: str, data: str, kind: str, epochs: int) -> Dict:
    architecture = {"name": kind, "training": {"num_epochs": epochs, "log_interval": 1}}
    return options(name, data, architecture)


def _epoch_seconds(log: str) -> Optional[float]:
    """Seconds per epoch from the timestamps (one-second resolution) of a metatrain
    log: from the first to the last epoch line, divided by the epochs between;
    ``None`` when they are too close to tell."""
    epochs = []
    with open(log) as file:
        for line in file:
            if "Epoch" not in line:
                continue
            try:
                epochs.append(datetime.strptime(line[1:20], "%Y-%m-%d %H:%M:%S"))
            except ValueError:
                continue
    if len(epochs) < 2:
        return None
    span = (epochs[-1] - epochs[0]).total_seconds()
    if span < 5:
        return None
    return span / (len(epochs) - 1)


def _calibrate_metatrain(
    name: str, data: str, folder: str, kind: str, budget: float
) -> Tuple[float, float]:
    """Seconds per epoch and fixed seconds (start-up, evaluation, export) of ``mtt
    train`` on this data set, under the benchmark's conditions: a 1-epoch run
    (when it takes longer than the budget, the model gets one epoch), a 3-epoch
    run, and a 30-epoch one when its epochs are too fast to time from the log."""
    import yaml

    def run(epochs: int) -> Tuple[float, Optional[float]]:
        calibration = os.path.join(folder, f"calibration-{epochs}")
        os.makedirs(calibration, exist_ok=True)
        with open(os.path.join(calibration, "options.yaml"), "w") as file:
            yaml.safe_dump(_mtt_options(name, data, kind, epochs), file)
        wall = _run(
            [sys.executable, "-m", "metatrain", "train", "options.yaml"]
            + ["-o", "model.pt"],
            calibration,
        )
        logs = [
            os.path.join(root, f)
            for root, _, files in os.walk(calibration)
            for f in files
            if f == "train.log"
        ]
        return wall, _epoch_seconds(max(logs, key=os.path.getsize))

    one, _ = run(1)
    if one > budget * 60:
        # one epoch (with the start-up) is longer than the budget: it gets one
        return one, 0.0
    short, per_epoch = run(3)
    if per_epoch is None:
        long, _ = run(30)
        per_epoch = max((long - short) / 27, 1e-3)
    return per_epoch, max(0.0, short - 3 * per_epoch)


def train_metatrain(
    name: str, data: str, folder: str, model: str, budget: float
) -> str:
    import yaml

    kind = METATRAIN[model]
    per_epoch, overhead = _calibrate_metatrain(name, data, folder, kind, budget)
    epochs = max(1, int((budget * 60 - overhead) / per_epoch))
    with open(os.path.join(folder, "options.yaml"), "w") as file:
        yaml.safe_dump(_mtt_options(name, data, kind, epochs), file)
    with open(os.path.join(folder, "plan.json"), "w") as file:
        json.dump(
            {"seconds_per_epoch": per_epoch, "overhead": overhead, "epochs": epochs},
            file,
        )
    seconds = _run(
        [sys.executable, "-m", "metatrain", "train", "options.yaml", "-o", "model.pt"],
        folder,
    )
    with open(os.path.join(folder, "seconds.json"), "w") as file:
        json.dump({"seconds": seconds}, file)
    return os.path.join(folder, "model.pt")


def evaluate(model_path: str, frames: List, names: List[str], energy: bool) -> Dict:
    """Test RMSE of an exported metatomic model: energy per atom and forces (meV),
    tensor blocks (the data's units); and its number of parameters."""
    import torch
    from metatomic.torch import load_atomistic_model

    import symatomic.io

    folder = os.path.dirname(model_path)
    extensions = os.path.join(folder, "extensions")
    model = load_atomistic_model(
        model_path,
        extensions_directory=extensions if os.path.isdir(extensions) else None,
    )
    errors: Dict[str, float] = {}
    blocks = [n for n in names if n != "energy"]
    if blocks:
        predictions = symatomic.io.predict(model, frames, outputs=blocks, forces=False)
        for name in blocks:
            key = name[len("mtt::") :]
            predicted = predictions[name].block().values.reshape(len(frames), -1)
            reference = torch.tensor(
                np.stack([np.asarray(a.info[key]).reshape(-1) for a in frames])
            )
            errors[key] = float(((predicted - reference) ** 2).mean().sqrt())
    if energy:
        predictions = symatomic.io.predict(
            model, frames, outputs=["energy"], forces=True, stress=False
        )
        block = predictions["energy"].block()
        energies = block.values.reshape(-1).detach().numpy()
        forces = -block.gradient("positions").values.reshape(-1, 3).detach().numpy()
        errors.update(_energy_errors(frames, energies, forces))
    errors["parameters"] = sum(p.numel() for p in model.parameters())
    return errors


def _energy_errors(frames: List, energies: np.ndarray, forces: np.ndarray) -> Dict:
    sys.path.insert(0, HERE)
    from peers import reference_energy, reference_forces

    n_atoms = np.array([len(a) for a in frames])
    reference = np.array([reference_energy(a) for a in frames])
    forces_reference = np.concatenate([reference_forces(a) for a in frames])
    return {
        "E/atom (meV)": 1000
        * float(np.sqrt(np.mean(((energies - reference) / n_atoms) ** 2))),
        "F (meV/Å)": 1000 * float(np.sqrt(np.mean((forces - forces_reference) ** 2))),
    }


def train_mace_job(data: str, folder: str, budget: float) -> Dict:
    import ase.io

    sys.path.insert(0, HERE)
    from peers import evaluate_mace, train_mace

    parts = {
        p: ase.io.read(os.path.join(data, f"{p}.xyz"), ":")
        for p in ("train", "validation", "test")
    }
    model, report = train_mace(parts["train"], parts["validation"], budget * 60)
    energies, forces = evaluate_mace(model, parts["test"])
    errors = _energy_errors(parts["test"], energies, forces)
    errors["parameters"] = sum(p.numel() for p in model.parameters())
    errors["epochs"] = report["epochs"]
    return errors


def run_job(job: Dict) -> Dict:
    """Train and evaluate one (data set, model, budget); the result is written to
    ``<folder>/result.json``."""
    import ase.io

    name, model, budget, folder, data = (
        job["data_set"],
        job["model"],
        job["budget"],
        job["folder"],
        job["data"],
    )
    os.makedirs(folder, exist_ok=True)
    energy = DATA_SETS[name][2]
    names = list(targets_section(name, "").keys())
    start = time.perf_counter()
    if model == "mace":
        errors = train_mace_job(data, folder, budget)
    else:
        if model in OURS:
            path = train_ours(name, data, folder, model, budget)
        else:
            path = train_metatrain(name, data, folder, model, budget)
        test = ase.io.read(os.path.join(data, "test.xyz"), ":")
        for atoms in test:
            if not np.any(atoms.cell.array):
                atoms.pbc = False
        errors = evaluate(path, test, names, energy)
        errors.update(_details(model, folder))
    errors["wall (s)"] = time.perf_counter() - start
    with open(os.path.join(folder, "result.json"), "w") as file:
        json.dump(errors, file, indent=1)
    return errors


def _details(model: str, folder: str) -> Dict:
    """Epochs and, for ``auto``, the chosen backbone, from the run's files."""
    details: Dict = {}
    if model in OURS:
        log = os.path.join(folder, "run", "train.log")
        epochs = 0
        with open(log) as file:
            for line in file:
                if "| loss" in line and "epoch" in line:
                    epochs += 1
                if "backbone: auto ->" in line:
                    details["choice"] = line.split("->")[1].split()[0]
                if "time (limit" in line:
                    details["seconds"] = float(line.split(";")[-1].split()[0])
        details["epochs"] = epochs
    else:
        with open(os.path.join(folder, "plan.json")) as file:
            details["epochs"] = json.load(file)["epochs"]
        with open(os.path.join(folder, "seconds.json")) as file:
            details["seconds"] = json.load(file)["seconds"]
    return details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=SHARED)
    parser.add_argument("--data-sets", nargs="+", default=list(DATA_SETS))
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--budgets", type=float, nargs="+", default=[5.0])
    parser.add_argument("--jobs", type=int, default=2, choices=[1, 2])
    parser.add_argument("--keep", default=None)
    parser.add_argument("--water-liquid", default=None, help="water_liquid data file")
    parser.add_argument(
        "--print-only", action="store_true", help="print the tables of the runs done"
    )
    parser.add_argument("--rst", action="store_true", help="tables for docs/heads.rst")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        with open(args.run_one) as file:
            run_job(json.load(file))
        return

    root = args.keep or tempfile.mkdtemp(prefix="budget-")
    print(f"runs in {root}; load average before: {load()}", flush=True)
    jobs = []
    for name in args.data_sets:
        path = data_file(name, args)
        if path is None:
            print(f"  {name}: data not found, skipped")
            continue
        data = os.path.join(root, name, "data")
        if not os.path.exists(os.path.join(data, "test.xyz")):
            os.makedirs(data, exist_ok=True)
            prepare(name, path, data)
        for budget in args.budgets:
            for model in args.models:
                if model == "mace" and not DATA_SETS[name][2]:
                    continue
                folder = os.path.join(root, name, f"{budget:g}min", model)
                jobs.append(
                    {
                        "data_set": name,
                        "model": model,
                        "budget": budget,
                        "folder": folder,
                        "data": data,
                    }
                )

    def done(job: Dict) -> bool:
        return os.path.exists(os.path.join(job["folder"], "result.json"))

    pending = [] if args.print_only else [job for job in jobs if not done(job)]
    running: List[Tuple[subprocess.Popen, Dict]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            job = pending.pop(0)
            os.makedirs(job["folder"], exist_ok=True)
            job_file = os.path.join(job["folder"], "job.json")
            with open(job_file, "w") as file:
                json.dump(job, file)
            log = open(os.path.join(job["folder"], "job.log"), "w")
            process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--run-one", job_file],
                stdout=log,
                stderr=log,
                env=_environment(),
            )
            running.append((process, job))
        time.sleep(2)
        for process, job in list(running):
            if process.poll() is not None:
                running.remove((process, job))
                status = "done" if process.returncode == 0 else "FAILED"
                print(
                    f"  {status}: {job['data_set']} {job['model']} {job['budget']:g} min"
                    f" (load {load()})",
                    flush=True,
                )
    print(f"load average after: {load()}")
    print_tables(jobs, args.rst)


def mean_baseline(name: str, data: str) -> Dict[str, float]:
    """Test RMSE of predicting the training mean: energy per atom (meV/atom),
    zero forces (meV/Å), the mean of every tensor block."""
    import ase.io

    parts = {
        p: ase.io.read(os.path.join(data, f"{p}.xyz"), ":") for p in ("train", "test")
    }
    errors: Dict[str, float] = {}
    _, tensors, energy, _ = DATA_SETS[name]
    if energy:
        sys.path.insert(0, HERE)
        from peers import reference_energy, reference_forces

        def per_atom(frames):
            return np.array([reference_energy(a) / len(a) for a in frames])

        mean = per_atom(parts["train"]).mean()
        test = per_atom(parts["test"])
        errors["E/atom (meV)"] = 1000 * float(np.sqrt(np.mean((test - mean) ** 2)))
        forces = np.concatenate([reference_forces(a) for a in parts["test"]])
        errors["F (meV/Å)"] = 1000 * float(np.sqrt(np.mean(forces**2)))
    for short in tensors.values():
        for o3_lambda, _ in TENSORS[short][1]:
            key = block_name(short, o3_lambda)

            def values(frames, key=key):
                return np.stack([np.asarray(a.info[key]).reshape(-1) for a in frames])

            mean = values(parts["train"]).mean(axis=0)
            errors[key] = float(np.sqrt(np.mean((values(parts["test"]) - mean) ** 2)))
    return errors


def print_tables(jobs: List[Dict], rst: bool = False) -> None:
    groups: Dict[Tuple[str, float], List[Tuple[str, Dict]]] = {}
    for job in jobs:
        result = os.path.join(job["folder"], "result.json")
        if os.path.exists(result):
            key = (job["data_set"], job["budget"])
            if key not in groups:
                groups[key] = [("training mean", mean_baseline(*key[:1], job["data"]))]
            with open(result) as file:
                groups[key].append((job["model"], json.load(file)))
    skip = {"parameters", "epochs", "wall (s)", "choice", "seconds"}
    for (name, budget), rows in groups.items():
        columns = sorted({k for _, r in rows for k in r if k not in skip})
        if rst:
            _print_rst(name, budget, rows, columns)
            continue
        print(f"\n{name}, {budget:g} min: test RMSE (* best)")
        print(
            f"  {'model':18s}{'params':>9s}{'epochs':>7s}{'s':>6s}"
            + "".join(f"{c:>14s}" for c in columns)
        )
        for model, row in rows:
            label = model + (f" ({row['choice']})" if "choice" in row else "")
            cells = []
            for column in columns:
                value = row.get(column)
                best = min(r.get(column, float("inf")) for _, r in rows)
                mark = "*" if value is not None and value == best else " "
                cells.append(f"{value:13.4g}{mark}" if value is not None else " " * 14)
            print(
                f"  {label:18s}{int(row.get('parameters', 0)):9d}"
                f"{int(row.get('epochs', 0)):7d}{row.get('seconds', 0.0):6.0f}"
                + "".join(cells)
            )


def _print_rst(name: str, budget: float, rows: List, columns: List[str]) -> None:
    """A list-table of docs/heads.rst (best of each column in bold)."""
    print(f"\n.. list-table:: {name}, {budget:g} minutes: test RMSE")
    print("   :header-rows: 1\n")
    header = ["model", "parameters", "epochs", "seconds"] + columns
    print(
        "\n".join(
            ("   * - " if i == 0 else "     - ") + h for i, h in enumerate(header)
        )
    )
    for model, row in rows:
        label = model + (f" (→ {row['choice']})" if "choice" in row else "")
        cells = [
            label,
            f"{row['parameters'] / 1e6:.2f} M" if "parameters" in row else "–",
            str(row.get("epochs", "–")),
            f"{row['seconds']:.0f}" if "seconds" in row else "–",
        ]
        for column in columns:
            value = row.get(column)
            best = min(
                r.get(column, float("inf")) for m, r in rows if m != "training mean"
            )
            text = f"{value:.3g}" if value is not None else "–"
            cells.append(f"**{text}**" if value is not None and value == best else text)
        print(
            "\n".join(
                ("   * - " if i == 0 else "     - ") + c for i, c in enumerate(cells)
            )
        )


if __name__ == "__main__":
    main()
