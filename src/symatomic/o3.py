"""O(3) conventions: real Clebsch–Gordan coefficients and Cartesian ↔ spherical maps.

Conventions are the ecosystem's (metatensor / metatomic / sphericart):

* real spherical harmonics, components ordered ``o3_mu = -λ … λ``; for ``λ = 1`` the
  components are ``(y, z, x)``;
* a block ``(o3_lambda, o3_sigma)`` is multiplied by ``o3_sigma * (-1) ** o3_lambda``
  under inversion; ``o3_sigma = -1`` marks pseudotensors;
* the rank-2 decomposition is the one of :mod:`metatomic.torch.o3`: ``λ = 0`` is
  ``trace / √3``, ``λ = 1`` (``σ = -1``) the antisymmetric part, ``λ = 2`` the symmetric
  traceless part, all orthonormal (the Frobenius norm is preserved).

Complex Clebsch–Gordan coefficients come from :mod:`wigners`; they are turned into
real ones with the same complex → real change of basis that :mod:`metatomic.torch.o3`
uses for its Wigner-D matrices, so every block built here rotates with metatomic's
Wigner-D matrices (this is tested).
"""

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
import wigners

__all__ = [
    "CartesianDecomposition",
    "CartesianBlock",
    "complex_to_real_transform",
    "real_clebsch_gordan",
    "couple",
    "inversion_parity",
]


def inversion_parity(o3_lambda: int, o3_sigma: int) -> int:
    """Factor picked up by a ``(o3_lambda, o3_sigma)`` block under inversion."""
    if o3_sigma not in (-1, 1):
        raise ValueError(f"o3_sigma must be +1 or -1, got {o3_sigma}")
    return o3_sigma * (-1) ** o3_lambda


@functools.cache
def complex_to_real_transform(o3_lambda: int) -> np.ndarray:
    """Unitary ``T`` with ``Y_real = T @ Y_complex``, both ordered ``m = -λ … λ``.

    This is the change of basis used by :mod:`metatomic.torch.o3` (and sphericart's
    real harmonics with the Condon–Shortley phase).

    :return: complex array of shape ``(2λ+1, 2λ+1)``
    """
    size = 2 * o3_lambda + 1
    transform = np.zeros((size, size), dtype=complex)
    for m in range(-o3_lambda, o3_lambda + 1):
        row = m + o3_lambda
        if m > 0:
            transform[row, o3_lambda + m] = (-1) ** m / np.sqrt(2)
            transform[row, o3_lambda - m] = 1 / np.sqrt(2)
        elif m < 0:
            transform[row, o3_lambda + abs(m)] = -1j * (-1) ** m / np.sqrt(2)
            transform[row, o3_lambda - abs(m)] = 1j / np.sqrt(2)
        else:
            transform[row, o3_lambda] = 1.0
    return transform


@functools.cache
def real_clebsch_gordan(l1: int, l2: int, o3_lambda: int) -> np.ndarray:
    """Real Clebsch–Gordan coefficients coupling ``l1 ⊗ l2 → λ``.

    ``[a ⊗ b]_μ = Σ_{m1, m2} C[m1, m2, μ] a_{m1} b_{m2}`` transforms like a real
    spherical harmonic of degree ``λ`` when ``a`` and ``b`` transform like degrees
    ``l1`` and ``l2``. The coefficients are orthonormal: for fixed ``(l1, l2)``, the
    maps for all allowed ``λ`` together form an orthogonal change of basis.

    :return: float64 array of shape ``(2 l1 + 1, 2 l2 + 1, 2λ + 1)``
    """
    if not abs(l1 - l2) <= o3_lambda <= l1 + l2:
        raise ValueError(f"cannot couple l1={l1} and l2={l2} to λ={o3_lambda}")
    complex_cg = np.asarray(wigners.clebsch_gordan_array(l1, l2, o3_lambda))
    t1 = complex_to_real_transform(l1)
    t2 = complex_to_real_transform(l2)
    t3 = complex_to_real_transform(o3_lambda)
    real_cg = np.einsum("ia,jb,abc,kc->ijk", t1.conj(), t2.conj(), complex_cg, t3)
    # the result is either purely real or purely imaginary (a global phase)
    if np.abs(real_cg.real).max() >= np.abs(real_cg.imag).max():
        result = real_cg.real
    else:
        result = real_cg.imag
    return np.ascontiguousarray(result)


