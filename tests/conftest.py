"""Shared fixtures: small synthetic data sets with exactly known tensor targets, and
the random seed of every test.

Randomized tests (random rotations, inversions, permutations, structures) draw
fresh values on every run, from generators seeded per test with a fresh seed; a
failing test prints its seed, and ``SYMATOMIC_TEST_SEED=N`` repeats it exactly."""

import os
import random
from typing import List

import ase
import ase.io
import numpy as np
import pytest
import torch

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")

CHARGES = {1: 0.3, 6: -0.2, 8: -0.5}
POLARIZABILITY = {1: 1.0, 6: 5.0, 8: 3.0}

#: plain PET (explicitly: the defaults are exactly equivariant models), small
TINY_MODEL = {
    "backbone": "pet",
    "ecse": "none",
    "cutoff": 3.5,
    "cutoff_width": 0.5,
    "d_pet": 16,
    "d_node": 16,
    "d_head": 16,
    "d_feedforward": 16,
    "num_heads": 2,
    "num_attention_layers": 1,
    "num_gnn_layers": 2,
}

#: a small SOAP backbone (``architecture.model.soap``) for fast tests
SMALL_SOAP = {
    "max_radial": 3,
    "max_angular": 3,
    "n_pseudo_species": 2,
    "d_hidden": 16,
    "d_out": 16,
    "d_pair": 8,
}


def shared_data(name: str) -> str:
    """Path of a file of ``../shared/data``; skips the test when it is absent."""
    path = os.path.normpath(os.path.join(SHARED_DATA, name))
    if not os.path.exists(path):
        pytest.skip(f"shared data file {name} is not available")
    return path


def random_molecule(rng: np.random.Generator, n_atoms: int) -> ase.Atoms:
    """A random molecule of H, C, O with no two atoms closer than 0.9 Å."""
    numbers = rng.choice([1, 6, 8], size=n_atoms)
    positions: List[np.ndarray] = []
    while len(positions) < n_atoms:
        candidate = rng.normal(scale=1.2, size=3)
        if all(np.linalg.norm(candidate - p) > 0.9 for p in positions):
            positions.append(candidate)
    return ase.Atoms(numbers=numbers, positions=np.array(positions))


def synthetic_targets(atoms: ase.Atoms) -> None:
    """Attach exactly equivariant synthetic targets to ``atoms``.

    energy: smooth pair potential; forces: its exact negative gradient; dipole:
    point charges; polarizability: symmetric rank 2; beta: symmetric rank 3;
    charges: per-atom scalars.
    """
    positions = atoms.get_positions()
    centered = positions - positions.mean(axis=0)
    numbers = atoms.numbers
    energy = 0.0
    forces = np.zeros_like(positions)
    for i in range(len(atoms)):
        for j in range(i + 1, len(atoms)):
            d = positions[j] - positions[i]
            r = np.linalg.norm(d)
            e = np.exp(-r) * (1 + 0.1 * numbers[i] * numbers[j] / 64)
            energy += e
            # dE/dr_j = -e * d / r
            forces[j] += e * d / r
            forces[i] -= e * d / r
    energy += sum(-1.0 * z for z in numbers)
    dipole = sum(CHARGES[z] * r for z, r in zip(numbers, centered))
    alpha = sum(
        POLARIZABILITY[z] * np.eye(3) + 0.3 * np.outer(r, r)
        for z, r in zip(numbers, centered)
    )
    beta = sum(np.einsum("i,j,k->ijk", r, r, r) for r in centered)
    atoms.info["energy"] = float(energy)
    atoms.info["dipole"] = np.asarray(dipole)
    atoms.info["polarizability"] = alpha.reshape(9)
    atoms.info["beta"] = beta.reshape(27)
    atoms.arrays["forces"] = forces
    atoms.arrays["charges_ref"] = np.array([CHARGES[z] for z in numbers]) + 0.05 * (
        np.linalg.norm(centered, axis=1)
    )


def make_frames(n: int, seed: int = 0) -> List[ase.Atoms]:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = random_molecule(rng, int(rng.integers(3, 7)))
        synthetic_targets(atoms)
        frames.append(atoms)
    return frames


@pytest.fixture
def synthetic_file(tmp_path) -> str:
    path = str(tmp_path / "synthetic.xyz")
    ase.io.write(path, make_frames(24), format="extxyz")
    return path


def tiny_options(path: str, targets: dict, epochs: int = 3, **training) -> dict:
    hypers = {
        "num_epochs": epochs,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "warmup_fraction": 0.0,
    }
    hypers.update(training)
    return {
        "seed": 1,
        "base_precision": 64,
        "architecture": {"name": "pet", "model": dict(TINY_MODEL), "training": hypers},
        "training_set": {"systems": {"read_from": path}, "targets": targets},
        "validation_set": 0.25,
        "test_set": 0.0,
    }


SEED_VARIABLE = "SYMATOMIC_TEST_SEED"


@pytest.fixture(autouse=True)
def random_seed(request) -> int:
    """The seed of this test: ``SYMATOMIC_TEST_SEED`` when set, else a fresh one;
    torch's, NumPy's and Python's global generators are seeded with it (tests draw
    their own generators' seeds with :func:`fresh_seed`)."""
    value = os.environ.get(SEED_VARIABLE)
    seed = int(value) if value else int.from_bytes(os.urandom(4), "little") >> 1
    request.node.random_seed = seed
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report names its seed and how to repeat it."""
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "random_seed", None)
    if report.failed and seed is not None:
        report.sections.append(
            ("random seed", f"{seed}: repeat with {SEED_VARIABLE}={seed}")
        )


def fresh_seed() -> int:
    """A seed for a test's own generator, drawn from the generators that
    :func:`random_seed` seeded (so the test's seed fixes it)."""
    return int(np.random.randint(2**31))


@pytest.fixture(autouse=True)
def _single_thread():
    """Tests are small: one thread avoids oversubscription on busy machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def predict_structure(model, atoms: ase.Atoms, specs: dict):
    """``predict_batch`` of ``model`` (float64) on one ASE structure: blocks, forces
    and stress."""
    from symatomic.data import compute_neighbors, structure_from_atoms
    from symatomic.data.batch import collate
    from symatomic.train.losses import predict_batch

    structure = structure_from_atoms(atoms, "test")
    compute_neighbors(structure, model.cutoff)
    batch = collate([structure], torch.float64)
    return predict_batch(model, batch, specs)


def transform_atoms(atoms: ase.Atoms, rotation: np.ndarray, permutation) -> ase.Atoms:
    """``atoms`` with positions (and cell) multiplied by ``rotation`` (3×3, possibly
    improper) and atoms reordered by ``permutation``."""
    result = atoms.copy()
    result.positions = atoms.positions @ rotation.T
    if atoms.pbc.any():
        result.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
    return result[permutation]


def random_operation(seed: int, improper: bool, max_lambda: int = 4):
    """A random rotation (times -1 when ``improper``) and the Wigner-D matrices of its
    proper part for λ = 0 … ``max_lambda`` (from metatomic)."""
    from metatomic.torch.o3 import random_transformations

    generator = torch.Generator().manual_seed(seed)
    transformation = random_transformations(
        1,
        max_lambda,
        device=torch.device("cpu"),
        dtype=torch.float64,
        generator=generator,
    )
    rotation = transformation.matrices[0]
    if improper:
        rotation = -rotation
    wigner = [transformation.wigner_D_matrices(lam)[0] for lam in range(max_lambda + 1)]
    return rotation, wigner


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the largest entry of either."""
    a, b = a.detach(), b.detach()
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-300)
    return float((a - b).abs().max()) / scale
