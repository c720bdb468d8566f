"""Helpers that several benchmarks share: training a symatomic model in a
subprocess with its own thread count, the example's PET sizes, the Cartesian
tensor targets of the shared data, where a data set's file is, and the load
average.

    python benchmarks/training.py --train-one FOLDER   (used by run_training)
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, Optional

from symatomic.model_options import SMALL_PET_SIZES

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "data")

#: metatrain's default PET sizes are symatomic's defaults; the example's sizes
#: (those of the small candidate of ``backbone: auto``)
EXAMPLE_SIZES = dict(SMALL_PET_SIZES, num_gnn_layers=2)

#: Cartesian tensor targets of the shared data (options of ``targets:``)
CARTESIAN_TARGETS = {
    "mu": {"key": "mu", "unit": "e*Bohr", "type": {"cartesian": {"rank": 1}}},
    "alpha": {"key": "alpha", "unit": "Bohr^3", "type": {"cartesian": {"rank": 2}}},
    "beta": {"key": "beta", "unit": "", "type": {"cartesian": {"rank": 3}}},
}

#: data set → its file in the shared data
SHARED_FILES = {
    "water_monomer": "water_monomer_1000.xyz",
    "water_dimer": "water_dimer_1000.xyz",
    "qm7x_chno": "qm7x_chno_100_mu_alpha.xyz",
    "qm7x_polarizability": "qm7x_100_polarizability.xyz",
    "methane": "methane_100.xyz",
}


def data_file(name: str, data: str) -> Optional[str]:
    """The file of data set ``name``: the bundled example, or a file of the shared
    data in ``data``; ``None`` when it is absent."""
    if name == "example":
        from symatomic.cli import example_options_path

        return os.path.join(
            os.path.dirname(example_options_path()), "water_clusters.xyz"
        )
    path = os.path.join(data, SHARED_FILES[name])
    return path if os.path.exists(path) else None


def run_training(options: Dict, folder: str, threads: int) -> Dict:
    """Train ``options`` in a subprocess with ``threads`` threads, results in
    ``folder``; returns the test errors, the history and the wall time."""
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


def load() -> str:
    """The load average (1, 5, 15 minutes)."""
    with open("/proc/loadavg") as file:
        return " ".join(file.read().split()[:3])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-one", required=True)
    _train_one(parser.parse_args().train_one)
