"""Invariant edge inputs of PET (``edge_inputs: invariant``, the default): the pair
density projections equal their defining sum over angles, are exactly invariant, and
make PET exactly O(3)-invariant (energies, forces, stress) without frames; smooth,
finite for degenerate inputs, bounded in memory in dense matter. float64, fresh random
rotations, inversions and permutations."""

import ase
import numpy as np
import pytest
import torch

from conftest import (
    TINY_MODEL,
    fresh_seed,
    predict_structure,
    random_operation,
    relative_error,
    transform_atoms,
)
from symatomic.data.targets import parse_target_options
from symatomic.density import PairDensityProjections, radial_basis
from symatomic.model import SymatomicModel
from symatomic.o3 import SolidHarmonics

TYPES = [1, 6, 8]
INVARIANT = dict(TINY_MODEL, ecse="auto", edge_inputs="auto")


def _specs():
    return {"energy": parse_target_options("energy", {"unit": "eV"}, "x")}


def _model(seed=0, **changes):
    torch.manual_seed(seed)
    model = SymatomicModel(dict(INVARIANT, **changes), TYPES, _specs())
    model = model.to(torch.float64).eval()
    model.readouts["energy"].scale.fill_(1.0)
    assert model.hypers["edge_inputs"] == "invariant"
    assert model.hypers["ecse"]["mode"] == "none" and model.exactly_equivariant
    return model


def _random_pairs(rng, n_atoms=5, n_per_atom=6):
    centers = np.repeat(np.arange(n_atoms), n_per_atom)
    vectors = rng.normal(size=(len(centers), 3))
    vectors *= rng.uniform(0.8, 3.0, size=(len(centers), 1)) / np.linalg.norm(
        vectors, axis=1, keepdims=True
    )
    return torch.tensor(centers), torch.tensor(vectors)


def _projections(module, vectors, features, centers, n_atoms, cutoff=3.5):
    distances = torch.linalg.norm(vectors, dim=1)
    harmonics = SolidHarmonics(module.max_angular)(vectors / distances.unsqueeze(1))
    radial = radial_basis(cutoff, module.n_radial - 1)(distances)
    fc = torch.ones_like(distances)
    return module(features, radial, harmonics, fc, centers, n_atoms)


def test_projections_are_the_sum_over_angles():
    """p_{ij,l,c} = Σ_k g_{l,c}(k) P_l(r̂_ij · r̂_ik) / N_avg, from the O(n²) sum."""
    rng = np.random.default_rng(fresh_seed())
    torch.manual_seed(int(rng.integers(2**31)))
    module = PairDensityProjections(
        6, max_angular=4, max_radial=3, n_channels=2, n_outputs=3
    ).to(torch.float64)
    n_atoms = 4
    centers, vectors = _random_pairs(rng, n_atoms)
    features = torch.tensor(rng.normal(size=(len(centers), 6)))
    result = _projections(module, vectors, features, centers, n_atoms)

    distances = torch.linalg.norm(vectors, dim=1)
    radial = radial_basis(3.5, 3)(distances)
    channels = module.channels(features)
    weights = module.mixing(
        (radial.unsqueeze(2) * channels.unsqueeze(1)).reshape(len(centers), -1)
    ).reshape(len(centers), 5, 3)
    directions = vectors / distances.unsqueeze(1)
    expected = torch.zeros_like(result).reshape(len(centers), 5, 3)
    for p in range(len(centers)):
        for q in range(len(centers)):
            if centers[p] != centers[q]:
                continue
            x = float(directions[p] @ directions[q])
            legendre = [
                np.polynomial.legendre.Legendre.basis(order)(x) for order in range(5)
            ]
            expected[p] += torch.tensor(legendre).unsqueeze(1) * weights[q]
    expected = expected.reshape(len(centers), -1) * module.scale / (4 * np.pi)
    assert relative_error(result, expected) < 1e-12


def test_projections_are_invariant():
    rng = np.random.default_rng(fresh_seed())
    seed = int(rng.integers(2**31))
    module = PairDensityProjections(5, max_angular=5, n_channels=3, n_outputs=4).to(
        torch.float64
    )
    centers, vectors = _random_pairs(rng)
    features = torch.tensor(rng.normal(size=(len(centers), 5)))
    reference = _projections(module, vectors, features, centers, 5)
    for improper in (False, True):
        rotation, _ = random_operation(seed, improper)
        moved = _projections(module, vectors @ rotation.T, features, centers, 5)
        assert relative_error(reference, moved) < 1e-13, (seed, improper)


def _random_structure(rng, periodic):
    if periodic:
        cell = np.eye(3) * 3.6 + rng.normal(scale=0.2, size=(3, 3))
        return ase.Atoms(
            numbers=rng.choice(TYPES, 5),
            scaled_positions=rng.uniform(size=(5, 3)),
            cell=cell,
            pbc=True,
        )
    positions = []
    while len(positions) < 8:
        candidate = rng.normal(scale=1.1, size=3)
        if all(np.linalg.norm(candidate - p) > 0.8 for p in positions):
            positions.append(candidate)
    return ase.Atoms(numbers=rng.choice(TYPES, 8), positions=np.array(positions))


