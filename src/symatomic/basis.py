"""Scalar-basis tensor heads: equivariant outputs as invariants × a small tensor basis.

A spherical target block ``(λ, σ)`` is predicted per atom as

    ``T_{i,μ,p} = Σ_b s_{i,b,p} B_{i,μ,b}``

with invariant coefficients ``s`` (from any scalar model) and a small basis ``B`` of
``(λ, σ)`` tensors built from the atom's environment (Domina, Bigi, Pegolo, Ceriotti,
J. Chem. Phys. 2025). Everything here is plain torch and TorchScript-compatible.

Building blocks, all per atom:

* :class:`EquivariantVectors` — learned vectors ``v_k(i) = Σ_j c_k(e_ij) fc(r_ij) r_ij``;
* :class:`LambdaDensity` — contracted λ-densities
  ``ρ^λ_{i,μ,k} = Σ_j g_{λ,k}(e_ij) fc(r_ij) Y^λ_μ(r̂_ij)``, which survive in symmetric
  environments where the vectors vanish (the C of a tetrahedral CH4 has ``v = 0`` but
  a non-zero ``λ = 3`` density);
* :class:`TensorBasis` — the basis ``B`` from vectors and densities;
* :class:`ScalarBasisHead` — everything above, contracted with the coefficients.

Conventions: Cartesian vectors are ``(x, y, z)``; spherical components are
``o3_mu = -λ … λ`` with λ = 1 in ``(y, z, x)`` order (real harmonics of
:class:`symatomic.o3.SolidHarmonics`); a ``(λ, σ)`` block picks up ``σ (-1)^λ`` under
inversion.

Smoothness and conditioning: vectors and densities are divided by a smooth, strictly
positive invariant before they enter the basis (``ṽ = v / sqrt(1 + |v|²)``, and the
same per density channel), so every basis function is a bounded, C∞ function of the
pair vectors, with finite gradients everywhere (``v = 0`` included). Pairs enter
through ``fc(r_ij)``, so the basis is continuous (C∞) as neighbours cross the cutoff.
"""

from typing import List, Optional

import torch

from .o3 import SolidHarmonics, couple, real_clebsch_gordan

__all__ = [
    "EquivariantVectors",
    "LambdaDensity",
    "TensorBasis",
    "ScalarBasisHead",
    "default_n_density",
    "pair_directions",
]


def _pair_mlp(d_in: int, d_out: int, d_hidden: int) -> torch.nn.Module:
    """Linear map (``d_hidden = 0``) or one-hidden-layer SiLU MLP of pair features."""
    if d_hidden <= 0:
        return torch.nn.Linear(d_in, d_out)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, d_hidden),
        torch.nn.SiLU(),
        torch.nn.Linear(d_hidden, d_out),
    )


def _check_pairs(
    pair_features: torch.Tensor,
    pair_vectors: torch.Tensor,
    cutoff_factors: torch.Tensor,
    centers: torch.Tensor,
    d_pair: int,
):
    n_pairs = pair_vectors.shape[0]
    if pair_vectors.dim() != 2 or pair_vectors.shape[1] != 3:
        raise ValueError(
            f"pair_vectors must have shape (n_pairs, 3), got {list(pair_vectors.shape)}"
        )
    if pair_features.dim() != 2 or pair_features.shape[1] != d_pair:
        raise ValueError(
            f"pair_features must have shape (n_pairs, {d_pair}), "
            f"got {list(pair_features.shape)}"
        )
    if pair_features.shape[0] != n_pairs:
        raise ValueError(
            f"pair_features has {pair_features.shape[0]} rows but pair_vectors has "
            f"{n_pairs}"
        )
    if cutoff_factors.shape != (n_pairs,):
        raise ValueError(
            f"cutoff_factors must have shape ({n_pairs},), "
            f"got {list(cutoff_factors.shape)}"
        )
    if centers.shape != (n_pairs,):
        raise ValueError(
            f"centers must have shape ({n_pairs},), got {list(centers.shape)}"
        )


