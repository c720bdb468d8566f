"""An exactly O(3)-invariant scalar model: SOAP power spectrum + MLP, in pure torch.

The scalar-basis tensor heads write an equivariant output as ``Σ_b s_b B_b`` with
invariant coefficients ``s``; they are exact only if ``s`` is exactly invariant. This
module provides such a model, with no compiled extension (everything scripts):

* :class:`SOAPFeatures`: spherical expansion of the neighbor density on a Laplacian
  eigenstate radial basis with "alchemical" species compression, and its invariant
  power spectrum;
* :class:`InvariantScalarModel`: SOAP features → species-modulated MLP → per-atom
  invariant features, plus per-pair invariant features for building vectors
  ``Σ_j c(e_ij) fc(r_ij) r_ij``.

Lengths are in the unit of the pair vectors (Å in practice). Features are
dimensionless.

Density expansion. For every center ``i``,

``c_{i,l,m,(a,n)} = Σ_j w_a(Z_j) R_{nl}(r_ij) fc(r_ij) Y_{lm}(r̂_ij) / √N_avg``

with

* ``Y_{lm}`` the real spherical harmonics of sphericart/metatomic, scaled by ``√(4π)``
  (their mean square over the sphere is 1);
* ``R_{nl}(r) = √(2/3) j_l(z_{nl} r / r_c) / |j_{l+1}(z_{nl})|``, the Laplacian
  eigenstates of the ball of radius ``r_c`` (``z_{nl}`` is the ``n``-th positive zero
  of the spherical Bessel function ``j_l``): for fixed ``l`` they are orthogonal on
  ``[0, r_c]`` with weight ``r²``, and their mean square over the ball is 1. They are
  evaluated with quintic Hermite splines (exact values, first and second derivatives
  on a grid): C² in ``r``, accurate to ~1e-9, and no ill-conditioned Bessel recursion
  at run time;
* ``fc`` the C∞ cutoff of :func:`symatomic.smooth.cutoff_function` (1 below
  ``r_c - width``, 0 from ``r_c`` on);
* ``w_a(Z)`` learnable species weights compressing the species into
  ``n_pseudo_species`` channels (orthogonal initialisation);
* ``N_avg`` a typical number of neighbors, so that ``c`` is O(1).

Power spectrum. ``p_{i,l,(a n),(a' n')} = (2l+1)^{-1/2} Σ_m c_{i,l,m,(a n)}
c_{i,l,m,(a' n')}``, keeping the pairs ``(a n) ≤ (a' n')`` only, the off-diagonal ones
multiplied by ``√2`` (so that the dot product of two feature vectors is the one of the
full power spectra: the SOAP kernel is preserved). Both factors of each term carry the
parity ``(-1)^l`` and rotate with the same orthogonal ``D^l``: ``p`` is exactly
invariant under rotations, inversion and permutations of the neighbors.
"""

import math
from typing import List, Optional, Tuple

import numpy as np
import torch

from .neighbors import padded_layout
from .o3 import SolidHarmonics
from .smooth import cutoff_function

__all__ = [
    "SOAPFeatures",
    "InvariantScalarModel",
    "LaplacianEigenstates",
    "laplacian_eigenstate_zeros",
]


# ---------------------------------------------------------------------------------
# radial basis
# ---------------------------------------------------------------------------------


def _spherical_jn(order: int, x: np.ndarray, derivative: bool = False) -> np.ndarray:
    # scipy is a hard dependency of ase, itself a dependency of symatomic; it is only
    # needed when a model is built, never at inference (exported models hold tables)
    from scipy.special import spherical_jn

    return spherical_jn(order, x, derivative=derivative)


