"""The cost of exact symmetry: symatomic's default against plain PET, metatrain's
PET, MACE-small, the SOAP backbone and PET with ECSE frames.

Every model has metatrain's default PET sizes where it is a PET (d_pet 128, d_node
256, 8 heads, 2 GNN x 2 attention layers, cutoff 4.5 Å), untrained weights (the cost
does not depend on them), one energy output, float32, and is evaluated the way MD
engines do: energy + forces by autograd, neighbor lists computed inside the timed
call, calls alternating between the models, 2 threads, in one process. Printed:

* the main table on a 648-atom water box (1 g/cm³) and a rattled 512-atom silicon
  crystal: median time, ratio to metatrain's PET and to our plain PET
  (``ecse: none``: the same PET with Cartesian inputs, approximately equivariant),
  ECSE frames per atom (before mirror images), peak memory (resident set size of a
  fresh process that builds the model and evaluates it once), and the equivariance
  error of energy and forces after a random rotation with inversion and a random
  permutation, in float64 and float32 (max |F' - R F| / max |F|, and for float32
  also the root mean square ratio ‖F' - R F‖ / ‖F‖);
* the scaling of the default and of plain PET with the number of atoms (water boxes
  of 192 to 3,000 atoms): time per atom and the fitted exponent of ``t ∝ N^b``;
* a dense cell: 81 atoms (27 waters) in a 6 Å periodic box, ~140 neighbors per atom
  within the cutoff: peak memory of energy + forces.

    python benchmarks/ecse_cost.py [--repeats 5] [--threads 2] [--skip-scaling]
        [--skip-dense] [--only water] [--symmetrizers] [--tuned-allocator]

``--symmetrizers`` also times the ways to make a trained plain PET exact afterwards
(global ECSE, metatomic's ``SymmetrizedModel``) on a QM7-X molecule.

mace-torch is optional (a benchmark-only peer, see ``peers.py``); without it the
MACE row says why it is missing. The load of the machine (``uptime``) is printed
before and after: compare ratios, not seconds.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import ase
import ase.io
import numpy as np
import torch
from metatomic.torch.o3 import random_transformations
from peers import mace_available, mace_energy_and_forces, mace_model
from pet_speed import energy_and_forces, metatrain_pet
from systems import silicon_512, water_box

from symatomic.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD, tune_allocator
from symatomic.data import compute_neighbors, structure_from_atoms
from symatomic.data.targets import parse_target_options
from symatomic.ecse import ECSE_DEFAULTS, ECSEFrames, frames_per_group
from symatomic.model import SymatomicModel
from symatomic.pet import PET_DEFAULT_HYPERS, PET_SIZE_KEYS

#: metatrain's default PET sizes (equal to symatomic's PET defaults)
PET_SIZES = {key: PET_DEFAULT_HYPERS[key] for key in PET_SIZE_KEYS}

#: name → architecture.model of our variants (``None`` marks peers)
VARIANTS: Dict[str, Optional[dict]] = {
    "symatomic default": {},
    "symatomic ecse: none (plain PET)": {"ecse": "none"},
    "symatomic ECSE local, frame_layers 1": {
        "ecse": {"mode": "local", "frame_layers": 1}
    },
    "metatrain PET": None,
    "MACE-small": None,
    "symatomic backbone: soap": {"backbone": "soap"},
}
PLAIN = "symatomic ecse: none (plain PET)"
METATRAIN = "metatrain PET"


def dense_cell(seed: int = 0) -> ase.Atoms:
    """27 water molecules in a 6 Å periodic box (3.75x the density of water), on a
    grid with random orientations."""
    rng = np.random.default_rng(seed)
    monomer = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.2400, 0.9266, 0.0]])
    positions = []
    for index in np.ndindex(3, 3, 3):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        w, x, y, z = q
        rotation = np.array(
            [
                [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
            ]
        )
        positions.extend((np.array(index) + 0.5) * 2.0 + monomer @ rotation.T)
    return ase.Atoms(
        numbers=[8, 1, 1] * 27, positions=positions, cell=[6.0] * 3, pbc=True
    )


SYSTEMS: Dict[str, Callable[[], ase.Atoms]] = {
    "water": water_box,
    "silicon": silicon_512,
    "dense": dense_cell,
}


def uptime() -> str:
    try:
        with open("/proc/loadavg") as file:
            return "load average " + " ".join(file.read().split()[:3])
    except OSError:  # pragma: no cover - not Linux
        return "load average unknown"


def build(name: str, types: List[int], dtype: torch.dtype):
    """An exported model (or a MACE module) and the closure timing it."""
    if name == METATRAIN:
        return metatrain_pet(types, dtype)[0]
    if name == "MACE-small":
        return mace_model(types, dtype)
    hypers = dict(VARIANTS[name])
    if hypers.get("backbone") != "soap":
        hypers = dict(PET_SIZES, **hypers)
    spec = {"energy": parse_target_options("energy", {"unit": "eV"}, "")}
    torch.manual_seed(0)
    model = SymatomicModel(hypers, types, spec).to(dtype)
    # non-trivial outputs: the composition baseline would hide the model
    model.readouts["energy"].scale.fill_(1.0)
    return model.export()


def runner(name: str, model, atoms: ase.Atoms) -> Callable[[], torch.Tensor]:
    if name == "MACE-small":
        return mace_energy_and_forces(model, atoms)
    return energy_and_forces(model, atoms)


def frames_per_atom(atoms: ase.Atoms) -> float:
    """ECSE frames per atom with the local defaults, before mirror images."""
    structure = structure_from_atoms(atoms, "x")
    compute_neighbors(structure, PET_SIZES["cutoff"])
    n = len(structure)
    frames = ECSEFrames(PET_SIZES["cutoff"], **ECSE_DEFAULTS)(
        structure.centers, structure.pair_vectors(), n, torch.arange(n), n
    )
    return float(frames_per_group(frames, n).double().mean())


def _forces(name: str, model, atoms: ase.Atoms, dtype: torch.dtype) -> np.ndarray:
    if name == "MACE-small":
        return mace_energy_and_forces(model, atoms)().detach().double().numpy()
    run = energy_and_forces(model, atoms, dtype)
    return run().detach().double().numpy()


def equivariance_error(name: str, model, atoms, dtype: torch.dtype, seed: int):
    """max |F(Q x) - Q F(x)| / max |F| for a random O(3) operation Q (with
    inversion) and a random permutation."""
    generator = torch.Generator().manual_seed(seed)
    rotation = random_transformations(
        1,
        0,
        device=torch.device("cpu"),
        dtype=torch.float64,
        add_inversions=True,
        generator=generator,
    ).matrices[0]
    rotation = (-rotation if seed % 2 else rotation).numpy()
    permutation = np.random.default_rng(seed).permutation(len(atoms))
    moved = atoms.copy()
    moved.positions = atoms.positions @ rotation.T
    moved.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
    moved = moved[permutation]
    first = _forces(name, model, atoms, dtype)
    second = _forces(name, model, moved, dtype)
    expected = (first @ rotation.T)[permutation]
    difference = expected - second
    return (
        float(np.abs(difference).max() / np.abs(first).max()),
        float(np.sqrt((difference**2).mean() / (first**2).mean())),
    )


def peak_memory(name: str, system: str, threads: int) -> str:
    """Peak RSS (GB) of a fresh process building ``name`` and evaluating energy and
    forces on ``system`` once."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-of",
        name,
        "--memory-system",
        system,
        "--threads",
        str(threads),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return "failed: " + (lines[-1] if lines else f"exit {result.returncode}")
    return f"{json.loads(result.stdout.strip().splitlines()[-1]):.2f} GB"