class EquivariantVectors(torch.nn.Module):
    """Learned per-atom vectors ``v_k(i) = Σ_j c_k(e_ij) fc(r_ij) r_ij``.

    ``c_k`` is a linear map (``d_hidden = 0``) or a small MLP of the invariant pair
    features ``e_ij``. The vectors are true (polar) vectors, smooth in the positions
    and continuous as neighbours cross the cutoff.

    :param d_pair: size of the invariant pair features
    :param n_vectors: number of vectors per atom
    :param d_hidden: hidden size of the MLP giving ``c``; 0 for a linear map
    """

    def __init__(self, d_pair: int, n_vectors: int, d_hidden: int = 0):
        super().__init__()
        if n_vectors < 1:
            raise ValueError(f"n_vectors must be positive, got {n_vectors}")
        self.d_pair = int(d_pair)
        self.n_vectors = int(n_vectors)
        self.coefficients = _pair_mlp(self.d_pair, self.n_vectors, d_hidden)

    def forward(
        self,
        pair_features: torch.Tensor,
        pair_vectors: torch.Tensor,
        cutoff_factors: torch.Tensor,
        centers: torch.Tensor,
        n_atoms: int,
    ) -> torch.Tensor:
        """
        :param pair_features: ``(n_pairs, d_pair)`` invariant pair features
        :param pair_vectors: ``(n_pairs, 3)`` ``r_j - r_i`` in Å, ``(x, y, z)``
        :param cutoff_factors: ``(n_pairs,)`` smooth cutoff ``fc(r_ij)``
        :param centers: ``(n_pairs,)`` index ``i`` of the center of every pair
        :param n_atoms: number of atoms
        :return: ``(n_atoms, n_vectors, 3)`` Cartesian vectors
        """
        _check_pairs(pair_features, pair_vectors, cutoff_factors, centers, self.d_pair)
        c = self.coefficients(pair_features) * cutoff_factors.unsqueeze(1)
        contributions = c.unsqueeze(2) * pair_vectors.unsqueeze(1)  # (P, K, 3)
        result = torch.zeros(
            n_atoms,
            self.n_vectors,
            3,
            dtype=pair_vectors.dtype,
            device=pair_vectors.device,
        )
        return result.index_add(0, centers, contributions)


class LambdaDensity(torch.nn.Module):
    """Contracted angular densities ``ρ^λ_{i,μ,k} = Σ_j g_{λ,k}(e_ij) fc(r_ij)
    Y^λ_μ(r̂_ij)`` for ``λ = 0 … max_lambda``.

    ``Y^λ`` are real spherical harmonics (orthonormal on the sphere, the ones of
    :class:`symatomic.o3.SolidHarmonics` evaluated at unit vectors) and ``g`` a linear
    map or small MLP of invariant pair features. ``fc`` makes the densities
    continuous (C∞) as neighbours cross the cutoff; pairs are expected at ``r > 0``
    (the direction of a pair at ``r = 0`` is undefined).

    :param d_pair: size of the invariant pair features
    :param max_lambda: largest angular order
    :param n_channels: number of contracted channels per λ
    :param d_hidden: hidden size of the MLP giving ``g``; 0 for a linear map
    """

    def __init__(
        self, d_pair: int, max_lambda: int, n_channels: int, d_hidden: int = 0
    ):
        super().__init__()
        if max_lambda < 0:
            raise ValueError(f"max_lambda must be non-negative, got {max_lambda}")
        if n_channels < 1:
            raise ValueError(f"n_channels must be positive, got {n_channels}")
        self.d_pair = int(d_pair)
        self.max_lambda = int(max_lambda)
        self.n_channels = int(n_channels)
        self.radial = _pair_mlp(
            self.d_pair, (self.max_lambda + 1) * self.n_channels, d_hidden
        )
        self.harmonics = SolidHarmonics(self.max_lambda)

    def forward(
        self,
        pair_features: torch.Tensor,
        pair_vectors: torch.Tensor,
        cutoff_factors: torch.Tensor,
        centers: torch.Tensor,
        n_atoms: int,
    ) -> List[torch.Tensor]:
        """
        :param pair_features: ``(n_pairs, d_pair)`` invariant pair features
        :param pair_vectors: ``(n_pairs, 3)`` ``r_j - r_i`` in Å, ``(x, y, z)``
        :param cutoff_factors: ``(n_pairs,)`` smooth cutoff ``fc(r_ij)``
        :param centers: ``(n_pairs,)`` index ``i`` of the center of every pair
        :param n_atoms: number of atoms
        :return: ``max_lambda + 1`` tensors ``(n_atoms, 2λ+1, n_channels)``
        """
        _check_pairs(pair_features, pair_vectors, cutoff_factors, centers, self.d_pair)
        n_pairs = pair_vectors.shape[0]
        harmonics = self.harmonics(pair_directions(pair_vectors))
        g = self.radial(pair_features) * cutoff_factors.unsqueeze(1)
        g = g.reshape(n_pairs, self.max_lambda + 1, self.n_channels)
        result: List[torch.Tensor] = []
        for o3_lambda, y in enumerate(harmonics):
            contributions = y.unsqueeze(2) * g[:, o3_lambda, :].unsqueeze(1)
            density = torch.zeros(
                n_atoms,
                2 * o3_lambda + 1,
                self.n_channels,
                dtype=pair_vectors.dtype,
                device=pair_vectors.device,
            )
            result.append(density.index_add(0, centers, contributions))
        return result


