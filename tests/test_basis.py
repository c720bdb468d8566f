"""Scalar-basis tensor heads (symatomic.basis): symmetry, rank, smoothness, scripting."""

import math
from typing import List, Tuple

import pytest
import torch

from symatomic.basis import (
    EquivariantVectors,
    LambdaDensity,
    ScalarBasisHead,
    TensorBasis,
)
from symatomic.o3 import WignerD, inversion_parity
from symatomic.smooth import cutoff_function

CUTOFF = 4.5
WIDTH = 0.5
N_SPECIES = 3
D_PAIR = 4 + N_SPECIES
LAMBDAS = list(range(7))
BLOCKS = [(lam, sigma) for lam in LAMBDAS for sigma in (1, -1)]


@pytest.fixture(autouse=True)
def _float64():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


def _features(vectors: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
    """Invariant pair features: Gaussians of the distance and the neighbor species."""
    r = torch.linalg.norm(vectors, dim=1)
    centers = torch.linspace(1.0, 4.0, 4, dtype=vectors.dtype)
    gaussians = torch.exp(-((r.unsqueeze(1) - centers) ** 2))
    one_hot = torch.nn.functional.one_hot(species, N_SPECIES).to(vectors.dtype)
    return torch.cat([gaussians, one_hot], dim=1)


def _inputs(vectors: torch.Tensor, species: torch.Tensor, centers: torch.Tensor):
    """``(pair_features, pair_vectors, cutoff_factors, centers)`` for the modules."""
    r = torch.linalg.norm(vectors, dim=1)
    return (
        _features(vectors, species),
        vectors,
        cutoff_function(r, CUTOFF, WIDTH),
        centers,
    )


def _random_pairs(n_pairs: int, r_min: float = 0.8, r_max: float = CUTOFF):
    directions = torch.randn(n_pairs, 3)
    directions = directions / torch.linalg.norm(directions, dim=1, keepdim=True)
    r = r_min + (r_max - r_min) * torch.rand(n_pairs, 1)
    return directions * r


def _random_system(n_atoms: int = 5, n_pairs: int = 30):
    vectors = _random_pairs(n_pairs)
    species = torch.randint(0, N_SPECIES, (n_pairs,))
    centers = torch.randint(0, n_atoms, (n_pairs,))
    return vectors, species, centers


def _random_o3(inverted: bool) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """A random O(3) matrix ``Q = ±R`` (``-`` when ``inverted``): ``(Q, R,
    inverted)``."""
    q, r = torch.linalg.qr(torch.randn(3, 3))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if torch.det(q) < 0:
        q = -q
    return (-q if inverted else q), q, inverted


def _transform(vectors, species, centers, n_atoms, inverted: bool):
    """Rotate/invert the pair vectors, permute atoms and pairs.

    :return: new ``(vectors, species, centers)``, ``new_index`` of every old atom,
        the proper rotation and whether an inversion was applied
    """
    q, rotation, inverted = _random_o3(inverted)
    new_index = torch.randperm(n_atoms)
    pair_order = torch.randperm(vectors.shape[0])
    new_vectors = vectors[pair_order] @ q.T
    return (
        (new_vectors, species[pair_order], new_index[centers[pair_order]]),
        new_index,
        rotation,
        inverted,
    )


def _expected(values, new_index, rotation, inverted, o3_lambda, o3_sigma):
    """Transform per-atom ``(n, 2λ+1, ...)`` values like a ``(λ, σ)`` block."""
    wigner = WignerD(o3_lambda)(rotation.unsqueeze(0))[o3_lambda][0]
    rotated = torch.einsum("mk,nk...->nm...", wigner, values)
    if inverted:
        rotated = rotated * inversion_parity(o3_lambda, o3_sigma)
    result = torch.empty_like(rotated)
    result[new_index] = rotated
    return result


def _relative_error(actual, expected):
    return float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))


def _rank(matrix: torch.Tensor, tolerance: float = 1e-12) -> int:
    values = torch.linalg.svdvals(matrix.detach())
    if values.numel() == 0 or values[0] == 0:
        return 0
    return int((values > tolerance * values[0]).sum())


def _single_center(vectors: torch.Tensor, species: List[int]):
    species_t = torch.tensor(species, dtype=torch.long)
    centers = torch.zeros(vectors.shape[0], dtype=torch.long)
    return _inputs(vectors, species_t, centers)


def _head(o3_lambda, o3_sigma, n_properties=2, **kwargs):
    torch.manual_seed(1234 + 10 * o3_lambda + o3_sigma)
    return ScalarBasisHead(
        o3_lambda, o3_sigma, n_properties, D_PAIR, d_hidden=8, **kwargs
    )