def _measure_memory(name: str, system: str) -> None:
    atoms = SYSTEMS[system]()
    types = sorted(set(atoms.numbers.tolist()))
    model = build(name, types, torch.float32)
    runner(name, model, atoms)()
    # VmHWM, not getrusage's ru_maxrss: the latter starts from the RSS of the
    # parent at fork time
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmHWM:"):
                print(json.dumps(int(line.split()[1]) / 1024**2))  # kB → GB
                return
    raise RuntimeError("no VmHWM in /proc/self/status")


def time_models(
    runs: Dict[str, Callable[[], torch.Tensor]], repeats: int
) -> Dict[str, float]:
    for run in runs.values():
        run()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main_table(label: str, atoms: ase.Atoms, args) -> None:
    types = sorted(set(atoms.numbers.tolist()))
    missing = mace_available()
    names = [n for n in VARIANTS if not (n == "MACE-small" and missing)]
    models = {name: build(name, types, torch.float32) for name in names}
    runs = {name: runner(name, models[name], atoms) for name in names}
    medians = time_models(runs, args.repeats)
    n_frames = frames_per_atom(atoms)
    print(f"\n{label} ({len(atoms)} atoms), {uptime()}")
    header = (
        f"  {'model':38s} {'time (s)':>8s} {'/mtt PET':>8s} {'/plain':>7s} "
        f"{'frames':>6s} {'peak RSS':>9s} {'F err f64':>9s} {'F err f32':>9s} "
        f"{'f32 RMS':>8s}"
    )
    print(header)
    for name in names:
        frames = n_frames if "ECSE" in name else 0.0
        memory = peak_memory(name, args.system_key, args.threads)
        model64 = build(name, types, torch.float64)
        error64 = max(
            equivariance_error(name, model64, atoms, torch.float64, s)[0]
            for s in (1, 2)
        )
        errors32 = [
            equivariance_error(name, models[name], atoms, torch.float32, s)
            for s in (1, 2)
        ]
        error32 = max(e[0] for e in errors32)
        rms32 = max(e[1] for e in errors32)
        print(
            f"  {name:38s} {medians[name]:8.3f} "
            f"{medians[name] / medians[METATRAIN]:8.2f} "
            f"{medians[name] / medians[PLAIN]:7.2f} {frames:6.2f} {memory:>9s} "
            f"{error64:9.1e} {error32:9.1e} {rms32:8.1e}"
        )
    if missing:
        print(f"  MACE-small: not timed: {missing}")
    print(f"  after: {uptime()}")