@pytest.mark.parametrize("periodic", [False, True], ids=["molecule", "crystal"])
def test_invariant_pet_is_exactly_invariant(periodic):
    """Energy, forces and stress under random rotations, inversions, permutations."""
    model = _model()
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    atoms = _random_structure(rng, periodic)
    specs = model.target_specs
    blocks, forces, stress = predict_structure(model, atoms, specs)
    for improper in (False, True):
        rotation, _ = random_operation(seed, improper)
        permutation = rng.permutation(len(atoms))
        moved = transform_atoms(atoms, rotation.numpy(), permutation)
        new_blocks, new_forces, new_stress = predict_structure(model, moved, specs)
        assert relative_error(blocks["energy"][0], new_blocks["energy"][0]) < 1e-12
        expected = (forces["energy"] @ rotation.T)[permutation]
        assert relative_error(expected, new_forces["energy"]) < 1e-12, (seed, improper)
        if periodic:
            rotated = rotation @ stress["energy"][0] @ rotation.T
            assert relative_error(rotated, new_stress["energy"][0]) < 1e-12


def _energy_and_forces(model, atoms):
    blocks, forces, _ = predict_structure(model, atoms, model.target_specs)
    return float(blocks["energy"][0].detach().sum()), forces["energy"].detach().numpy()


def test_forces_are_gradients_and_scans_are_smooth():
    """Forces equal -dE/dx by central differences; the energy along a scan in which
    one atom leaves the cutoff and three atoms become collinear has no jumps."""
    model = _model()
    rng = np.random.default_rng(fresh_seed())
    atoms = _random_structure(rng, False)
    _, forces = _energy_and_forces(model, atoms)
    delta = 1e-5
    for i in range(len(atoms)):
        for axis in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, axis] += delta
            minus.positions[i, axis] -= delta
            numeric = -(
                _energy_and_forces(model, plus)[0] - _energy_and_forces(model, minus)[0]
            ) / (2 * delta)
            assert abs(numeric - forces[i, axis]) < 1e-6 * max(1.0, abs(forces).max())

    base = ase.Atoms(
        "CHHO", positions=[[0, 0, 0], [1.1, 0, 0], [-1.2, 0.0, 0.0], [0.2, -0.4, 1.2]]
    )
    direction = np.array([0.0, 0.3, 1.0]) / np.linalg.norm([0.0, 0.3, 1.0])
    steps = np.linspace(1.0, 4.0, 601)  # the O atom leaves the 3.5 Å cutoff
    energies = []
    slopes = []
    for t in steps:
        moved = base.copy()
        moved.positions[3] = t * direction
        energy, f = _energy_and_forces(model, moved)
        energies.append(energy)
        slopes.append(f[3] @ direction)
    jumps = np.abs(np.diff(energies))
    step = steps[1] - steps[0]
    # |ΔE| per step bounded by the largest force times the step (no jumps)
    assert jumps.max() <= 1.5 * step * np.abs(slopes).max() + 1e-12
    assert abs(energies[-1] - energies[-2]) < 1e-14  # outside the cutoff: constant


@pytest.mark.parametrize(
    "positions",
    [
        [[0.0, 0.0, 0.0]],
        [[0, 0, 0], [0, 0, 1.1]],
        [[0, 0, 0], [0, 0, 1.2], [0, 0, -1.2]],
    ],
    ids=["isolated", "diatomic", "linear"],
)
def test_degenerate_environments_are_finite(positions):
    model = _model()
    atoms = ase.Atoms(numbers=[8] + [1] * (len(positions) - 1), positions=positions)
    energy, forces = _energy_and_forces(model, atoms)
    assert np.isfinite(energy) and np.all(np.isfinite(forces))


def test_dense_cell_is_linear_in_neighbors():
    """81 atoms in a 6 Å periodic cell (~140 neighbors within 4.5 Å, 3.75x the
    density of water): energy and forces with the default sizes, no frames; the
    work grows with pairs, so this is small."""
    rng = np.random.default_rng(0)
    atoms = ase.Atoms(
        numbers=[8, 1, 1] * 27,
        scaled_positions=rng.uniform(size=(81, 3)),
        cell=np.eye(3) * 6.0,
        pbc=True,
    )
    torch.manual_seed(0)
    model = SymatomicModel({}, [1, 8], _specs()).eval()
    assert model.hypers["edge_inputs"] == "invariant"
    from symatomic.data import compute_neighbors, structure_from_atoms
    from symatomic.data.batch import collate
    from symatomic.train.losses import predict_batch

    structure = structure_from_atoms(atoms, "dense")
    compute_neighbors(structure, model.cutoff)
    assert len(structure.centers) / len(atoms) > 100
    batch = collate([structure], torch.float32)
    blocks, forces, _ = predict_batch(model, batch, model.target_specs)
    assert torch.isfinite(blocks["energy"][0]).all()
    assert torch.isfinite(forces["energy"]).all()