def laplacian_eigenstate_zeros(max_angular: int, count: int) -> np.ndarray:
    """The first ``count`` positive zeros of ``j_l`` for ``l = 0 … max_angular``.

    :return: float64 array ``(max_angular + 1, count)``
    """
    from scipy.optimize import brentq

    zeros = np.zeros((max_angular + 1, count))
    for order in range(max_angular + 1):
        # zeros of j_l are interlaced, spaced by ~π, the first one above l
        step = 0.05
        x = np.arange(step, (count + order + 2) * math.pi + 10.0, step)
        values = _spherical_jn(order, x)
        found = []
        for k in range(len(x) - 1):
            if values[k] == 0.0:
                found.append(x[k])
            elif values[k] * values[k + 1] < 0.0:
                found.append(
                    brentq(
                        lambda t, o=order: float(_spherical_jn(o, np.array(t))),
                        x[k],
                        x[k + 1],
                        xtol=1e-15,
                    )
                )
            if len(found) == count:
                break
        assert len(found) == count
        zeros[order] = found
    return zeros


def _radial_functions(
    zeros: List[Tuple[int, float]], cutoff: float, r: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values, first and second derivatives of ``R_{nl}`` on the grid ``r``.

    :param zeros: ``(l, z_{nl})`` of every function
    :return: three arrays ``(len(r), len(zeros))``
    """
    values = np.zeros((len(r), len(zeros)))
    first = np.zeros_like(values)
    second = np.zeros_like(values)
    for f, (order, z) in enumerate(zeros):
        scale = math.sqrt(2.0 / 3.0) / abs(float(_spherical_jn(order + 1, np.array(z))))
        k = z / cutoff
        x = k * r
        j = _spherical_jn(order, x)
        dj = _spherical_jn(order, x, derivative=True)
        # spherical Bessel equation: x² j'' + 2x j' + (x² - l(l+1)) j = 0
        safe = np.where(x > 0, x, 1.0)
        d2j = -2.0 / safe * dj - (1.0 - order * (order + 1) / safe**2) * j
        at_zero = {0: -1.0 / 3.0, 2: 2.0 / 15.0}.get(order, 0.0)
        d2j = np.where(x > 0, d2j, at_zero)
        values[:, f] = scale * j
        first[:, f] = scale * k * dj
        second[:, f] = scale * k * k * d2j
    return values, first, second


class LaplacianEigenstates(torch.nn.Module):
    """Radial functions ``R_{nl}(r)`` (Laplacian eigenstates of the ball), splined.

    ``R_{nl}(r) = √(2/3) j_l(z_{nl} r / r_c) / |j_{l+1}(z_{nl})|`` for
    ``n = 0 … max_radial`` (``max_radial + 1`` functions per ``l``; with ``truncate``,
    only those with ``z_{nl} ≤ z_{max_radial, 0} = (max_radial + 1) π``, i.e. fewer at
    large ``l``, as in torch-spex). Orthogonal for fixed ``l`` on ``[0, r_c]`` with
    weight ``r²``, mean square 1 over the ball, zero at ``r_c``.

    Evaluated by quintic Hermite interpolation of exact values and derivatives on a
    uniform grid: the interpolant is C² everywhere in ``[0, r_c]`` and constant
    (equal to its value at ``r_c``, 0) beyond.

    :param cutoff: ``r_c``, length unit of the inputs
    :param max_radial: largest radial index ``n``
    :param max_angular: largest ``l``
    :param truncate: drop functions of high eigenvalue at large ``l``
    :param points_per_unit: grid density (intervals per unit of ``z r / r_c``)
    """

    n_per_l: List[int]

    def __init__(
        self,
        cutoff: float,
        max_radial: int,
        max_angular: int,
        truncate: bool = False,
        points_per_unit: float = 12.0,
    ):
        super().__init__()
        if max_radial < 0 or max_angular < 0:
            raise ValueError("max_radial and max_angular must be non-negative")
        if cutoff <= 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        self.cutoff = float(cutoff)
        self.max_angular = int(max_angular)
        count = int(max_radial) + 1
        zeros = laplacian_eigenstate_zeros(self.max_angular, count + 2)
        largest = float(zeros[0, count - 1])
        functions: List[Tuple[int, float]] = []
        n_per_l: List[int] = []
        for order in range(self.max_angular + 1):
            kept = [
                float(z)
                for z in zeros[order, :count]
                if not truncate or z <= largest + 1e-9
            ]
            n_per_l.append(len(kept))
            functions.extend((order, z) for z in kept)
        self.n_per_l = n_per_l
        self.n_functions = len(functions)
        max_z = max(z for _, z in functions)
        n_intervals = max(64, int(math.ceil(points_per_unit * max_z)))
        self.n_intervals = n_intervals
        self.spacing = self.cutoff / n_intervals
        grid = np.linspace(0.0, self.cutoff, n_intervals + 1)
        f, d, s = _radial_functions(functions, self.cutoff, grid)
        h = self.spacing
        f0, f1 = f[:-1], f[1:]
        d0, d1 = h * d[:-1], h * d[1:]
        s0, s1 = h * h * s[:-1], h * h * s[1:]
        # polynomial coefficients of the quintic Hermite interpolant in t ∈ [0, 1]
        coefficients = np.stack(
            [
                f0,
                d0,
                0.5 * s0,
                -10 * f0 + 10 * f1 - 6 * d0 - 4 * d1 - 1.5 * s0 + 0.5 * s1,
                15 * f0 - 15 * f1 + 8 * d0 + 7 * d1 + 1.5 * s0 - s1,
                -6 * f0 + 6 * f1 - 3 * d0 - 3 * d1 - 0.5 * s0 + 0.5 * s1,
            ],
            axis=1,
        )  # (n_intervals, 6, n_functions)
        self.register_buffer(
            "coefficients",
            torch.tensor(coefficients.reshape(n_intervals, -1), dtype=torch.float64),
            persistent=False,
        )

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        """
        :param distances: ``(P,)`` distances, length unit
        :return: ``(P, n_functions)``, functions ordered ``l``-major then ``n``
        """
        u = distances.clamp(min=0.0, max=self.cutoff) / self.spacing
        index = torch.floor(u).clamp(max=self.n_intervals - 1)
        t = u - index
        coefficients = self.coefficients.to(dtype=distances.dtype)
        gathered = coefficients.index_select(0, index.to(torch.long)).reshape(
            -1, 6, self.n_functions
        )
        t = t.unsqueeze(1)
        # Horner's scheme
        result = gathered[:, 5]
        for k in [4, 3, 2, 1, 0]:
            result = result * t + gathered[:, k]
        return result


# ---------------------------------------------------------------------------------
# SOAP features
# ---------------------------------------------------------------------------------


class SOAPFeatures(torch.nn.Module):
    """Invariant SOAP power spectrum of every atom (see the module docstring).

    :param n_species: number of species; inputs are indices ``0 … n_species - 1``
    :param cutoff: cutoff radius ``r_c`` (length unit of the pair vectors)
    :param cutoff_width: width of the smooth cutoff (``fc = 1`` below
        ``r_c - width``)
    :param max_radial: largest radial index: ``max_radial + 1`` functions per ``l``
    :param max_angular: largest angular order ``l``
    :param n_pseudo_species: number of alchemical channels; ``None`` gives one
        channel per species with one-hot weights (no compression)
    :param learnable_species_weights: whether the species weights ``w_a(Z)`` are
        parameters (otherwise fixed at their initial value)
    :param center_species: append a one-hot encoding of the center species
        (``n_species`` more features)
    :param average_neighbors: typical number of neighbors inside the cutoff ``N_avg``;
        ``None`` estimates it at 0.05 atoms per unit volume (Å⁻³: liquids, molecular
        crystals), ``(4π/3) r_c³ · 0.05``
    :param truncate_radial: fewer radial functions at large ``l`` (see
        :class:`LaplacianEigenstates`)

    Attributes: ``n_features`` (output width: ``Σ_l K_l (K_l + 1) / 2``, plus
    ``n_species`` with ``center_species``), ``n_per_l`` (radial functions per ``l``),
    ``n_channels_per_l`` (``K_l = n_pseudo_species × n_per_l[l]``). Features are
    ordered ``l``-major, then the pairs ``k ≤ k'`` row-major with ``k = a n_l + n``.
    Example: 4 pseudo-species, ``max_radial = 6``, ``max_angular = 4``: ``K_l = 28``,
    2030 features.

    Cost: the densities are batched matmuls over a padded ``(n_atoms,
    max_neighbors)`` neighbor grid, so memory is ``O(n_atoms · max_neighbors ·
    (L+1)(A n + L + 1))``; no Python loop runs over atoms (only over ``l``).
    """

    n_per_l: List[int]
    n_channels_per_l: List[int]
    radial_offsets: List[int]
    harmonics_sizes: List[int]
    triu: List[torch.Tensor]

    def __init__(
        self,
        n_species: int,
        cutoff: float,
        cutoff_width: float,
        max_radial: int = 6,
        max_angular: int = 4,
        n_pseudo_species: Optional[int] = 4,
        learnable_species_weights: bool = True,
        center_species: bool = False,
        average_neighbors: Optional[float] = None,
        truncate_radial: bool = False,
    ):
        super().__init__()
        if n_species < 1:
            raise ValueError(f"n_species must be positive, got {n_species}")
        if not 0 < cutoff_width <= cutoff:
            raise ValueError(
                f"cutoff_width must be in (0, cutoff], got {cutoff_width} "
                f"(cutoff {cutoff})"
            )
        self.n_species = int(n_species)
        self.cutoff = float(cutoff)
        self.cutoff_width = float(cutoff_width)
        self.max_angular = int(max_angular)
        self.radial = LaplacianEigenstates(
            cutoff, max_radial, max_angular, truncate=truncate_radial
        )
        self.harmonics = SolidHarmonics(self.max_angular)

        if n_pseudo_species is None:
            weights = torch.eye(self.n_species, dtype=torch.float64)
        else:
            if n_pseudo_species < 1:
                raise ValueError(
                    f"n_pseudo_species must be positive, got {n_pseudo_species}"
                )
            weights = torch.empty(self.n_species, int(n_pseudo_species))
            torch.nn.init.orthogonal_(weights)
            # rows of unit norm: every species contributes alike at initialisation
            weights = weights / weights.norm(dim=1, keepdim=True).clamp(min=1e-12)
            weights = weights.to(torch.float64)
        self.n_pseudo_species = int(weights.shape[1])
        if learnable_species_weights and n_pseudo_species is not None:
            self.species_weights = torch.nn.Parameter(weights.to(torch.float32))
        else:
            self.register_buffer("species_weights", weights.to(torch.float32))

        if average_neighbors is None:
            average_neighbors = 4.0 / 3.0 * math.pi * self.cutoff**3 * 0.05
        if average_neighbors <= 0:
            raise ValueError(f"average_neighbors must be positive: {average_neighbors}")
        self.average_neighbors = float(average_neighbors)
        # √(4π) makes the mean square of every Y_lm over the sphere 1
        self.density_scale = math.sqrt(4.0 * math.pi / self.average_neighbors)

        self.n_per_l = list(self.radial.n_per_l)
        self.n_channels_per_l = [self.n_pseudo_species * n for n in self.n_per_l]
        offsets = [0]
        for n in self.n_per_l:
            offsets.append(offsets[-1] + n)
        self.radial_offsets = offsets
        self.n_channels = sum(self.n_channels_per_l)
        self.uniform_radial = all(n == self.n_per_l[0] for n in self.n_per_l)
        self.harmonics_sizes = [2 * order + 1 for order in range(self.max_angular + 1)]

        # unique (k ≤ k') pairs of every l, and their scale factors
        triu_list: List[torch.Tensor] = []
        scale_list: List[torch.Tensor] = []
        n_features = 0
        for order, k in enumerate(self.n_channels_per_l):
            rows, cols = torch.triu_indices(k, k)
            triu_list.append(rows * k + cols)
            scale = torch.where(rows == cols, 1.0, math.sqrt(2.0)).to(torch.float64)
            scale_list.append(scale / math.sqrt(2 * order + 1))
            n_features += int(rows.shape[0])
        self.triu = triu_list
        self.center_species = bool(center_species)
        self.n_power_spectrum = n_features
        if self.center_species:
            n_features += self.n_species
        self.n_features = n_features
        self.register_buffer("pair_scales", torch.cat(scale_list), persistent=False)

    def forward(
        self,
        species: torch.Tensor,
        pair_vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
    ) -> torch.Tensor:
        """
        :param species: ``(n_atoms,)`` int64 species indices
        :param pair_vectors: ``(P, 3)`` vectors ``r_j - r_i`` of all pairs closer than
            the cutoff (full list, both directions; any order)
        :param centers: ``(P,)`` int64 ``i``
        :param neighbors: ``(P,)`` int64 ``j``
        :return: ``(n_atoms, n_features)`` invariant features
        """
        distances = torch.sqrt((pair_vectors * pair_vectors).sum(dim=1) + 1e-30)
        radial = self.radial(distances)
        fc = cutoff_function(distances, self.cutoff, self.cutoff_width)
        return self.power_spectrum(
            species, pair_vectors, distances, radial, fc, centers, neighbors
        )

    def power_spectrum(
        self,
        species: torch.Tensor,
        pair_vectors: torch.Tensor,
        distances: torch.Tensor,
        radial: torch.Tensor,
        fc: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
    ) -> torch.Tensor:
        """Features from precomputed distances ``(P,)``, radial functions ``(P,
        n_functions)`` (from ``self.radial``) and cutoff factors ``(P,)``; see
        :meth:`forward`."""
        n_atoms = species.shape[0]
        n_pairs = pair_vectors.shape[0]
        dtype = pair_vectors.dtype
        device = pair_vectors.device
        n_pseudo = self.n_pseudo_species

        # padded (n_atoms, max_neighbors) layout: the density of every atom is then a
        # batched matmul over its neighbors, with no (P, (l, m), channel) tensor
        sorting = torch.sort(centers, stable=True)[1]
        sorted_slots, _, max_neighbors = padded_layout(centers[sorting], n_atoms)
        slots = torch.empty_like(sorted_slots).index_copy_(0, sorting, sorted_slots)
        n_slots = n_atoms * max_neighbors

        directions = pair_vectors / distances.unsqueeze(1)
        harmonics = torch.cat(self.harmonics(directions), dim=1)  # (P, (L+1)²)
        weights = self.species_weights.to(dtype=dtype).index_select(
            0, species.index_select(0, neighbors)
        )  # (P, A)
        scaled = radial * (fc * self.density_scale).unsqueeze(1)  # (P, n_functions)
        # channels ordered (l, a, n): per l, (P, A * n_l) ordered (a, n)
        n_angular = len(self.n_per_l)
        n_channels = self.n_channels
        if self.uniform_radial:
            channels = (
                scaled.reshape(n_pairs, n_angular, 1, self.n_per_l[0])
                * weights.reshape(n_pairs, 1, n_pseudo, 1)
            ).reshape(n_pairs, n_channels)
        else:
            per_l: List[torch.Tensor] = []
            for order in range(n_angular):
                first = self.radial_offsets[order]
                last = self.radial_offsets[order + 1]
                per_l.append(
                    (weights.unsqueeze(2) * scaled[:, first:last].unsqueeze(1)).reshape(
                        n_pairs, self.n_channels_per_l[order]
                    )
                )
            channels = torch.cat(per_l, dim=1)  # (P, Σ_l K_l)

        padded_harmonics = torch.zeros(
            n_slots, harmonics.shape[1], dtype=dtype, device=device
        ).index_copy(0, slots, harmonics)
        padded_channels = torch.zeros(
            n_slots, channels.shape[1], dtype=dtype, device=device
        ).index_copy(0, slots, channels)
        # split (not slices): one concatenation in the backward pass
        harmonics_per_l = torch.split(
            padded_harmonics.reshape(n_atoms, max_neighbors, harmonics.shape[1]),
            self.harmonics_sizes,
            dim=2,
        )
        channels_per_l = torch.split(
            padded_channels.reshape(n_atoms, max_neighbors, n_channels),
            self.n_channels_per_l,
            dim=2,
        )

        blocks: List[torch.Tensor] = []
        for order, triu in enumerate(self.triu):
            y = harmonics_per_l[order]
            g = channels_per_l[order]
            density = torch.bmm(y.transpose(1, 2), g)  # (n_atoms, 2l+1, K_l)
            products = torch.bmm(density.transpose(1, 2), density)  # (n, K_l, K_l)
            blocks.append(
                products.reshape(n_atoms, -1).index_select(1, triu.to(device))
            )
        features = torch.cat(blocks, dim=1) * self.pair_scales.to(dtype=dtype)
        if self.center_species:
            one_hot = torch.nn.functional.one_hot(species, self.n_species).to(dtype)
            features = torch.cat([features, one_hot], dim=1)
        return features


# ---------------------------------------------------------------------------------
# scalar model
# ---------------------------------------------------------------------------------


class _SpeciesMLP(torch.nn.Module):
    """MLP whose hidden units are modulated per center species.

    ``h_0 = LayerNorm(x)``; ``h_{k+1} = SiLU((W_k h_k + b_k) ⊙ γ_k[Z] + β_k[Z])``;
    ``y = W_out h_K + b_out``. ``γ`` starts at 1 and ``β`` at 0.
    """

    def __init__(
        self,
        n_species: int,
        d_in: int,
        d_hidden: int,
        n_hidden_layers: int,
        d_out: int,
        layernorm: bool,
    ):
        super().__init__()
        if n_hidden_layers < 1:
            raise ValueError(f"n_hidden_layers must be >= 1, got {n_hidden_layers}")
        self.norm = torch.nn.LayerNorm(d_in) if layernorm else torch.nn.Identity()
        self.layers = torch.nn.ModuleList(
            [
                torch.nn.Linear(d_in if k == 0 else d_hidden, d_hidden)
                for k in range(n_hidden_layers)
            ]
        )
        self.gains = torch.nn.ModuleList(
            [torch.nn.Embedding(n_species, d_hidden) for _ in range(n_hidden_layers)]
        )
        self.shifts = torch.nn.ModuleList(
            [torch.nn.Embedding(n_species, d_hidden) for _ in range(n_hidden_layers)]
        )
        for gain, shift in zip(self.gains, self.shifts):
            torch.nn.init.ones_(gain.weight)
            torch.nn.init.zeros_(shift.weight)
        self.output = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        for layer, gain, shift in zip(self.layers, self.gains, self.shifts):
            h = torch.nn.functional.silu(layer(h) * gain(species) + shift(species))
        return self.output(h)


class InvariantScalarModel(torch.nn.Module):
    """Exactly invariant atom and pair features: SOAP → species-modulated MLP.

    Atom features ``h_i`` (``(n_atoms, d_out)``): :class:`SOAPFeatures` (power
    spectrum, no center-species channel), then ``LayerNorm`` (optional) and an MLP of
    ``n_hidden_layers`` SiLU layers of width ``d_hidden`` whose hidden units are
    scaled and shifted by learned per-center-species vectors (a BPNN with shared
    weights; its size does not grow with the number of species).

    Pair features ``e_ij`` (``(P, d_pair)``), for every pair of the input list::

        e_ij = W_2 SiLU(W_r φ(r_ij) + U h_i + V h_j + E_c[Z_i] + E_n[Z_j] + b_1) + b_2

    i.e. a one-hidden-layer MLP (width ``d_pair``) of the concatenation of the radial
    functions ``φ(r_ij) = (R_{0,0}(r_ij), …, R_{max_radial,0}(r_ij))`` (the ``l = 0``
    Laplacian eigenstates, *without* the cutoff factor), the atom features of ``i`` and
    ``j`` and species embeddings of ``Z_i`` and ``Z_j``. They are invariant (functions
    of ``r_ij`` and of invariant atom features) and C² in the positions for
    ``r_ij < r_c``; they do not vanish at the cutoff, so multiply them by the returned
    ``fc(r_ij)`` (C∞, zero with all derivatives from ``r_c`` on) when summing over
    neighbors, e.g. ``v_i = Σ_j e_ij fc(r_ij) r_ij``: the result is then smooth as
    atoms cross the cutoff. ``e_ij ≠ e_ji`` in general.

    The model reaches ``r_c`` (atom features) and ``2 r_c`` (pair features, through
    ``h_j``) from an atom.

    :param n_species: number of species
    :param cutoff: cutoff radius (length unit of the pair vectors)
    :param cutoff_width: width of the smooth cutoff
    :param max_radial: see :class:`SOAPFeatures`
    :param max_angular: see :class:`SOAPFeatures`
    :param n_pseudo_species: see :class:`SOAPFeatures`
    :param d_hidden: width of the MLP's hidden layers
    :param n_hidden_layers: number of hidden layers
    :param d_out: width of the atom features
    :param d_pair: width of the pair features (and of the pair MLP's hidden layer)
    :param layernorm: normalise the SOAP features of every atom before the MLP
    :param average_neighbors: see :class:`SOAPFeatures`
    :param truncate_radial: see :class:`SOAPFeatures`
    """

    def __init__(
        self,
        n_species: int,
        cutoff: float,
        cutoff_width: float,
        max_radial: int = 6,
        max_angular: int = 4,
        n_pseudo_species: Optional[int] = 4,
        d_hidden: int = 128,
        n_hidden_layers: int = 2,
        d_out: int = 128,
        d_pair: int = 32,
        layernorm: bool = True,
        average_neighbors: Optional[float] = None,
        truncate_radial: bool = False,
    ):
        super().__init__()
        self.cutoff = float(cutoff)
        self.cutoff_width = float(cutoff_width)
        self.d_out = int(d_out)
        self.d_pair = int(d_pair)
        self.soap = SOAPFeatures(
            n_species,
            cutoff,
            cutoff_width,
            max_radial=max_radial,
            max_angular=max_angular,
            n_pseudo_species=n_pseudo_species,
            average_neighbors=average_neighbors,
            truncate_radial=truncate_radial,
        )
        self.n_features = self.soap.n_features
        self.mlp = _SpeciesMLP(
            n_species,
            self.soap.n_features,
            d_hidden,
            n_hidden_layers,
            d_out,
            layernorm,
        )
        self.n_pair_radial = int(self.soap.n_per_l[0])
        self.pair_radial = torch.nn.Linear(self.n_pair_radial, self.d_pair)
        self.pair_center = torch.nn.Linear(self.d_out, self.d_pair, bias=False)
        self.pair_neighbor = torch.nn.Linear(self.d_out, self.d_pair, bias=False)
        self.pair_center_species = torch.nn.Embedding(n_species, self.d_pair)
        self.pair_neighbor_species = torch.nn.Embedding(n_species, self.d_pair)
        self.pair_output = torch.nn.Linear(self.d_pair, self.d_pair)

    def forward(
        self,
        species: torch.Tensor,
        pair_vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        :param species: ``(n_atoms,)`` int64 species indices
        :param pair_vectors: ``(P, 3)`` ``r_j - r_i`` of all pairs closer than the
            cutoff (full list, any order)
        :param centers: ``(P,)`` int64 ``i``
        :param neighbors: ``(P,)`` int64 ``j``
        :return: ``(atom_features (n_atoms, d_out), pair_features (P, d_pair),
            fc (P,))``, all exactly invariant; ``fc`` is the cutoff factor
            ``fc(r_ij)`` of every pair
        """
        distances = torch.sqrt((pair_vectors * pair_vectors).sum(dim=1) + 1e-30)
        radial = self.soap.radial(distances)
        fc = cutoff_function(distances, self.cutoff, self.cutoff_width)
        soap = self.soap.power_spectrum(
            species, pair_vectors, distances, radial, fc, centers, neighbors
        )
        atoms = self.mlp(soap, species)

        pair_hidden = (
            self.pair_radial(radial[:, : self.n_pair_radial])
            + self.pair_center(atoms).index_select(0, centers)
            + self.pair_neighbor(atoms).index_select(0, neighbors)
            + self.pair_center_species(species).index_select(0, centers)
            + self.pair_neighbor_species(species).index_select(0, neighbors)
        )
        pairs = self.pair_output(torch.nn.functional.silu(pair_hidden))
        return atoms, pairs, fc