# kinds of vector terms in TensorBasis
_PAIR = 0  # [Y^l1(v_a) ⊗ Y^l2(v_b)]_λ
_TRIPLE = 1  # [[Y^l1(v_a) ⊗ Y^l2(v_b)]_l12 ⊗ v_c]_λ


class TensorBasis(torch.nn.Module):
    """Basis ``B (n_atoms, 2λ+1, n_basis)`` of ``(λ, σ)`` tensors from per-atom vectors
    and λ-densities.

    Vectors and densities are first normalised smoothly (``ṽ = v / sqrt(1 + |v|²)``,
    ``ρ̃_k = ρ_k / sqrt(1 + |ρ_k|²)`` per channel), so the basis is bounded with finite
    gradients everywhere. Each vector term is multiplied by a constant fixed at
    construction, so that it has unit RMS norm for random unit ``ṽ`` (the saturated
    regime): all basis functions are then of order one instead of spanning orders
    of magnitude (a bare ``ṽ1 · (ṽ2 × ṽ3)`` through solid harmonics is ~1e-2).

    ``Y^l`` are real solid harmonics, ``[a ⊗ b]_λ`` real Clebsch–Gordan couplings; ``v1, v2, v3`` are the first three vectors. A product of
    degree ``d`` in true vectors has inversion parity ``(-1)^d``; a ``(λ, σ)`` block
    needs ``σ (-1)^λ``, so proper tensors use degree ``λ`` and pseudotensors degree
    ``λ + 1`` (``λ + 3`` for pseudoscalars).

    ``σ = +1`` ("maximally coupled" products, ``2λ + 1`` functions, as in the paper):

    * ``[Y^l(v1) ⊗ Y^{λ-l}(v2)]_λ`` for ``l = 0 … λ``;
    * ``[[Y^l(v1) ⊗ Y^{λ-1-l}(v2)]_{λ-1} ⊗ v3]_λ`` for ``l = 0 … λ-1``;

      (λ = 0: ``1``; λ = 1: ``v1, v2, v3``; λ = 2: ``Y²(v1), Y²(v2), [v1⊗v2]₂,
      [v1⊗v3]₂, [v2⊗v3]₂``);
    * for λ ≥ 1, the ``n_density`` λ-density channels ``ρ̃^λ_k``.

    ``σ = -1`` (couplings of degree ``λ + 1``, ``2λ + 1`` functions for λ ≥ 1):

    * ``[Y^l(v1) ⊗ Y^{λ+1-l}(v2)]_λ`` for ``l = 1 … λ`` (λ = 1: ``v1 × v2``);
    * ``[Y^l(v1) ⊗ Y^{λ+1-l}(v3)]_λ`` for ``l = 1 … λ`` (λ = 1: ``v1 × v3``);
    * ``[v2 ⊗ Y^λ(v3)]_λ`` (λ = 1: ``v2 × v3``);

      ``[Y^{l1}(a) ⊗ Y^{l2}(b)]_{l1+l2-1}`` is the symmetric traceless part of
      ``(a × b) ⊗ a^{l1-1} ⊗ b^{l2-1}``. The first family alone spans the ``λ``
      pseudotensor components allowed in a planar environment; a second
      pseudo-direction (``v1 × v3``) is needed for the ``m = ±λ`` components about
      ``v1 × v2`` in generic ones. (The analogue of the proper triple family,
      ``[[Y^l(v1) ⊗ Y^{λ-l}(v2)]_λ ⊗ v3]_λ``, is linearly dependent on the first
      family for even λ, so it is not used.)
    * for λ ≥ 1, the ``n_density`` couplings ``[ρ̃^λ_k ⊗ v1]_λ``;
    * λ = 0: the single pseudoscalar ``[[v1 ⊗ v2]_1 ⊗ v3]_0 ∝ v1 · (v2 × v3)``.

    Unlike "proper basis × pseudoscalar", these do not vanish in planar environments
    (where every pseudoscalar does): a planar environment (mirror symmetry ``σ_h``)
    allows exactly ``λ`` independent pseudotensor components and ``λ + 1`` proper
    ones, and this basis spans them (tested). ``pseudoscalar_factor=True`` appends the
    variant of the design notes, the ``σ = +1`` basis (with its densities) times
    ``ṽ4 · (ṽ5 × ṽ6)`` from a second set of three vectors. It is off by default: in
    generic environments the direct basis already has full rank, and the factor
    vanishes wherever the environment has an improper symmetry (mirror, inversion,
    S_n); it only adds functions (not rank) in chiral environments.

    Counts ``n_basis``: ``σ = +1``: 1 for λ = 0, ``2λ + 1 + n_density`` otherwise;
    ``σ = -1``: 1 for λ = 0, ``2λ + 1 + n_density`` otherwise; with
    ``pseudoscalar_factor`` the ``σ = +1`` count is added.

    :param o3_lambda: angular order λ ≥ 0
    :param o3_sigma: +1 (proper tensor) or -1 (pseudotensor)
    :param n_density: number of λ-density channels used (ignored for λ = 0)
    :param pseudoscalar_factor: for σ = -1, also append the ``σ = +1`` basis times a
        pseudoscalar from three more vectors
    """

    terms: List[List[int]]
    proper_terms: List[List[int]]
    couplings: List[torch.Tensor]
    term_scales: List[float]
    proper_scales: List[float]

    def __init__(
        self,
        o3_lambda: int,
        o3_sigma: int,
        n_density: int = 0,
        pseudoscalar_factor: bool = False,
    ):
        super().__init__()
        if o3_lambda < 0:
            raise ValueError(f"o3_lambda must be non-negative, got {o3_lambda}")
        if o3_sigma not in (-1, 1):
            raise ValueError(f"o3_sigma must be +1 or -1, got {o3_sigma}")
        if n_density < 0:
            raise ValueError(f"n_density must be non-negative, got {n_density}")
        lam = int(o3_lambda)
        self.o3_lambda = lam
        self.o3_sigma = int(o3_sigma)
        self.n_density = int(n_density) if lam > 0 else 0
        self.pseudoscalar_factor = bool(pseudoscalar_factor) and self.o3_sigma == -1

        self._coupling_index: dict = {}
        couplings: List[torch.Tensor] = []
        self.couplings = couplings

        proper = self._proper_terms(lam)
        if self.o3_sigma == 1:
            self.terms = proper
            self.proper_terms = []
        else:
            self.terms = self._pseudo_terms(lam)
            self.proper_terms = proper if self.pseudoscalar_factor else []
        # the pseudoscalar ṽ4 · (ṽ5 × ṽ6) of the factor variant
        self.factor_term = [-1]
        if self.pseudoscalar_factor:
            self.factor_term = self._term(_TRIPLE, 3, 1, 4, 1, 1, 5, 0)
        # [ρ̃^λ ⊗ v1]_λ for pseudotensor densities
        self.density_coupling = -1
        if self.o3_sigma == -1 and self.n_density > 0:
            self.density_coupling = self._cg(lam, 1, lam)
        del self._coupling_index

        n_proper = (1 if lam == 0 else len(proper)) + self.n_density
        if self.o3_sigma == 1:
            self.n_basis = n_proper
        else:
            self.n_basis = len(self.terms) + self.n_density
            if self.pseudoscalar_factor:
                self.n_basis += n_proper
        self.n_vectors = 0
        for term in self.terms + self.proper_terms:
            self.n_vectors = max(self.n_vectors, term[1] + 1, term[3] + 1)
            if term[0] == _TRIPLE:
                self.n_vectors = max(self.n_vectors, term[6] + 1)
        if self.pseudoscalar_factor:
            self.n_vectors = 6
        if self.o3_sigma == -1 and self.n_density > 0:
            self.n_vectors = max(self.n_vectors, 1)
        max_l = 1
        for term in self.terms + self.proper_terms:
            max_l = max(max_l, term[2], term[4])
        self.harmonics = SolidHarmonics(max_l)
        self.max_l = max_l

        # constant scales: every term has unit RMS norm for random unit vectors (and
        # unit densities), the saturated regime of the normalisation
        self.term_scales = [1.0] * len(self.terms)
        self.proper_scales = [1.0] * len(self.proper_terms)
        self.factor_scale = 1.0
        self.density_scale = 1.0
        self._calibrate()

    # -- construction helpers (not scripted) --------------------------------------
    @torch.jit.unused
    def _cg(self, l1: int, l2: int, lam: int) -> int:
        key = (l1, l2, lam)
        if key not in self._coupling_index:
            self._coupling_index[key] = len(self.couplings)
            self.couplings.append(torch.tensor(real_clebsch_gordan(l1, l2, lam)))
        return self._coupling_index[key]

    @torch.jit.unused
    def _term(
        self, kind: int, a: int, l1: int, b: int, l2: int, l12: int, c: int, lam: int
    ) -> List[int]:
        """``[kind, a, l1, b, l2, l12, c, cg_ab, cg_(ab)c]``."""
        if kind == _PAIR:
            return [kind, a, l1, b, l2, lam, -1, self._cg(l1, l2, lam), -1]
        return [
            kind,
            a,
            l1,
            b,
            l2,
            l12,
            c,
            self._cg(l1, l2, l12),
            self._cg(l12, 1, lam),
        ]

    @torch.jit.unused
    def _proper_terms(self, lam: int) -> List[List[int]]:
        if lam == 0:
            return []  # the constant, handled in forward
        terms = [
            self._term(_PAIR, 0, l1, 1, lam - l1, lam, -1, lam) for l1 in range(lam + 1)
        ]
        for l1 in range(lam):
            terms.append(self._term(_TRIPLE, 0, l1, 1, lam - 1 - l1, lam - 1, 2, lam))
        return terms

    @torch.jit.unused
    def _pseudo_terms(self, lam: int) -> List[List[int]]:
        if lam == 0:
            return [self._term(_TRIPLE, 0, 1, 1, 1, 1, 2, 0)]
        # [v_a ⊗ v_b]-type couplings of degree λ + 1: ST((v_a × v_b) ⊗ v_a^(l-1)
        # v_b^(λ-l)); two pseudo-directions (v1 × v2, v1 × v3) and one more term
        terms = [
            self._term(_PAIR, 0, l1, 1, lam + 1 - l1, lam, -1, lam)
            for l1 in range(1, lam + 1)
        ]
        for l1 in range(1, lam + 1):
            terms.append(self._term(_PAIR, 0, l1, 2, lam + 1 - l1, lam, -1, lam))
        terms.append(self._term(_PAIR, 1, 1, 2, lam, lam, -1, lam))
        return terms

    @torch.jit.unused
    def _calibrate(self):
        generator = torch.Generator().manual_seed(0)
        n_samples = 512
        vectors = torch.randn(n_samples * 6, 3, generator=generator)
        vectors = vectors / torch.linalg.norm(vectors, dim=1, keepdim=True)
        harmonics = [
            h.reshape(n_samples, 6, -1) for h in self.harmonics(vectors.double())
        ]
        couplings = [c.double() for c in self.couplings]

        def scale(values: torch.Tensor) -> float:
            rms = float(values.pow(2).sum(dim=1).mean().sqrt())
            return 1.0 / rms if rms > 0 else 1.0

        self.term_scales = [
            scale(self._evaluate(t, harmonics, couplings, 1.0)) for t in self.terms
        ]
        self.proper_scales = [
            scale(self._evaluate(t, harmonics, couplings, 1.0))
            for t in self.proper_terms
        ]
        if self.pseudoscalar_factor:
            self.factor_scale = scale(
                self._evaluate(self.factor_term, harmonics, couplings, 1.0)
            )
        if self.density_coupling >= 0:
            size = 2 * self.o3_lambda + 1
            rho = torch.randn(n_samples, size, 1, generator=generator).double()
            rho = rho / torch.linalg.norm(rho, dim=1, keepdim=True)
            coupled = torch.einsum(
                "nak,nb,abm->nmk",
                rho,
                harmonics[1][:, 0, :],
                couplings[self.density_coupling],
            )
            self.density_scale = scale(coupled[:, :, 0])

    # -- evaluation ----------------------------------------------------------------
    def _evaluate(
        self,
        term: List[int],
        harmonics: List[torch.Tensor],
        couplings: List[torch.Tensor],
        scale: float,
    ) -> torch.Tensor:
        """One vector term times ``scale``, ``(n_atoms, 2λ+1)``; ``harmonics[l]`` is
        ``(n_atoms, n_vectors, 2l+1)``."""
        a = harmonics[term[2]][:, term[1], :]
        b = harmonics[term[4]][:, term[3], :]
        ab = couple(a, b, couplings[term[7]])
        if term[6] < 0:  # a pair term: no third vector
            return ab * scale
        c = harmonics[1][:, term[6], :]
        return couple(ab, c, couplings[term[8]]) * scale

    def forward(
        self, vectors: torch.Tensor, density: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """
        :param vectors: ``(n_atoms, n_vectors, 3)`` Cartesian true vectors, at least
            :attr:`n_vectors` of them (only the first ones are used)
        :param density: ``(n_atoms, 2λ+1, n_density)`` λ-density (true tensor, parity
            ``(-1)^λ``); required when ``n_density > 0``, else ignored
        :return: ``(n_atoms, 2λ+1, n_basis)``
        """
        if vectors.dim() != 3 or vectors.shape[2] != 3:
            raise ValueError(
                "vectors must have shape (n_atoms, n_vectors, 3), "
                f"got {list(vectors.shape)}"
            )
        if vectors.shape[1] < self.n_vectors:
            raise ValueError(
                f"TensorBasis(λ={self.o3_lambda}, σ={self.o3_sigma}) needs "
                f"{self.n_vectors} vectors per atom, got {vectors.shape[1]}"
            )
        n_atoms = vectors.shape[0]
        size = 2 * self.o3_lambda + 1
        dtype = vectors.dtype
        device = vectors.device
        couplings = [c.to(dtype=dtype, device=device) for c in self.couplings]

        # smooth normalisation: |ṽ| < 1, C∞, gradient finite at v = 0
        norm2 = (vectors * vectors).sum(dim=2, keepdim=True)
        normalized = vectors / torch.sqrt(1.0 + norm2)
        n_vec = vectors.shape[1]
        flat = self.harmonics(normalized.reshape(n_atoms * n_vec, 3))
        harmonics = [h.reshape(n_atoms, n_vec, h.shape[1]) for h in flat]

        rho = torch.zeros(n_atoms, size, 0, dtype=dtype, device=device)
        if self.n_density > 0:
            if density is None:
                raise ValueError(
                    f"TensorBasis(λ={self.o3_lambda}) with n_density="
                    f"{self.n_density} needs a density"
                )
            if (
                density.dim() != 3
                or density.shape[0] != n_atoms
                or density.shape[1] != size
                or density.shape[2] < self.n_density
            ):
                raise ValueError(
                    f"density must have shape ({n_atoms}, {size}, >={self.n_density}),"
                    f" got {list(density.shape)}"
                )
            rho = density[:, :, : self.n_density]
            rho = rho / torch.sqrt(1.0 + (rho * rho).sum(dim=1, keepdim=True))

        columns: List[torch.Tensor] = []
        if self.o3_sigma == 1 and self.o3_lambda == 0:
            columns.append(torch.ones(n_atoms, 1, 1, dtype=dtype, device=device))
        else:
            for term, scale in zip(self.terms, self.term_scales):
                values = self._evaluate(term, harmonics, couplings, scale)
                columns.append(values.unsqueeze(2))
        if self.n_density > 0:
            if self.o3_sigma == 1:
                columns.append(rho)
            else:
                v1 = harmonics[1][:, 0, :]
                coupling = couplings[self.density_coupling]
                coupled = torch.einsum("nak,nb,abm->nmk", rho, v1, coupling)
                columns.append(coupled * self.density_scale)
        if self.pseudoscalar_factor:
            factor = self._evaluate(
                self.factor_term, harmonics, couplings, self.factor_scale
            )  # (n, 1)
            proper: List[torch.Tensor] = []
            if self.o3_lambda == 0:
                proper.append(torch.ones(n_atoms, 1, 1, dtype=dtype, device=device))
            else:
                for term, scale in zip(self.proper_terms, self.proper_scales):
                    values = self._evaluate(term, harmonics, couplings, scale)
                    proper.append(values.unsqueeze(2))
            proper.append(rho)
            columns.append(torch.cat(proper, dim=2) * factor.unsqueeze(2))
        return torch.cat(columns, dim=2)


def pair_directions(pair_vectors: torch.Tensor) -> torch.Tensor:
    """Unit vectors ``r̂_ij`` of the pairs, ``(n_pairs, 3)``.

    Pairs are expected at ``r > 0``; the clamp only keeps gradients finite for bad
    input (a pair at ``r = 0`` has no direction).
    """
    r2 = (pair_vectors * pair_vectors).sum(dim=1).clamp_min(1e-20)
    return pair_vectors / torch.sqrt(r2).unsqueeze(1)


def default_n_density(o3_lambda: int) -> int:
    """Default number of λ-density channels: ``2λ + 1`` for λ ≥ 1, none for λ = 0."""
    return 2 * o3_lambda + 1 if o3_lambda > 0 else 0


class ScalarBasisHead(torch.nn.Module):
    """``T_{i,μ,p} = Σ_b s_{i,b,p} B_{i,μ,b}``: invariant coefficients times a
    :class:`TensorBasis` built from learned :class:`EquivariantVectors` and a
    :class:`LambdaDensity`.

    The coefficients ``s`` come from a scalar model (not part of this module) as
    ``(n_atoms, n_basis * n_properties)``, basis-major: column ``b * n_properties +
    p`` multiplies basis function ``b`` for property ``p``. They must be invariant
    (``σ = +1`` scalars) for the output to be equivariant.

    :param o3_lambda: angular order λ ≥ 0 of the target block
    :param o3_sigma: +1 or -1
    :param n_properties: number of properties of the block
    :param d_pair: size of the invariant pair features
    :param n_density: number of λ-density channels; ``None`` for
        :func:`default_n_density`
    :param d_hidden: hidden size of the pair MLPs (0: linear)
    :param pseudoscalar_factor: see :class:`TensorBasis`
    """

    def __init__(
        self,
        o3_lambda: int,
        o3_sigma: int,
        n_properties: int,
        d_pair: int,
        n_density: Optional[int] = None,
        d_hidden: int = 32,
        pseudoscalar_factor: bool = False,
    ):
        super().__init__()
        if n_properties < 1:
            raise ValueError(f"n_properties must be positive, got {n_properties}")
        if n_density is None:
            n_density = default_n_density(o3_lambda)
        self.o3_lambda = int(o3_lambda)
        self.o3_sigma = int(o3_sigma)
        self.n_properties = int(n_properties)
        self.tensor_basis = TensorBasis(
            o3_lambda, o3_sigma, n_density, pseudoscalar_factor
        )
        self.n_basis = self.tensor_basis.n_basis
        self.n_coefficients = self.n_basis * self.n_properties
        self.d_pair = int(d_pair)
        self.n_vectors = self.tensor_basis.n_vectors
        self.n_density = self.tensor_basis.n_density
        self.use_vectors = self.n_vectors > 0
        self.use_density = self.n_density > 0
        # one pass over the pairs gives the weights of the vectors (as in
        # EquivariantVectors) and of the λ-density channels (as in LambdaDensity,
        # for this λ only)
        self.pair_weights = _pair_mlp(
            self.d_pair, max(self.n_vectors + self.n_density, 1), d_hidden
        )
        self.harmonics = SolidHarmonics(self.o3_lambda)

    @torch.jit.export
    def compute_basis(
        self,
        pair_features: torch.Tensor,
        pair_vectors: torch.Tensor,
        cutoff_factors: torch.Tensor,
        centers: torch.Tensor,
        n_atoms: int,
        pair_harmonics: Optional[List[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """The basis ``B``, ``(n_atoms, 2λ+1, n_basis)``; arguments as in
        :meth:`forward`."""
        _check_pairs(pair_features, pair_vectors, cutoff_factors, centers, self.d_pair)
        dtype = pair_vectors.dtype
        device = pair_vectors.device
        if not (self.use_vectors or self.use_density):
            return self.tensor_basis(
                torch.zeros(n_atoms, 0, 3, dtype=dtype, device=device), None
            )
        weights = self.pair_weights(pair_features) * cutoff_factors.unsqueeze(1)
        vectors = torch.zeros(n_atoms, self.n_vectors, 3, dtype=dtype, device=device)
        if self.use_vectors:
            contributions = weights[:, : self.n_vectors].unsqueeze(
                2
            ) * pair_vectors.unsqueeze(1)
            vectors = vectors.index_add(0, centers, contributions)
        density: Optional[torch.Tensor] = None
        if self.use_density:
            if pair_harmonics is None:
                pair_harmonics = self.harmonics(pair_directions(pair_vectors))
            harmonics = pair_harmonics[self.o3_lambda]  # (P, 2λ+1)
            if harmonics.shape[0] != pair_vectors.shape[0]:
                raise ValueError(
                    f"pair_harmonics[{self.o3_lambda}] has {harmonics.shape[0]} "
                    f"rows but there are {pair_vectors.shape[0]} pairs"
                )
            contributions = harmonics.unsqueeze(2) * weights[
                :, self.n_vectors :
            ].unsqueeze(1)
            density = torch.zeros(
                n_atoms,
                2 * self.o3_lambda + 1,
                self.n_density,
                dtype=dtype,
                device=device,
            ).index_add(0, centers, contributions)
        return self.tensor_basis(vectors, density)

    def forward(
        self,
        coefficients: torch.Tensor,
        pair_features: torch.Tensor,
        pair_vectors: torch.Tensor,
        cutoff_factors: torch.Tensor,
        centers: torch.Tensor,
        pair_harmonics: Optional[List[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """
        :param coefficients: ``(n_atoms, n_basis * n_properties)`` invariants
        :param pair_features: ``(n_pairs, d_pair)`` invariant pair features
        :param pair_vectors: ``(n_pairs, 3)`` ``r_j - r_i`` in Å
        :param cutoff_factors: ``(n_pairs,)`` smooth cutoff ``fc(r_ij)``
        :param centers: ``(n_pairs,)`` center of every pair
        :param pair_harmonics: optional real spherical harmonics ``Y^l`` of the
            :func:`pair_directions`, ``l = 0 …`` at least λ, each
            ``(n_pairs, 2l+1)`` (computed here when absent; a model with several
            blocks computes them once for all)
        :return: ``(n_atoms, 2λ+1, n_properties)``
        """
        n_atoms = coefficients.shape[0]
        if coefficients.dim() != 2 or coefficients.shape[1] != self.n_coefficients:
            raise ValueError(
                f"coefficients must have shape (n_atoms, {self.n_coefficients}) "
                f"(n_basis={self.n_basis} × n_properties={self.n_properties}), "
                f"got {list(coefficients.shape)}"
            )
        basis = self.compute_basis(
            pair_features,
            pair_vectors,
            cutoff_factors,
            centers,
            n_atoms,
            pair_harmonics,
        )
        s = coefficients.reshape(n_atoms, self.n_basis, self.n_properties)
        return torch.einsum("nmb,nbp->nmp", basis, s)
