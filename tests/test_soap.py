"""SOAP features and the invariant scalar model: radial basis, power spectrum against a
direct numpy computation, exact O(3) and permutation invariance, smoothness at the
cutoff, degenerate inputs, TorchScript. Everything in float64."""

import io
import math

import ase
import numpy as np
import pytest
import torch
from scipy.special import sph_harm_y, spherical_jn

from symatomic.data import compute_neighbors, structure_from_atoms
from symatomic.smooth import cutoff_function
from symatomic.soap import (
    InvariantScalarModel,
    LaplacianEigenstates,
    SOAPFeatures,
    laplacian_eigenstate_zeros,
)

TYPES = [1, 6, 7, 8]
CUTOFF = 3.5
WIDTH = 0.5
SMALL = {"max_radial": 3, "max_angular": 3, "n_pseudo_species": 2}


def _features(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(SMALL)
    options.update(kwargs)
    return SOAPFeatures(len(TYPES), CUTOFF, WIDTH, **options).to(torch.float64)


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(SMALL)
    options.update(d_hidden=16, d_out=8, d_pair=8)
    options.update(kwargs)
    model = InvariantScalarModel(len(TYPES), CUTOFF, WIDTH, **options)
    model = model.to(torch.float64)
    # move the species modulation away from its trivial initialisation
    with torch.no_grad():
        for gain, shift in zip(model.mlp.gains, model.mlp.shifts):
            gain.weight.normal_(1.0, 0.3)
            shift.weight.normal_(0.0, 0.3)
    return model


def _random_molecule(rng, n_atoms=8, scale=1.2):
    positions = []
    while len(positions) < n_atoms:
        candidate = rng.normal(scale=scale, size=3)
        if all(np.linalg.norm(candidate - p) > 0.8 for p in positions):
            positions.append(candidate)
    return ase.Atoms(numbers=rng.choice(TYPES, n_atoms), positions=np.array(positions))


def _random_crystal(rng):
    cell = np.eye(3) * 3.6 + rng.normal(scale=0.2, size=(3, 3))
    while True:
        atoms = ase.Atoms(
            numbers=rng.choice(TYPES, 5),
            scaled_positions=rng.uniform(size=(5, 3)),
            cell=cell,
            pbc=True,
        )
        if atoms.get_all_distances(mic=True)[np.triu_indices(5, 1)].min() > 0.8:
            return atoms


def _inputs(atoms):
    """species, pair vectors, centers, neighbors, cell shifts of a structure."""
    structure = structure_from_atoms(atoms, "test")
    compute_neighbors(structure, CUTOFF)
    species = torch.tensor(np.searchsorted(TYPES, atoms.numbers), dtype=torch.long)
    return (
        species,
        structure.pair_vectors(),
        structure.centers,
        structure.neighbors,
        structure.cell_shifts,
    )


def _random_o3(rng, improper):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q = -q
    return -q if improper else q


def _transform(atoms, rotation, permutation):
    result = atoms[permutation]
    result.positions = atoms.positions[permutation] @ rotation.T
    if atoms.pbc.any():
        result.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
    return result


def _relative_error(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


# ----------------------------------------------------------------------------------
# radial basis and power spectrum against direct computations
# ----------------------------------------------------------------------------------


def test_radial_basis_is_splined_laplacian_eigenstates():
    basis = LaplacianEigenstates(CUTOFF, 4, 3).to(torch.float64)
    zeros = laplacian_eigenstate_zeros(3, 5)
    for order in range(4):
        assert np.allclose(spherical_jn(order, zeros[order]), 0.0, atol=1e-12)
    r = np.random.default_rng(0).uniform(0, CUTOFF, 500)
    values = basis(torch.tensor(r)).numpy()
    grid = np.linspace(0, CUTOFF, 40001)
    on_grid = basis(torch.tensor(grid)).numpy()
    for order in range(4):
        for n in range(5):
            z = zeros[order, n]
            expected = (
                math.sqrt(2 / 3)
                * spherical_jn(order, z * r / CUTOFF)
                / abs(spherical_jn(order + 1, z))
            )
            np.testing.assert_allclose(values[:, 5 * order + n], expected, atol=1e-8)
        # orthogonal with weight r², mean square 1 over the ball
        block = on_grid[:, 5 * order : 5 * order + 5]
        gram = np.trapezoid(
            block[:, :, None] * block[:, None, :] * grid[:, None, None] ** 2,
            grid,
            axis=0,
        )
        np.testing.assert_allclose(gram * 3 / CUTOFF**3, np.eye(5), atol=1e-7)
    # beyond the cutoff: zero
    beyond = torch.tensor([CUTOFF, CUTOFF + 1.0], dtype=torch.float64)
    assert basis(beyond).abs().max() < 1e-12

    truncated = LaplacianEigenstates(CUTOFF, 4, 6, truncate=True)
    assert truncated.n_per_l[0] == 5
    assert truncated.n_per_l == sorted(truncated.n_per_l, reverse=True)
    assert truncated.n_per_l[-1] < 5


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("center_species", [False, True])
def test_power_spectrum_against_numpy(truncate, center_species):
    rng = np.random.default_rng(1)
    atoms = _random_molecule(rng, 5, scale=0.9)
    features = _features(
        truncate_radial=truncate,
        center_species=center_species,
        max_angular=4,
        average_neighbors=3.0,
    )
    species, vectors, centers, neighbors, _ = _inputs(atoms)
    ours = features(species, vectors, centers, neighbors).detach().numpy()
    assert ours.shape == (len(atoms), features.n_features)

    n_per_l = features.n_per_l
    zeros = laplacian_eigenstate_zeros(4, max(n_per_l))
    weights = features.species_weights.detach().numpy()
    n_pseudo = weights.shape[1]
    positions = atoms.positions
    for i in range(len(atoms)):
        row = []
        for order in range(5):
            n_l = n_per_l[order]
            density = np.zeros((2 * order + 1, n_pseudo, n_l), dtype=complex)
            for j in range(len(atoms)):
                d = positions[j] - positions[i]
                r = np.linalg.norm(d)
                if j == i or r >= CUTOFF:
                    continue
                theta = math.acos(d[2] / r)
                phi = math.atan2(d[1], d[0])
                x = 2 * (r - CUTOFF + WIDTH / 2) / WIDTH
                if x <= -1:
                    fc = 1.0
                else:
                    fc = 0.5 + 0.5 * math.tanh(1 / (x + 1) + 1 / (x - 1))
                z = zeros[order, :n_l]
                radial = (
                    math.sqrt(2 / 3)
                    * spherical_jn(order, z * r / CUTOFF)
                    / np.abs(spherical_jn(order + 1, z))
                )
                ylm = np.array(
                    [sph_harm_y(order, m, theta, phi) for m in range(-order, order + 1)]
                ) * math.sqrt(4 * math.pi)
                w = weights[np.searchsorted(TYPES, atoms.numbers[j])]
                density += (
                    ylm[:, None, None] * w[None, :, None] * radial[None, None, :] * fc
                )
            density = density.reshape(2 * order + 1, -1) / math.sqrt(3.0)
            # unitary change of basis: Σ_m conj(c) c' is the real power spectrum
            full = np.real(density.conj().T @ density) / math.sqrt(2 * order + 1)
            k = full.shape[0]
            rows, cols = np.triu_indices(k)
            scale = np.where(rows == cols, 1.0, math.sqrt(2))
            row.append(full[rows, cols] * scale)
        if center_species:
            one_hot = np.zeros(len(TYPES))
            one_hot[np.searchsorted(TYPES, atoms.numbers[i])] = 1.0
            row.append(one_hot)
        np.testing.assert_allclose(ours[i], np.concatenate(row), atol=1e-8, rtol=1e-7)


def test_feature_counts():
    features = SOAPFeatures(4, 5.0, 0.5, max_radial=6, max_angular=4)
    k = 4 * 7
    assert features.n_features == 5 * k * (k + 1) // 2
    with_center = SOAPFeatures(
        4, 5.0, 0.5, max_radial=6, max_angular=4, center_species=True
    )
    assert with_center.n_features == features.n_features + 4
    orthogonal = SOAPFeatures(3, 5.0, 0.5, 2, 1, n_pseudo_species=None)
    assert orthogonal.n_pseudo_species == 3
    assert orthogonal.n_features == 2 * 9 * 10 // 2
    assert torch.equal(orthogonal.species_weights, torch.eye(3))


# ----------------------------------------------------------------------------------
# invariance
# ----------------------------------------------------------------------------------


def _pair_keys(centers, neighbors, shifts):
    return [
        (int(i), int(j), tuple(int(s) for s in shift))
        for i, j, shift in zip(centers, neighbors, shifts)
    ]


@pytest.mark.parametrize("kind", ["molecule", "crystal"])
def test_exact_o3_and_permutation_invariance(kind):
    rng = np.random.default_rng(42 if kind == "molecule" else 7)
    features = _features(center_species=True)
    model = _model()
    for _ in range(2):
        atoms = _random_molecule(rng) if kind == "molecule" else _random_crystal(rng)
        species, vectors, centers, neighbors, shifts = _inputs(atoms)
        assert vectors.shape[0] > 0
        reference = features(species, vectors, centers, neighbors)
        ref_atoms, ref_pairs, ref_fc = model(species, vectors, centers, neighbors)
        ref_keys = {k: p for p, k in enumerate(_pair_keys(centers, neighbors, shifts))}
        for improper in (False, True):
            rotation = _random_o3(rng, improper)
            permutation = rng.permutation(len(atoms))
            moved = _transform(atoms, rotation, permutation)
            species2, vectors2, centers2, neighbors2, shifts2 = _inputs(moved)
            # shuffle the pair list too: inputs need not be sorted
            shuffle = torch.tensor(rng.permutation(vectors2.shape[0]))
            vectors2, centers2 = vectors2[shuffle], centers2[shuffle]
            neighbors2, shifts2 = neighbors2[shuffle], shifts2[shuffle]

            out = features(species2, vectors2, centers2, neighbors2)
            assert _relative_error(out, reference[permutation]) < 1e-12

            out_atoms, out_pairs, out_fc = model(
                species2, vectors2, centers2, neighbors2
            )
            assert _relative_error(out_atoms, ref_atoms[permutation]) < 1e-12
            # pair (i, j, S) of the moved structure is (p[i], p[j], S) of the original
            keys = _pair_keys(
                permutation[centers2.numpy()], permutation[neighbors2.numpy()], shifts2
            )
            assert sorted(keys) == sorted(ref_keys)
            match = torch.tensor([ref_keys[k] for k in keys])
            assert _relative_error(out_pairs, ref_pairs[match]) < 1e-12
            assert _relative_error(out_fc, ref_fc[match]) < 1e-12


# ----------------------------------------------------------------------------------
# smoothness at the cutoff
# ----------------------------------------------------------------------------------


def _all_pairs(positions):
    """Full list of pairs closer than the cutoff, differentiable in ``positions``."""
    n = positions.shape[0]
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    vectors = positions[j] - positions[i]
    keep = (i != j) & (vectors.detach().norm(dim=1) < CUTOFF)
    return vectors[keep], i[keep], j[keep]


def _scan_energy(model, species, positions, projection):
    vectors, centers, neighbors = _all_pairs(positions)
    atoms, pairs, fc = model(species, vectors, centers, neighbors)
    # the kind of quantity heads build: invariant sums and fc-weighted pair sums
    vector_sum = torch.zeros(positions.shape[0], 3, dtype=positions.dtype)
    vector_sum = vector_sum.index_add(
        0, centers, (pairs[:, :1] * fc.unsqueeze(1)) * vectors
    )
    return (atoms * projection).sum() + (vector_sum**2).sum()


def test_smooth_through_cutoff():
    rng = np.random.default_rng(3)
    model = _model()
    projection = torch.tensor(rng.normal(size=model.d_out))
    # the moving atom goes along +x, the others have x ≤ 0: the origin is the last
    # atom whose cutoff it leaves, at distance CUTOFF
    base = torch.tensor(
        [[0.0, 0.0, 0.0], [-1.0, 0.2, -0.1], [-0.3, 1.1, 0.4], [-0.2, -0.5, -1.0]],
        dtype=torch.float64,
    )
    species = torch.tensor([0, 1, 2, 3, 1])
    direction = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)

    def evaluate(distance, grad=True):
        moving = (distance * direction).reshape(1, 3)
        positions = torch.cat([base, moving]).requires_grad_(grad)
        value = _scan_energy(model, species, positions, projection)
        if not grad:
            return value.detach(), None
        (gradient,) = torch.autograd.grad(value, positions)
        return value.detach(), gradient[4]

    # no-neighbor value: the base and the moving atom apart
    alone = (
        _scan_energy(model, species[:4], base, projection)
        + _scan_energy(model, species[4:], base[:1], projection)
    ).detach()
    # far outside the cutoff of every atom (the base is within ~1.2 Å of the origin)
    far, far_gradient = evaluate(CUTOFF + 1.5)
    assert torch.allclose(far, alone, atol=1e-12, rtol=0)
    assert far_gradient.abs().max() == 0.0

    # finite differences vs autograd in the switching region and inside
    h = 1e-5
    for distance in [2.0, 2.8, 3.05, 3.2, 3.4]:
        _, gradient = evaluate(distance)
        plus, _ = evaluate(distance + h, grad=False)
        minus, _ = evaluate(distance - h, grad=False)
        numerical = (plus - minus) / (2 * h)
        analytical = (gradient * direction).sum()
        assert abs(float(numerical - analytical)) < 1e-6 * max(
            1.0, abs(float(analytical))
        )

    # continuity at the cutoff: values and gradients join the no-neighbor ones
    previous = None
    for distance in [3.45, 3.48, 3.495, 3.4999]:
        value, gradient = evaluate(distance)
        gap = abs(float(value - alone))
        if previous is not None:
            assert gap <= previous + 1e-14
        previous = gap
    assert gap < 1e-10
    assert gradient.abs().max() < 1e-8

    # the SOAP features of the origin themselves, with their gradient
    features = _features()

    def origin_features(distance):
        moving = (distance * direction).reshape(1, 3)
        positions = torch.cat([base, moving]).requires_grad_()
        vectors, centers, neighbors = _all_pairs(positions)
        values = features(species, vectors, centers, neighbors)[0]
        (gradient,) = torch.autograd.grad(values.sum(), positions)
        return values.detach(), gradient[4]

    vectors, centers, neighbors = _all_pairs(base)
    without = features(species[:4], vectors, centers, neighbors)[0].detach()
    inside, _ = origin_features(3.2)
    assert (inside - without).abs().max() > 1e-3
    for distance, bound in [(3.49, 1e-6), (3.4999, 1e-12)]:
        values, gradient = origin_features(distance)
        assert (values - without).abs().max() < bound
        assert gradient.abs().max() < 1e3 * bound


# ----------------------------------------------------------------------------------
# degenerate inputs
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["isolated", "diatomic", "linear"])
def test_degenerate_inputs(case):
    if case == "isolated":
        positions = torch.zeros(1, 3)
        species = torch.tensor([2])
    elif case == "diatomic":
        positions = torch.tensor([[0.0, 0.0, 0.0], [0.3, -0.4, 1.0]])
        species = torch.tensor([0, 3])
    else:
        axis = torch.tensor([0.3, 0.5, -0.8])
        positions = torch.arange(4, dtype=torch.float64).unsqueeze(1) * 1.1 * axis
        species = torch.tensor([1, 1, 3, 0])
    positions = positions.to(torch.float64).requires_grad_()
    features = _features(center_species=True)
    model = _model()
    vectors, centers, neighbors = _all_pairs(positions)
    soap = features(species, vectors, centers, neighbors)
    atoms, pairs, fc = model(species, vectors, centers, neighbors)
    assert soap.shape == (len(species), features.n_features)
    assert atoms.shape == (len(species), model.d_out)
    assert pairs.shape == (vectors.shape[0], model.d_pair)
    for value in (soap, atoms, pairs, fc):
        assert torch.all(torch.isfinite(value))
    total = soap.sum() + atoms.sum() + (pairs * fc.unsqueeze(1)).sum()
    (gradient,) = torch.autograd.grad(total, positions, allow_unused=True)
    if case == "isolated":
        assert gradient is None or torch.all(gradient == 0)
        # only the center-species channel survives
        assert torch.all(soap[0, : features.n_power_spectrum] == 0)
        assert soap[0, features.n_power_spectrum + 2] == 1.0
    else:
        assert torch.all(torch.isfinite(gradient))
        assert gradient.abs().max() > 0


