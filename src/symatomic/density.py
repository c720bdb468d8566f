"""Exactly invariant pair features from the neighbor density (pure torch).

PET's original edge tokens embed the Cartesian pair vector ``r_ij``: the transformer
is then not rotationally invariant, and exactness needs ECSE frames. This module gives
PET invariant edge inputs instead, at a small fraction of PET's cost and with no
frames: for every pair ``ij``, the projections of the density of atom ``i``'s
neighbors on the direction of ``j``,

``p_{ij,l,c} = Σ_m Y_lm(r̂_ij) A_{i,l,m,c} / ((2l+1) N_avg)``,
``A_{i,l,m,c} = Σ_k fc(r_ik) g_{l,c}(r_ik, h_ik) Y_lm(r̂_ik)``,

with ``Y_lm`` the real spherical harmonics scaled by ``√(4π)`` (mean square 1 on the
sphere; the module takes the orthonormal ones of :class:`symatomic.o3.SolidHarmonics`
and applies the factor ``4π`` to the product), ``g_{l,c}`` a linear map of the products of radial functions ``R_n(r_ik)``
(Laplacian eigenstates, :class:`symatomic.soap.LaplacianEigenstates`) and of a few
learned channels of the pair's current features ``h_ik`` (in PET: the message of
``k`` to ``i``, which carries ``k``'s species and, after the first layer, its
environment), and ``N_avg`` a typical number of neighbors. By the addition theorem,
``p_{ij,l,c} = Σ_k fc(r_ik) g_{l,c}(…) P_l(r̂_ij · r̂_ik) / N_avg``: a weighted histogram of
the angles between the pair ``ij`` and every other pair of ``i`` (the sum includes
``k = j``). Both factors of every term rotate with the same orthogonal ``D^l`` and
carry the same parity ``(-1)^l``: ``p`` is exactly invariant under rotations,
inversion and permutations. It is smooth wherever ``fc`` and ``R_n`` are (pairs
enter and leave through ``fc``; PET takes the harmonics of softened directions
``r / √(r² + ε²)``, ``ε = 0.04 × cutoff``, unit vectors except for atoms that
nearly collide, where ``r̂`` would make the forces grow as ``1/r``), and it costs ``O(n_pairs (L+1)² C)``: linear in the
number of neighbors, not quadratic.
"""

import math
from typing import List

import torch

from .neighbors import padded_layout
from .soap import LaplacianEigenstates

__all__ = ["PairDensityProjections", "radial_basis"]


def radial_basis(cutoff: float, max_radial: int) -> LaplacianEigenstates:
    """The radial functions ``R_n``: ``l = 0`` Laplacian eigenstates of the ball of
    radius ``cutoff`` (``sin(nπr/r_c)/(nπr/r_c)`` up to normalisation), splined."""
    return LaplacianEigenstates(cutoff, max_radial, 0)


