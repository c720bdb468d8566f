"""Cartesian ↔ spherical conversions against explicit formulas, and equivariance."""

import itertools
import math

import numpy as np
import pytest
import torch
from metatomic.torch.o3 import random_transformations

from symatomic.o3 import (
    CartesianDecomposition,
    WignerD,
    couple,
    inversion_parity,
    real_clebsch_gordan,
)


def _rotate_cartesian(tensor: torch.Tensor, rotation: torch.Tensor, rank: int):
    for axis in range(1, rank + 1):
        tensor = torch.movedim(
            torch.tensordot(tensor, rotation, dims=([axis], [1])), -1, axis
        )
    return tensor


def _symmetrize(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    permutations = list(itertools.permutations(range(1, rank + 1)))
    return sum(tensor.permute([0, *p, rank + 1]) for p in permutations) / len(
        permutations
    )


def test_vector_is_yzx():
    v = torch.randn(4, 3, 2, dtype=torch.float64)
    (block,) = CartesianDecomposition(1).to_spherical(v)
    assert torch.equal(block, v[:, [1, 2, 0], :])


def test_rank2_explicit_formulas():
    m = torch.randn(5, 3, 3, 2, dtype=torch.float64)
    decomposition = CartesianDecomposition(2)
    assert decomposition.irreps == [(0, 1), (1, -1), (2, 1)]
    l0, l1, l2 = decomposition.to_spherical(m)
    x, y, z = 0, 1, 2
    s2 = math.sqrt(2)
    expected_l0 = (m[:, x, x] + m[:, y, y] + m[:, z, z]) / math.sqrt(3)
    expected_l1 = torch.stack(
        [
            (m[:, x, z] - m[:, z, x]) / s2,
            (m[:, y, x] - m[:, x, y]) / s2,
            (m[:, z, y] - m[:, y, z]) / s2,
        ],
        dim=1,
    )
    expected_l2 = torch.stack(
        [
            (m[:, x, y] + m[:, y, x]) / s2,
            (m[:, y, z] + m[:, z, y]) / s2,
            (2 * m[:, z, z] - m[:, x, x] - m[:, y, y]) / math.sqrt(6),
            (m[:, x, z] + m[:, z, x]) / s2,
            (m[:, x, x] - m[:, y, y]) / s2,
        ],
        dim=1,
    )
    torch.testing.assert_close(l0[:, 0], expected_l0, atol=1e-14, rtol=0)
    torch.testing.assert_close(l1, expected_l1, atol=1e-14, rtol=0)
    torch.testing.assert_close(l2, expected_l2, atol=1e-14, rtol=0)


def test_rank2_symmetric_drops_antisymmetric_block():
    decomposition = CartesianDecomposition(2, symmetric=True)
    assert decomposition.irreps == [(0, 1), (2, 1)]
    m = _symmetrize(torch.randn(3, 3, 3, 1, dtype=torch.float64), 2)
    torch.testing.assert_close(
        decomposition.to_cartesian(decomposition.to_spherical(m)), m, atol=1e-14, rtol=0
    )


def test_rank3_symmetric_explicit_formulas():
    beta = _symmetrize(torch.randn(4, 3, 3, 3, 1, dtype=torch.float64), 3)
    decomposition = CartesianDecomposition(3, symmetric=True)
    assert decomposition.irreps == [(1, 1), (3, 1)]
    l1, l3 = decomposition.to_spherical(beta)
    # vector part: v_k = β_kjj, normalised by sqrt(3/5), in (y, z, x) order
    v = torch.einsum("nkjjp->nkp", beta)
    torch.testing.assert_close(
        l1, math.sqrt(3 / 5) * v[:, [1, 2, 0]], atol=1e-13, rtol=0
    )
    # λ=3 part: β minus its vector part (1/5)(δ_ij v_k + δ_ik v_j + δ_jk v_i)
    eye = torch.eye(3, dtype=torch.float64)
    vector_part = (
        torch.einsum("ij,nkp->nijkp", eye, v)
        + torch.einsum("ik,njp->nijkp", eye, v)
        + torch.einsum("jk,nip->nijkp", eye, v)
    ) / 5
    only_l3 = decomposition.to_cartesian([torch.zeros_like(l1), l3])
    torch.testing.assert_close(only_l3, beta - vector_part, atol=1e-13, rtol=0)
    # the λ=3 part is traceless
    assert torch.einsum("nkjjp->nkp", only_l3).abs().max() < 1e-13
    # norm preservation (orthonormal decomposition)
    torch.testing.assert_close(
        (l1**2).sum() + (l3**2).sum(), (beta**2).sum(), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize(
    "rank, symmetric", [(1, False), (2, False), (2, True), (3, False), (3, True)]
)
def test_equivariance_with_metatomic_wigner_d(rank, symmetric):
    decomposition = CartesianDecomposition(rank, symmetric)
    tensor = torch.randn([6] + [3] * rank + [2], dtype=torch.float64)
    if symmetric:
        tensor = _symmetrize(tensor, rank)
    blocks = decomposition.to_spherical(tensor)
    # round trip
    torch.testing.assert_close(
        decomposition.to_cartesian(blocks), tensor, atol=1e-13, rtol=0
    )
    for _ in range(3):
        transformation = random_transformations(
            1, 3, device=torch.device("cpu"), dtype=torch.float64, add_inversions=True
        )
        rotation = transformation.matrices[0]
        improper = bool(transformation.improper_mask[0])
        rotated = decomposition.to_spherical(_rotate_cartesian(tensor, rotation, rank))
        for (o3_lambda, o3_sigma), block, block_rotated in zip(
            decomposition.irreps, blocks, rotated
        ):
            wigner = transformation.wigner_D_matrices(o3_lambda)[0]
            parity = inversion_parity(o3_lambda, o3_sigma) if improper else 1
            expected = parity * torch.einsum("mn,snp->smp", wigner, block)
            torch.testing.assert_close(block_rotated, expected, atol=1e-12, rtol=0)


def test_rank3_multiplicities():
    decomposition = CartesianDecomposition(3)
    assert [
        (b.o3_lambda, b.o3_sigma, b.multiplicity) for b in decomposition.blocks
    ] == [
        (0, -1, 1),
        (1, 1, 3),
        (2, -1, 2),
        (3, 1, 1),
    ]
    total = sum((2 * b.o3_lambda + 1) * b.multiplicity for b in decomposition.blocks)
    assert total == 27


def test_real_clebsch_gordan_orthonormal():
    for l1, l2 in [(1, 1), (2, 1), (2, 3)]:
        columns = np.concatenate(
            [
                real_clebsch_gordan(l1, l2, lam).reshape(
                    (2 * l1 + 1) * (2 * l2 + 1), -1
                )
                for lam in range(abs(l1 - l2), l1 + l2 + 1)
            ],
            axis=1,
        )
        np.testing.assert_allclose(
            columns.T @ columns, np.eye(columns.shape[1]), atol=1e-13
        )
    with pytest.raises(ValueError, match="cannot couple"):
        real_clebsch_gordan(1, 1, 3)


def test_bad_rank():
    with pytest.raises(ValueError, match="rank 4"):
        CartesianDecomposition(4)


def test_wigner_d_matches_metatomic_and_sphericart():
    """WignerD against metatomic's Wigner-D matrices (λ = 0…6) and against the
    definition Y(R r) = D(R) Y(r) with sphericart's real harmonics; scripted."""
    import sphericart.torch

    max_lambda = 6
    wigner = torch.jit.script(WignerD(max_lambda))
    transformation = random_transformations(
        5, max_lambda, device=torch.device("cpu"), dtype=torch.float64
    )
    rotations = transformation.matrices
    matrices = wigner(rotations)
    points = torch.nn.functional.normalize(
        torch.randn(7, 3, dtype=torch.float64), dim=1
    )
    harmonics = sphericart.torch.SphericalHarmonics(max_lambda)
    before = harmonics(points)
    for o3_lambda in range(max_lambda + 1):
        expected = transformation.wigner_D_matrices(o3_lambda)
        torch.testing.assert_close(matrices[o3_lambda], expected, atol=1e-13, rtol=0)
        # orthogonal
        identity = torch.eye(2 * o3_lambda + 1, dtype=torch.float64)
        product = matrices[o3_lambda] @ matrices[o3_lambda].transpose(1, 2)
        torch.testing.assert_close(
            product, identity.expand_as(product), atol=1e-13, rtol=0
        )
        block = slice(o3_lambda**2, (o3_lambda + 1) ** 2)
        for r in range(rotations.shape[0]):
            after = harmonics(points @ rotations[r].T)[:, block]
            torch.testing.assert_close(
                after, before[:, block] @ matrices[o3_lambda][r].T, atol=1e-12, rtol=0
            )


def test_wigner_d_gradients():
    """Derivatives with respect to the rotation (ECSE frames depend on positions)."""
    wigner = WignerD(4)

    def frame(vectors):
        e1 = torch.nn.functional.normalize(vectors[0], dim=0)
        e2 = torch.nn.functional.normalize(
            torch.linalg.cross(vectors[0], vectors[1]), dim=0
        )
        e3 = torch.linalg.cross(e1, e2)
        return torch.stack([e1, e2, e3], dim=1).unsqueeze(0)

    vectors = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: wigner(frame(v))[4], (vectors,))
    assert torch.autograd.gradgradcheck(lambda v: wigner(frame(v))[3], (vectors,))


@pytest.mark.parametrize("max_lambda", [0, 1, 2])
def test_wigner_d_small_orders_script(max_lambda):
    wigner = torch.jit.script(WignerD(max_lambda))
    rotation = random_transformations(
        2, 1, device=torch.device("cpu"), dtype=torch.float64
    ).matrices
    matrices = wigner(rotation)
    assert [m.shape[1] for m in matrices] == [2 * i + 1 for i in range(max_lambda + 1)]


def test_solid_harmonics_match_sphericart():
    """Pure-torch solid harmonics equal sphericart's (values and gradients), and
    rotate with our Wigner-D matrices."""
    import sphericart.torch

    from symatomic.o3 import SolidHarmonics

    max_lambda = 7
    vectors = torch.randn(40, 3, dtype=torch.float64) * 1.5
    vectors.requires_grad_(True)
    ours = SolidHarmonics(max_lambda)(vectors)
    reference = sphericart.torch.SolidHarmonics(max_lambda)(vectors)
    for o3_lambda, values in enumerate(ours):
        expected = reference[:, o3_lambda**2 : (o3_lambda + 1) ** 2]
        scale = expected.abs().max()
        assert (values - expected).abs().max() < 1e-13 * scale
        if o3_lambda == 0:
            continue  # constant
        (ours_grad,) = torch.autograd.grad(values.sum(), vectors, retain_graph=True)
        (expected_grad,) = torch.autograd.grad(
            expected.sum(), vectors, retain_graph=True
        )
        assert (ours_grad - expected_grad).abs().max() < 1e-12 * (
            1 + expected_grad.abs().max()
        )

    rotation = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    rotation = rotation * torch.sign(torch.linalg.det(rotation))
    rotated = SolidHarmonics(max_lambda)(vectors.detach() @ rotation.T)
    wigner = WignerD(max_lambda)(rotation.unsqueeze(0))
    for o3_lambda in range(max_lambda + 1):
        expected = ours[o3_lambda].detach() @ wigner[o3_lambda][0].T
        assert torch.allclose(rotated[o3_lambda], expected, rtol=1e-12, atol=1e-10)
    assert len(torch.jit.script(SolidHarmonics(3))(vectors.detach())) == 4


@pytest.mark.parametrize("n", [0, 1, 7])
def test_couple_is_the_clebsch_gordan_contraction(n):
    """``couple`` (outer product + matrix product) equals the plain contraction, also
    for no rows (an isolated atom has no pairs)."""
    for l1, l2 in [(1, 1), (2, 1), (3, 2)]:
        for o3_lambda in range(abs(l1 - l2), l1 + l2 + 1):
            coupling = torch.tensor(real_clebsch_gordan(l1, l2, o3_lambda))
            a = torch.randn(n, 2 * l1 + 1, dtype=torch.float64)
            b = torch.randn(n, 2 * l2 + 1, dtype=torch.float64)
            expected = torch.einsum("na,nb,abm->nm", a, b, coupling)
            assert torch.allclose(couple(a, b, coupling), expected, atol=1e-14)
