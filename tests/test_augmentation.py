"""Random O(3) augmentation rotates targets exactly like the structures."""

import ase
import pytest
import torch
from metatomic.torch.o3 import random_transformations

from conftest import make_frames, synthetic_targets
from symatomic.data import compute_neighbors, read_dataset
from symatomic.data.batch import collate, random_o3_augmentation

TARGETS = {
    "energy": {"key": "energy"},
    "mtt::dipole": {"key": "dipole", "type": {"cartesian": {"rank": 1}}},
    "mtt::alpha": {"key": "polarizability", "type": {"cartesian": {"rank": 2}}},
    "mtt::beta": {"key": "beta", "type": {"cartesian": {"rank": 3}}},
    "mtt::charges": {"key": "charges_ref", "sample_kind": "atom"},
}


def _read(path):
    structures, specs, _ = read_dataset({"systems": path, "targets": TARGETS}, "test")
    for structure in structures:
        compute_neighbors(structure, 3.0)
    return structures, specs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_augmented_targets_match_rotated_structures(tmp_path, seed):
    frames = make_frames(6, seed=seed)
    path = str(tmp_path / "original.xyz")
    ase.io.write(path, frames)
    structures, specs = _read(path)
    batch = collate(structures, torch.float64)

    generator = torch.Generator().manual_seed(seed)
    matrices = random_transformations(
        len(frames),
        0,
        device=torch.device("cpu"),
        dtype=torch.float64,
        add_inversions=True,
        generator=generator,
    ).matrices
    matrices[0] = (
        -matrices[0] if torch.det(matrices[0]) > 0 else matrices[0]
    )  # one improper
    augmented = random_o3_augmentation(batch, specs, matrices=matrices)

    rotated_frames = []
    for atoms, rotation in zip(frames, matrices):
        rotated = atoms.copy()
        rotated.positions = atoms.positions @ rotation.numpy().T
        synthetic_targets(rotated)
        rotated_frames.append(rotated)
    rotated_path = str(tmp_path / "rotated.xyz")
    ase.io.write(rotated_path, rotated_frames)
    rotated_structures, _ = _read(rotated_path)
    expected = collate(rotated_structures, torch.float64)

    # extended XYZ files store 8 decimals: compare to 1e-6; a wrong convention
    # (sign, order of components, parity) gives errors of order one
    torch.testing.assert_close(
        augmented.positions, expected.positions, atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        augmented.forces["energy"], expected.forces["energy"], atol=1e-6, rtol=0
    )
    for name in TARGETS:
        for a, b in zip(augmented.targets[name], expected.targets[name]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # the augmentation changed something (not a trivial identity)
    assert not torch.allclose(
        augmented.targets["mtt::beta"][1], batch.targets["mtt::beta"][1]
    )