# ------------------------------------------------------------------------------------
# equivariance
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("o3_lambda,o3_sigma", BLOCKS)
def test_head_equivariance(o3_lambda, o3_sigma):
    torch.manual_seed(o3_lambda + 100 * (o3_sigma + 1))
    n_atoms = 5
    head = _head(o3_lambda, o3_sigma, pseudoscalar_factor=o3_sigma == -1)
    vectors, species, centers = _random_system(n_atoms)
    coefficients = torch.randn(n_atoms, head.n_coefficients)
    with torch.no_grad():
        output = head(coefficients, *_inputs(vectors, species, centers))
        assert output.shape == (n_atoms, 2 * o3_lambda + 1, 2)
        assert float(torch.linalg.norm(output)) > 1e-6
        for inverted in (False, True, True):
            new_system, new_index, rotation, inverted = _transform(
                vectors, species, centers, n_atoms, inverted
            )
            new_coefficients = torch.empty_like(coefficients)
            new_coefficients[new_index] = coefficients
            new_output = head(new_coefficients, *_inputs(*new_system))
            expected = _expected(
                output, new_index, rotation, inverted, o3_lambda, o3_sigma
            )
            assert _relative_error(new_output, expected) < 1e-10


@pytest.mark.parametrize("o3_lambda,o3_sigma", BLOCKS)
def test_tensor_basis_equivariance(o3_lambda, o3_sigma):
    """The basis alone, from random vectors and a random λ-density."""
    torch.manual_seed(7 + o3_lambda)
    n_atoms = 4
    basis = TensorBasis(o3_lambda, o3_sigma, n_density=3, pseudoscalar_factor=True)
    vectors = torch.randn(n_atoms, basis.n_vectors, 3)
    density = torch.randn(n_atoms, 2 * o3_lambda + 1, 3)
    values = basis(vectors, density)
    assert values.shape == (n_atoms, 2 * o3_lambda + 1, basis.n_basis)
    for inverted in (False, True, True):
        q, rotation, inverted = _random_o3(inverted)
        wigner = WignerD(o3_lambda)(rotation.unsqueeze(0))[o3_lambda][0]
        new_density = torch.einsum("mk,nkc->nmc", wigner, density)
        if inverted:  # the density is a true tensor
            new_density = new_density * (-1) ** o3_lambda
        new_values = basis(vectors @ q.T, new_density)
        expected = _expected(
            values, torch.arange(n_atoms), rotation, inverted, o3_lambda, o3_sigma
        )
        assert _relative_error(new_values, expected) < 1e-10


def test_vectors_and_densities_equivariance():
    torch.manual_seed(3)
    n_atoms = 5
    vectors_module = EquivariantVectors(D_PAIR, 4, d_hidden=8)
    density_module = LambdaDensity(D_PAIR, 6, 3, d_hidden=8)
    system = _random_system(n_atoms)
    with torch.no_grad():
        vectors = vectors_module(*_inputs(*system), n_atoms)
        densities = density_module(*_inputs(*system), n_atoms)
        assert vectors.shape == (n_atoms, 4, 3)
        assert [d.shape for d in densities] == [
            (n_atoms, 2 * lam + 1, 3) for lam in range(7)
        ]
        new_system, new_index, rotation, inverted = _transform(*system, n_atoms, True)
        q = -rotation if inverted else rotation
        new_vectors = vectors_module(*_inputs(*new_system), n_atoms)
        expected = torch.empty_like(vectors)
        expected[new_index] = vectors @ q.T
        assert _relative_error(new_vectors, expected) < 1e-10
        new_densities = density_module(*_inputs(*new_system), n_atoms)
        for lam in range(7):
            expected = _expected(densities[lam], new_index, rotation, inverted, lam, 1)
            assert _relative_error(new_densities[lam], expected) < 1e-10


# ------------------------------------------------------------------------------------
# rank and symmetric environments
# ------------------------------------------------------------------------------------


def _generic_environment():
    torch.manual_seed(11)
    vectors = _random_pairs(8, 1.0, 3.5)
    return _single_center(vectors, [0, 1, 2, 0, 1, 2, 0, 1])


def _planar_environment():
    torch.manual_seed(12)
    vectors = _random_pairs(7, 1.0, 3.5)
    vectors[:, 2] = 0.0
    return _single_center(vectors, [0, 1, 2, 0, 1, 2, 0])