# (y, z, x) <- (x, y, z): the spherical λ = 1 components of a Cartesian vector
_VECTOR_TO_SPHERICAL = np.array(
    [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
)  # [μ, xyz]


@dataclass(frozen=True)
class CartesianBlock:
    """One spherical block of a Cartesian tensor decomposition.

    ``basis[c, μ, k]`` maps the flattened Cartesian component ``c`` (row-major,
    ``3**rank`` of them) to component ``μ`` of the ``k``-th copy of this irrep.
    """

    o3_lambda: int
    o3_sigma: int
    basis: np.ndarray  # (3**rank, 2λ+1, multiplicity)

    @property
    def multiplicity(self) -> int:
        return self.basis.shape[2]


class CartesianDecomposition:
    """Orthonormal decomposition of rank-``rank`` Cartesian tensors into O(3) blocks.

    The decomposition couples the indices left to right with real Clebsch–Gordan
    coefficients: ``((1 ⊗ 1)_{l12} ⊗ 1)_λ`` for rank 3. When ``symmetric`` is true only
    the subspace of tensors symmetric under every permutation of their indices is kept
    (rank 2: ``λ = 0, 2``; rank 3: ``λ = 1, 3``); otherwise every block is kept and
    irreps appearing several times (rank 3) get a multiplicity axis, ordered by the
    intermediate coupling ``l12``.

    Every block has the parity of a polar rank-``rank`` tensor, so
    ``o3_sigma = (-1) ** (rank + λ)``. The overall sign of each block is fixed so
    that the first non-zero Cartesian coefficient of its ``μ = -λ`` component is
    positive; for rank 2 this reproduces :mod:`metatomic.torch.o3` exactly.

    :param rank: 1, 2 or 3
    :param symmetric: keep only the fully symmetric part
    """

    def __init__(self, rank: int, symmetric: bool = False):
        if rank not in (1, 2, 3):
            raise ValueError(
                f"Cartesian tensors of rank {rank} are not supported (1-3)"
            )
        self.rank = rank
        self.symmetric = bool(symmetric) and rank > 1
        self.blocks: List[CartesianBlock] = _build_decomposition(rank, self.symmetric)

    @property
    def irreps(self) -> List[Tuple[int, int]]:
        """``(o3_lambda, o3_sigma)`` of every block, in order."""
        return [(b.o3_lambda, b.o3_sigma) for b in self.blocks]

    def to_spherical(self, values: torch.Tensor) -> List[torch.Tensor]:
        """Decompose Cartesian tensors.

        :param values: ``(n, 3, …, 3, p)`` with ``rank`` Cartesian axes, or
            ``(n, 3**rank, p)``
        :return: one tensor per block, ``(n, 2λ+1, multiplicity * p)``; properties are
            ordered copy-major (``k * p + property``)
        """
        n = values.shape[0]
        p = values.shape[-1]
        flat = values.reshape(n, 3**self.rank, p)
        result = []
        for block in self.blocks:
            basis = torch.as_tensor(
                block.basis, dtype=values.dtype, device=values.device
            )
            out = torch.einsum("ncp,cmk->nmkp", flat, basis)
            result.append(out.reshape(n, basis.shape[1], -1))
        return result

    def to_cartesian(self, blocks: List[torch.Tensor]) -> torch.Tensor:
        """Rebuild Cartesian tensors from the blocks given by :meth:`to_spherical`.

        :return: ``(n, 3, …, 3, p)``
        """
        if len(blocks) != len(self.blocks):
            raise ValueError(
                f"expected {len(self.blocks)} spherical blocks, got {len(blocks)}"
            )
        total = None
        for block, values in zip(self.blocks, blocks):
            basis = torch.as_tensor(
                block.basis, dtype=values.dtype, device=values.device
            )
            n, components, kp = values.shape
            if components != basis.shape[1] or kp % basis.shape[2] != 0:
                raise ValueError(
                    f"block (λ={block.o3_lambda}) has shape {tuple(values.shape)}, "
                    f"expected (n, {basis.shape[1]}, {basis.shape[2]} * p)"
                )
            v = values.reshape(n, components, basis.shape[2], -1)
            term = torch.einsum("nmkp,cmk->ncp", v, basis)
            total = term if total is None else total + term
        assert total is not None
        return total.reshape([total.shape[0]] + [3] * self.rank + [total.shape[-1]])


def _couple(left: np.ndarray, left_lambda: int, o3_lambda: int) -> np.ndarray:
    """Couple a ``(3**r, 2 l + 1)`` basis with one more vector index."""
    cg = real_clebsch_gordan(left_lambda, 1, o3_lambda)  # (2l+1, 3, 2λ+1)
    # left[c, m1] * vec[x, m2] * cg[m1, m2, μ] -> new[(c, x), μ]
    new = np.einsum("cm,xn,mnk->cxk", left, _VECTOR_TO_SPHERICAL.T, cg)
    return new.reshape(left.shape[0] * 3, 2 * o3_lambda + 1)


def _fix_sign(basis: np.ndarray) -> np.ndarray:
    """Flip ``basis[:, :, k]`` so the first non-zero entry of ``μ = -λ`` is positive."""
    basis = basis.copy()
    for k in range(basis.shape[2]):
        column = basis[:, 0, k]
        nonzero = np.nonzero(np.abs(column) > 1e-10)[0]
        if len(nonzero) > 0 and column[nonzero[0]] < 0:
            basis[:, :, k] *= -1
    return basis


def _symmetrizer(rank: int) -> np.ndarray:
    """Projector on tensors symmetric under all index permutations, (3^r, 3^r)."""
    size = 3**rank
    projector = np.zeros((size, size))
    permutations = list(itertools.permutations(range(rank)))
    for index in itertools.product(range(3), repeat=rank):
        flat = np.ravel_multi_index(index, [3] * rank)
        for perm in permutations:
            permuted = np.ravel_multi_index([index[p] for p in perm], [3] * rank)
            projector[flat, permuted] += 1.0 / len(permutations)
    return projector


@functools.cache
def _build_decomposition_cached(rank: int, symmetric: bool) -> Tuple:
    # paths: list of (λ, basis (3^r, 2λ+1)) in coupling order
    paths: List[Tuple[int, Tuple[int, ...], np.ndarray]] = [
        (1, (), _VECTOR_TO_SPHERICAL.T.copy())
    ]
    for _ in range(rank - 1):
        new_paths = []
        for left_lambda, history, left in paths:
            for o3_lambda in range(abs(left_lambda - 1), left_lambda + 2):
                new_paths.append(
                    (
                        o3_lambda,
                        history + (left_lambda,),
                        _couple(left, left_lambda, o3_lambda),
                    )
                )
        paths = new_paths

    by_lambda: Dict[int, List[np.ndarray]] = {}
    for o3_lambda, _history, basis in sorted(paths, key=lambda p: (p[0], p[1])):
        by_lambda.setdefault(o3_lambda, []).append(basis)

    projector = _symmetrizer(rank) if symmetric else None
    blocks = []
    for o3_lambda in sorted(by_lambda):
        basis = np.stack(by_lambda[o3_lambda], axis=2)  # (3^r, 2λ+1, mult)
        if projector is not None:
            # the symmetrizer commutes with rotations: it acts on the multiplicity
            # index only, through this (mult, mult) matrix
            overlap = np.einsum(
                "ck,cd,dl->kl", basis[:, 0, :], projector, basis[:, 0, :]
            )
            eigenvalues, eigenvectors = np.linalg.eigh(overlap)
            keep = eigenvalues > 0.5
            if not np.any(keep):
                continue
            basis = np.einsum("cmk,kj->cmj", basis, eigenvectors[:, keep])
        basis = _fix_sign(basis)
        o3_sigma = (-1) ** (rank + o3_lambda)
        blocks.append((o3_lambda, o3_sigma, basis))
    return tuple(blocks)


def _build_decomposition(rank: int, symmetric: bool) -> List[CartesianBlock]:
    return [
        CartesianBlock(o3_lambda=lam, o3_sigma=sig, basis=basis.copy())
        for lam, sig, basis in _build_decomposition_cached(rank, symmetric)
    ]


class WignerD(torch.nn.Module):
    """Real Wigner-D matrices of rotation matrices, differentiable and scriptable.

    ``D^λ(R)`` is the matrix with ``Y^λ(R r) = D^λ(R) Y^λ(r)`` for the real spherical
    harmonics of metatomic and sphericart (tested against
    :class:`metatomic.torch.o3.O3Transformations`). ``D^1`` is the rotation matrix in
    the ``(y, z, x)`` order of the λ = 1 harmonics; higher orders follow exactly from
    the coupling ``λ - 1 ⊗ 1 → λ``: ``D^λ = Cᵀ (D^{λ-1} ⊗ D^1) C`` with the real
    Clebsch–Gordan coefficients ``C`` of :func:`real_clebsch_gordan`. Everything is
    plain torch (no extension: exported models load anywhere) and differentiable to
    any order with respect to the rotation, as needed when rotations depend on
    atomic positions (ECSE frames).

    :param max_lambda: largest ``o3_lambda``
    """

    couplings: List[torch.Tensor]

    def __init__(self, max_lambda: int):
        super().__init__()
        self.max_lambda = int(max_lambda)
        # constants, not buffers: nothing of this module goes to the state dict
        self.vector_to_spherical = torch.tensor(
            _VECTOR_TO_SPHERICAL, dtype=torch.float64
        )
        couplings: List[torch.Tensor] = []
        for o3_lambda in range(2, self.max_lambda + 1):
            couplings.append(
                torch.tensor(real_clebsch_gordan(o3_lambda - 1, 1, o3_lambda))
            )
        # (2λ - 1, 3, 2λ + 1) for λ = 2 … max_lambda
        self.couplings = couplings

    def forward(self, rotations: torch.Tensor) -> List[torch.Tensor]:
        """
        :param rotations: ``(n, 3, 3)`` proper rotation matrices
        :return: ``max_lambda + 1`` tensors ``(n, 2λ+1, 2λ+1)``
        """
        n = rotations.shape[0]
        dtype = rotations.dtype
        device = rotations.device
        permutation = self.vector_to_spherical.to(dtype=dtype, device=device)
        result: List[torch.Tensor] = [torch.ones(n, 1, 1, dtype=dtype, device=device)]
        if self.max_lambda == 0:
            return result
        d1 = torch.matmul(torch.matmul(permutation, rotations), permutation.T)
        result.append(d1)
        previous = d1
        for coupling in self.couplings:
            c = coupling.to(dtype=dtype, device=device)
            # D^λ[m, k] = Σ C[a, b, m] C[c, d, k] D^{λ-1}[a, c] D^1[b, d]
            left = torch.einsum("abm,nac->nbmc", c, previous)
            both = torch.einsum("nbmc,nbd->nmcd", left, d1)
            previous = torch.einsum("nmcd,cdk->nmk", both, c)
            result.append(previous)
        return result


def couple(a: torch.Tensor, b: torch.Tensor, coupling: torch.Tensor) -> torch.Tensor:
    """Clebsch–Gordan coupling ``[a ⊗ b]_λ`` of per-row spherical components.

    ``a``: ``(n, 2l1+1)``, ``b``: ``(n, 2l2+1)``, ``coupling``: ``(2l1+1, 2l2+1,
    2λ+1)`` (:func:`real_clebsch_gordan`); returns ``(n, 2λ+1)``. The same as
    ``einsum("na,nb,abm->nm", a, b, coupling)``, as one outer product and one matrix
    product (fewer, larger operations than einsum's reshapes and batched products).
    """
    n = a.shape[0]
    size = coupling.shape[0] * coupling.shape[1]
    outer = (a.unsqueeze(2) * b.unsqueeze(1)).reshape(n, size)
    return torch.matmul(outer, coupling.reshape(size, coupling.shape[2]))


class SolidHarmonics(torch.nn.Module):
    """Real solid harmonics ``r^λ Y^λ_μ(r̂)``, differentiable and scriptable.

    Same functions, normalization and signs as sphericart's ``SolidHarmonics`` and
    metatomic's real spherical harmonics (``Y^λ`` orthonormal on the sphere, λ = 1 in
    ``(y, z, x)`` order; tested against sphericart). Built by the coupling recursion
    ``S^λ ∝ [S^{λ-1} ⊗ S^1]_λ`` with the real Clebsch–Gordan coefficients of
    :func:`real_clebsch_gordan`: plain torch, so exported models need no extension.
    They are homogeneous polynomials of the Cartesian components: smooth everywhere,
    zero at ``r = 0`` for λ ≥ 1.

    :param max_lambda: largest ``o3_lambda``
    """

    couplings: List[torch.Tensor]
    scales: List[float]

    def __init__(self, max_lambda: int):
        super().__init__()
        if max_lambda < 0:
            raise ValueError(f"max_lambda must be non-negative, got {max_lambda}")
        self.max_lambda = int(max_lambda)
        self.vector_to_spherical = torch.tensor(
            _VECTOR_TO_SPHERICAL, dtype=torch.float64
        )
        couplings: List[torch.Tensor] = []
        for o3_lambda in range(2, self.max_lambda + 1):
            couplings.append(
                torch.tensor(real_clebsch_gordan(o3_lambda - 1, 1, o3_lambda))
            )
        self.couplings = couplings
        # the recursion gives S^λ up to one factor per λ: fix it with Y^λ_0(ẑ), which
        # is +sqrt((2λ+1)/4π) in every convention
        self.scales = [1.0] * (self.max_lambda + 1)
        unscaled = self.forward(torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64))
        for o3_lambda, values in enumerate(unscaled):
            target = math.sqrt((2 * o3_lambda + 1) / (4 * math.pi))
            self.scales[o3_lambda] = target / float(values[0, o3_lambda])

    def forward(self, vectors: torch.Tensor) -> List[torch.Tensor]:
        """
        :param vectors: ``(n, 3)`` Cartesian vectors ``(x, y, z)``
        :return: ``max_lambda + 1`` tensors ``(n, 2λ+1)``, ``μ = -λ … λ``
        """
        n = vectors.shape[0]
        dtype = vectors.dtype
        device = vectors.device
        first = torch.matmul(
            vectors, self.vector_to_spherical.to(dtype=dtype, device=device).T
        )  # (n, 3) in (y, z, x) order
        unscaled: List[torch.Tensor] = [torch.ones(n, 1, dtype=dtype, device=device)]
        if self.max_lambda >= 1:
            unscaled.append(first)
        previous = first
        for coupling in self.couplings:
            c = coupling.to(dtype=dtype, device=device)
            previous = couple(previous, first, c)
            unscaled.append(previous)
        return [values * self.scales[i] for i, values in enumerate(unscaled)]