# ----------------------------------------------------------------------------------
# TorchScript, dtypes
# ----------------------------------------------------------------------------------


def test_torchscript_identical():
    rng = np.random.default_rng(5)
    atoms = _random_crystal(rng)
    species, vectors, centers, neighbors, _ = _inputs(atoms)
    for module in (
        _features(center_species=True),
        _features(truncate_radial=True, max_angular=5),
        _model(),
    ):
        scripted = torch.jit.script(module)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        scripted = torch.jit.load(buffer)
        for _ in range(3):  # past the profiling runs of the executor
            eager = module(species, vectors, centers, neighbors)
            script = scripted(species, vectors, centers, neighbors)
        if isinstance(eager, torch.Tensor):
            eager, script = (eager,), (script,)
        for a, b in zip(eager, script):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


def test_float32_and_gradients_to_parameters():
    rng = np.random.default_rng(6)
    species, vectors, centers, neighbors, _ = _inputs(_random_molecule(rng))
    model = _model().to(torch.float32)
    atoms, pairs, fc = model(species, vectors.float(), centers, neighbors)
    assert atoms.dtype == torch.float32
    (atoms.sum() + pairs.sum()).backward()
    assert model.soap.species_weights.grad is not None
    assert torch.isfinite(model.soap.species_weights.grad).all()
    assert model.soap.species_weights.grad.abs().max() > 0
    reference = cutoff_function(vectors.norm(dim=1), CUTOFF, WIDTH)
    torch.testing.assert_close(fc.double(), reference, rtol=1e-5, atol=1e-6)