def scaling_table(args) -> None:
    names = ["symatomic default", PLAIN]
    print(f"\nscaling with the number of atoms (water boxes), {uptime()}")
    print(f"  {'atoms':>6s} " + " ".join(f"{n[:32]:>34s}" for n in names))
    sizes: List[int] = []
    per_atom: Dict[str, List[float]] = {name: [] for name in names}
    for n_side in (4, 6, 8, 10):
        atoms = water_box(n_side)
        models = {name: build(name, [1, 8], torch.float32) for name in names}
        runs = {name: runner(name, models[name], atoms) for name in names}
        medians = time_models(runs, max(3, args.repeats // 2))
        sizes.append(len(atoms))
        cells = []
        for name in names:
            per_atom[name].append(medians[name] / len(atoms))
            cells.append(
                f"{medians[name]:8.3f} s, {1e3 * medians[name] / len(atoms):6.3f} ms/atom"
            )
        print(f"  {len(atoms):6d} " + " ".join(f"{c:>34s}" for c in cells))
    for name in names:
        exponent = np.polyfit(
            np.log(sizes), np.log(np.array(per_atom[name]) * np.array(sizes)), 1
        )[0]
        print(f"  {name}: t ∝ N^{exponent:.3f}")


def dense_table(args) -> None:
    atoms = dense_cell()
    structure = structure_from_atoms(atoms, "dense")
    compute_neighbors(structure, PET_SIZES["cutoff"])
    neighbors = len(structure.centers) / len(atoms)
    print(
        f"\ndense cell: 81 atoms in a 6 Å box, {neighbors:.0f} neighbors per atom "
        f"within {PET_SIZES['cutoff']} Å, {uptime()}"
    )
    names = ["symatomic default", PLAIN]
    if args.dense_ecse:
        names.append("symatomic ECSE local, frame_layers 1")
    else:
        print(
            f"  ECSE local: {frames_per_atom(atoms):.1f} frames per atom "
            "(not run: --dense-ecse; it took > 10 GB before)"
        )
    for name in names:
        print(f"  {name:38s} peak RSS {peak_memory(name, 'dense', args.threads)}")


def symmetrizers_table(args) -> None:
    """Making a trained plain PET exact afterwards, on a QM7-X molecule: global ECSE
    (``symatomic symmetrize``) and metatomic's grid-averaging ``SymmetrizedModel``
    (its default grid for an energy), against the default and plain PET."""
    from metatomic.torch.o3 import SymmetrizedModel

    from symatomic.symmetrize import symmetrize_model

    path = os.path.join(args.data, "qm7x_chno_100_mu_alpha.xyz")
    if not os.path.exists(path):
        print(f"\nsymmetrizers: skipped ({path} not found)")
        return
    atoms = ase.io.read(path, 0)
    types = sorted(set(atoms.numbers.tolist()))
    plain = build(PLAIN, types, torch.float32)
    models = {
        "symatomic default": build("symatomic default", types, torch.float32),
        PLAIN: plain,
        "global ECSE around plain PET": symmetrize_model(plain),
        "metatomic SymmetrizedModel (plain)": SymmetrizedModel.wrap(plain),
    }
    runs = {name: energy_and_forces(model, atoms) for name, model in models.items()}
    medians = time_models(runs, args.repeats)
    print(f"\nsymmetrizers on a QM7-X molecule ({len(atoms)} atoms), {uptime()}")
    for name in models:
        print(
            f"  {name:38s} {medians[name]:8.3f} s  {medians[name] / medians[PLAIN]:7.2f}"
            " x plain PET"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["water", "silicon"], default=None)
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument(
        "--dense-ecse",
        action="store_true",
        help="also run ECSE local on the dense cell (needs > 10 GB of memory)",
    )
    parser.add_argument(
        "--symmetrizers",
        action="store_true",
        help="also time global ECSE and metatomic's SymmetrizedModel on a molecule",
    )
    parser.add_argument(
        "--data",
        default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"),
    )
    parser.add_argument(
        "--tuned-allocator",
        action="store_true",
        help="keep large freed blocks for reuse, as symatomic's command line does "
        "(symatomic.allocator; glibc's MALLOC_* variables for the memory runs)",
    )
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--memory-system", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tuned_allocator:
        tune_allocator()
        # the same for the fresh processes that measure the peak memory
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
        os.environ["MALLOC_TRIM_THRESHOLD_"] = str(TRIM_THRESHOLD)
    if args.memory_of is not None:
        _measure_memory(args.memory_of, args.memory_system)
        return

    allocator = "tuned" if args.tuned_allocator else "glibc's defaults"
    print(
        f"torch {torch.__version__}, {args.threads} threads, float32 timings, "
        f"allocator: {allocator}"
    )
    for key, label in (("water", "water box"), ("silicon", "silicon crystal")):
        if args.only is not None and key != args.only:
            continue
        args.system_key = key
        main_table(label, SYSTEMS[key](), args)
    if not args.skip_scaling:
        scaling_table(args)
    if not args.skip_dense:
        dense_table(args)
    if args.symmetrizers:
        symmetrizers_table(args)


if __name__ == "__main__":
    main()