def test_n_basis():
    for o3_lambda, o3_sigma in BLOCKS:
        for n_density in (0, 3):
            basis = TensorBasis(o3_lambda, o3_sigma, n_density)
            expected = 1 if o3_lambda == 0 else 2 * o3_lambda + 1 + n_density
            assert basis.n_basis == expected
            if o3_sigma == -1:
                factor = TensorBasis(o3_lambda, o3_sigma, n_density, True)
                assert factor.n_basis == 2 * expected
    head = ScalarBasisHead(3, 1, 4, D_PAIR)
    assert head.n_basis == 7 + 7 and head.n_coefficients == 14 * 4


@pytest.mark.parametrize("n_density", [0, None])
def test_rank_generic_and_planar(n_density):
    """Full rank in a generic environment; in a planar one (mirror symmetry through
    the plane) exactly the ``λ + 1`` (σ = +1) or ``λ`` (σ = -1) components that the
    mirror allows, so pseudotensors do not vanish there (except λ = 0)."""
    generic = _generic_environment()
    planar = _planar_environment()
    for o3_lambda, o3_sigma in BLOCKS:
        head = _head(o3_lambda, o3_sigma, n_density=n_density)
        with torch.no_grad():
            basis = head.compute_basis(*generic, 1)[0]
            assert _rank(basis) == 2 * o3_lambda + 1, (o3_lambda, o3_sigma)
            basis = head.compute_basis(*planar, 1)[0]
        expected = o3_lambda + 1 if o3_sigma == 1 else o3_lambda
        assert _rank(basis) == expected, (o3_lambda, o3_sigma)


def test_pseudoscalar_factor_vanishes_for_planar():
    """The DESIGN.md variant (proper basis × pseudoscalar) is zero for planar
    environments, which is why it is not the default for pseudotensors."""
    planar = _planar_environment()
    head = _head(2, -1, pseudoscalar_factor=True)
    with torch.no_grad():
        basis = head.compute_basis(*planar, 1)[0]
    n_direct = head.n_basis // 2
    assert float(basis[:, n_direct:].abs().max()) < 1e-14
    assert _rank(basis[:, :n_direct]) == 2


def _water():
    """H2O: pairs of the O center (0) and of the first H center (1)."""
    angle = math.radians(104.5)
    positions = torch.tensor(
        [
            [0.0, 0.0, 0.0],
            [0.9572, 0.0, 0.0],
            [0.9572 * math.cos(angle), 0.9572 * math.sin(angle), 0.0],
        ]
    )
    species = torch.tensor([2, 0, 0])
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    centers = torch.tensor([i for i, _ in pairs])
    neighbors = torch.tensor([j for _, j in pairs])
    vectors = positions[neighbors] - positions[centers]
    return _inputs(vectors, species[neighbors], centers)


def test_planar_water_pseudovector():
    """λ = 1, σ = -1 is non-zero (along the normal) on the H atoms of water, and zero
    on O, whose C2v symmetry forbids any pseudovector."""
    head = _head(1, -1)
    with torch.no_grad():
        basis = head.compute_basis(*_water(), 3)
    scale = float(basis.abs().max())
    assert scale > 1e-3
    assert float(basis[0].abs().max()) < 1e-12 * scale
    for atom in (1, 2):
        # the normal is z, the λ = 1 components are (y, z, x)
        assert float(basis[atom, 1].abs().max()) > 1e-3
        assert float(basis[atom, [0, 2]].abs().max()) < 1e-12 * scale


def _methane_center():
    d = 1.09 / math.sqrt(3.0)
    vectors = d * torch.tensor(
        [[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]]
    )
    return _single_center(vectors, [0, 0, 0, 0])


def _crystal_site(kind: str):
    a = 3.6 if kind == "fcc" else 2.9
    shells = []
    for x in range(-2, 3):
        for y in range(-2, 3):
            for z in range(-2, 3):
                shells.append([x, y, z])
                if kind == "bcc":
                    shells.append([x + 0.5, y + 0.5, z + 0.5])
                else:
                    shells += [[x + 0.5, y + 0.5, z], [x + 0.5, y, z + 0.5]]
                    shells += [[x, y + 0.5, z + 0.5]]
    vectors = a * torch.tensor(shells)
    r = torch.linalg.norm(vectors, dim=1)
    vectors = vectors[(r > 0.1) & (r < CUTOFF)]
    return _single_center(vectors, [1] * vectors.shape[0])