class PairDensityProjections(torch.nn.Module):
    """Invariant features ``p_{ij,l,c}`` of every pair (module docstring).

    :param d_pair: size of the pair features ``h`` that weight the density
    :param max_angular: largest ``l`` (``L``)
    :param max_radial: ``max_radial + 1`` radial functions ``R_n``
    :param n_channels: learned channels of ``h`` (``C_h``)
    :param n_outputs: channels ``c`` per ``l``
    :param average_neighbors: ``N_avg``
    :param d_out: when positive, :meth:`forward` returns a learned linear map of the
        projections, ``(n_pairs, d_out)``, computed without forming the projections
        (the map is applied to every atom's density, ``(L+1)²`` rows, before the
        projection on the pairs); 0: the projections themselves
    """

    def __init__(
        self,
        d_pair: int,
        max_angular: int = 3,
        max_radial: int = 5,
        n_channels: int = 8,
        n_outputs: int = 16,
        average_neighbors: float = 20.0,
        d_out: int = 0,
    ):
        super().__init__()
        if max_angular < 0 or max_radial < 0 or n_channels < 1 or n_outputs < 1:
            raise ValueError(
                "PairDensityProjections needs max_angular >= 0, max_radial >= 0, "
                "n_channels >= 1 and n_outputs >= 1"
            )
        self.max_angular = int(max_angular)
        self.n_radial = int(max_radial) + 1
        self.n_channels = int(n_channels)
        self.n_outputs = int(n_outputs)
        self.n_features = (self.max_angular + 1) * self.n_outputs
        self.channels = torch.nn.Linear(d_pair, self.n_channels, bias=False)
        self.mixing = torch.nn.Linear(
            self.n_radial * self.n_channels, self.n_features, bias=False
        )
        self.d_out = int(d_out)
        self.output = torch.nn.ModuleList(
            [torch.nn.Linear(self.n_features, self.d_out, bias=False)]
            if self.d_out > 0
            else []
        )
        # 4π: the harmonics are orthonormal, the formula's have mean square 1
        self.scale = 4.0 * math.pi / float(average_neighbors)
        # (l, m) rows × (l', c) columns: 1/(2l+1) where l = l', else 0
        n_harmonics = (self.max_angular + 1) ** 2
        mask = torch.zeros(n_harmonics, self.n_features, dtype=torch.float64)
        for order in range(self.max_angular + 1):
            rows = slice(order * order, (order + 1) * (order + 1))
            columns = slice(order * self.n_outputs, (order + 1) * self.n_outputs)
            mask[rows, columns] = 1.0 / (2 * order + 1)
        self.register_buffer("block_mask", mask, persistent=False)

    def forward(
        self,
        pair_features: torch.Tensor,
        radial: torch.Tensor,
        harmonics: List[torch.Tensor],
        fc: torch.Tensor,
        centers: torch.Tensor,
        n_atoms: int,
    ) -> torch.Tensor:
        """
        :param pair_features: ``(n_pairs, d_pair)`` features ``h_ik`` of every pair
        :param radial: ``(n_pairs, max_radial + 1)`` radial functions ``R_n(r_ij)``
            (:class:`radial_basis`)
        :param harmonics: orthonormal real spherical harmonics ``Y^l`` of the pair
            directions (:class:`symatomic.o3.SolidHarmonics` of unit vectors),
            ``l = 0 …`` at least ``max_angular``, each ``(n_pairs, 2l+1)``
        :param fc: ``(n_pairs,)`` cutoff factors
        :param centers: ``(n_pairs,)`` center ``i`` of every pair, sorted
        :param n_atoms: number of atoms
        :return: ``(n_pairs, (L+1) n_outputs)`` invariant features, ``l``-major, or
            ``(n_pairs, d_out)``, their linear map
        """
        n_pairs = radial.shape[0]
        if radial.shape[1] != self.n_radial:
            raise ValueError(
                f"radial must have {self.n_radial} functions, got {radial.shape[1]}"
            )
        channels = self.channels(pair_features) * fc.unsqueeze(1)
        products = (radial.unsqueeze(2) * channels.unsqueeze(1)).reshape(
            n_pairs, self.n_radial * self.n_channels
        )
        weights = self.mixing(products)  # (P, (L+1) C), l-major
        y = torch.cat(harmonics[: self.max_angular + 1], dim=1)  # (P, (L+1)²)
        # padded (n_atoms, max_neighbors) grid: the density of every atom and its
        # projections are two batched matrix products, with no (P, (L+1)², C)
        # intermediate
        slots, _, max_neighbors = padded_layout(centers, n_atoms)
        n_slots = n_atoms * max_neighbors
        padded_y = torch.zeros(
            n_slots, y.shape[1], dtype=y.dtype, device=y.device
        ).index_copy(0, slots, y)
        padded_w = torch.zeros(
            n_slots, weights.shape[1], dtype=y.dtype, device=y.device
        ).index_copy(0, slots, weights)
        padded_y = padded_y.reshape(n_atoms, max_neighbors, y.shape[1])
        padded_w = padded_w.reshape(n_atoms, max_neighbors, weights.shape[1])
        # A[i, (l, m), (l', c)], kept where l = l' only (scaled by 1/(2l+1))
        density = torch.bmm(padded_y.transpose(1, 2), padded_w)
        density = density * self.block_mask.to(dtype=y.dtype, device=y.device)
        width = self.n_features
        for output in self.output:
            # (W p)_ij = Σ_lm Y_lm(r̂_ij) (A_i Wᵀ)_lm: the map acts on (L+1)² rows
            # per atom instead of one row per pair
            density = output(density)
            width = self.d_out
        projections = torch.bmm(padded_y, density).reshape(n_slots, width)
        return projections.index_select(0, slots) * self.scale