def test_symmetric_environments():
    """Vectors vanish at a tetrahedral or cubic site; the λ-densities carry exactly
    the components these point groups allow (Td: λ = 3, 4, 6; Oh: λ = 4, 6)."""
    allowed = {"methane": {0, 3, 4, 6}, "fcc": {0, 4, 6}, "bcc": {0, 4, 6}}
    environments = {
        "methane": _methane_center(),
        "fcc": _crystal_site("fcc"),
        "bcc": _crystal_site("bcc"),
    }
    for name, environment in environments.items():
        with torch.no_grad():
            vectors = EquivariantVectors(D_PAIR, 3)(*environment, 1)
        assert float(vectors.abs().max()) < 1e-12
        for o3_lambda in LAMBDAS:
            head = _head(o3_lambda, 1)
            with torch.no_grad():
                basis = head.compute_basis(*environment, 1)[0]
            if o3_lambda > 0:
                vector_terms = basis[:, : 2 * o3_lambda + 1]
                assert float(vector_terms.abs().max()) < 1e-12
            largest = float(basis.abs().max())
            if o3_lambda in allowed[name]:
                assert largest > 1e-3, (name, o3_lambda)
            else:
                assert largest < 1e-12, (name, o3_lambda)


# ------------------------------------------------------------------------------------
# degenerate environments, smoothness
# ------------------------------------------------------------------------------------


def _degenerate_systems():
    isolated = (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 1)
    diatomic = (
        torch.tensor([[0.0, 0.0, 1.1], [0.0, 0.0, -1.1]]),
        torch.tensor([0, 1]),
        2,
    )
    co2 = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.16], [0.0, 0.0, -1.16]])
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    linear = (
        torch.stack([co2[j] - co2[i] for i, j in pairs]),
        torch.tensor([i for i, _ in pairs]),
        3,
    )
    systems = {"isolated": isolated, "diatomic": diatomic, "linear": linear}
    result = {}
    for name, (vectors, centers, n_atoms) in systems.items():
        species = torch.zeros(vectors.shape[0], dtype=torch.long)
        result[name] = (vectors, species, centers, n_atoms)
    for name, environment in (
        ("methane", _methane_center()),
        ("fcc", _crystal_site("fcc")),
        ("bcc", _crystal_site("bcc")),
    ):
        vectors = environment[1]
        species = torch.argmax(environment[0][:, 4:], dim=1)
        result[name] = (vectors, species, environment[3], 1)
    return result


def test_degenerate_environments_finite():
    """Outputs and gradients with respect to the pair vectors are finite."""
    systems = _degenerate_systems()
    for o3_lambda, o3_sigma in BLOCKS:
        head = _head(o3_lambda, o3_sigma, pseudoscalar_factor=o3_sigma == -1)
        for name, (vectors, species, centers, n_atoms) in systems.items():
            vectors = vectors.clone().requires_grad_(True)
            coefficients = torch.randn(n_atoms, head.n_coefficients)
            output = head(coefficients, *_inputs(vectors, species, centers))
            assert output.shape == (n_atoms, 2 * o3_lambda + 1, 2)
            assert bool(torch.isfinite(output).all()), name
            if name == "isolated":  # only the constant of λ = 0, σ = +1 survives
                if (o3_lambda, o3_sigma) == (0, 1):
                    assert torch.equal(output, coefficients.reshape(1, 1, 2))
                else:
                    assert float(output.detach().abs().max()) == 0.0
            if not output.requires_grad:  # λ = 0, σ = +1: the constant basis
                continue
            (gradient,) = torch.autograd.grad(
                (output * torch.randn_like(output)).sum(),
                vectors,
                allow_unused=True,
            )
            if gradient is not None:
                assert bool(torch.isfinite(gradient).all()), (name, o3_lambda)


def test_gradient_finite_at_zero_vectors():
    """The smooth normalisation keeps gradients finite where the vectors vanish."""
    for o3_lambda, o3_sigma in BLOCKS:
        basis = TensorBasis(o3_lambda, o3_sigma, 2, o3_sigma == -1)
        vectors = torch.zeros(2, basis.n_vectors, 3, requires_grad=True)
        density = torch.zeros(2, 2 * o3_lambda + 1, 2, requires_grad=True)
        values = basis(vectors, density)
        assert bool(torch.isfinite(values).all())
        if not values.requires_grad:  # λ = 0, σ = +1: the constant basis
            continue
        gradients = torch.autograd.grad(
            values.sum(), [vectors, density], allow_unused=True
        )
        for gradient in gradients:
            if gradient is not None:
                assert bool(torch.isfinite(gradient).all())


def test_continuity_at_cutoff():
    """A neighbor crossing the cutoff changes the outputs continuously."""
    torch.manual_seed(21)
    base = _random_pairs(5, 1.0, 3.0)
    direction = torch.tensor([[0.3, -0.5, 0.8]])
    direction = direction / torch.linalg.norm(direction)
    species = [0, 1, 2, 0, 1, 2]

    for o3_lambda, o3_sigma in [(1, 1), (2, -1), (3, 1), (6, -1)]:
        head = _head(o3_lambda, o3_sigma)
        coefficients = torch.randn(1, head.n_coefficients)

        def evaluate(r: float, head=head, coefficients=coefficients):
            vectors = torch.cat([base, r * direction])
            with torch.no_grad():
                return head(coefficients, *_single_center(vectors, species))

        with torch.no_grad():
            absent = head(coefficients, *_single_center(base, species[:5]))
        scale = float(absent.abs().max())
        # just beyond the cutoff (fc = 0) the pair changes nothing
        assert torch.equal(evaluate(CUTOFF + 1e-3), absent)
        # approaching the cutoff from inside, the difference goes to zero
        differences = [
            float((evaluate(CUTOFF - eps) - absent).abs().max())
            for eps in (1e-1, 1e-2, 1e-3)
        ]
        assert differences[0] > differences[1] > differences[2] or differences[2] == 0
        assert differences[2] < 1e-12 * scale
        # scan across the switching region: the largest jump halves with the step
        jumps = []
        largest = scale
        for n_steps in (60, 120):
            radii = torch.linspace(CUTOFF - WIDTH - 0.1, CUTOFF + 0.1, n_steps)
            values = torch.stack([evaluate(float(r)) for r in radii])
            jumps.append(float((values[1:] - values[:-1]).abs().max()))
            largest = max(largest, float(values.abs().max()))
        assert jumps[0] < 0.1 * largest
        assert jumps[1] < 0.6 * jumps[0]


# ------------------------------------------------------------------------------------
# TorchScript, errors
# ------------------------------------------------------------------------------------


def test_torchscript():
    torch.manual_seed(5)
    n_atoms = 4
    system = _inputs(*_random_system(n_atoms, 20))

    vectors_module = EquivariantVectors(D_PAIR, 3, d_hidden=8)
    scripted = torch.jit.script(vectors_module)
    assert torch.equal(scripted(*system, n_atoms), vectors_module(*system, n_atoms))

    density_module = LambdaDensity(D_PAIR, 4, 2)
    scripted = torch.jit.script(density_module)
    for a, b in zip(scripted(*system, n_atoms), density_module(*system, n_atoms)):
        assert torch.equal(a, b)

    for o3_lambda, o3_sigma in [(0, 1), (0, -1), (1, -1), (2, 1), (5, -1)]:
        basis = TensorBasis(o3_lambda, o3_sigma, 2, o3_sigma == -1)
        vectors = torch.randn(n_atoms, basis.n_vectors, 3)
        density = torch.randn(n_atoms, 2 * o3_lambda + 1, 2)
        scripted = torch.jit.script(basis)
        assert torch.allclose(
            scripted(vectors, density), basis(vectors, density), rtol=0, atol=1e-15
        )

    for o3_lambda, o3_sigma in [(0, 1), (0, -1), (3, 1), (2, -1)]:
        head = _head(o3_lambda, o3_sigma)
        scripted = torch.jit.script(head)
        coefficients = torch.randn(n_atoms, head.n_coefficients)
        assert torch.allclose(
            scripted(coefficients, *system),
            head(coefficients, *system),
            rtol=0,
            atol=1e-15,
        )
        assert torch.allclose(
            scripted.compute_basis(*system, n_atoms),
            head.compute_basis(*system, n_atoms),
            rtol=0,
            atol=1e-15,
        )


def test_errors_name_the_input():
    head = _head(2, 1)
    system = _inputs(*_random_system(3, 6))
    with pytest.raises(ValueError, match="coefficients"):
        head(torch.zeros(3, 5), *system)
    with pytest.raises(ValueError, match="pair_features"):
        head(torch.zeros(3, head.n_coefficients), system[0][:, :3], *system[1:])
    with pytest.raises(ValueError, match="vectors"):
        TensorBasis(2, 1)(torch.zeros(3, 2, 3))
    with pytest.raises(ValueError, match="density"):
        TensorBasis(2, 1, n_density=2)(torch.zeros(3, 3, 3))
    with pytest.raises(ValueError, match="o3_sigma"):
        TensorBasis(2, 0)
