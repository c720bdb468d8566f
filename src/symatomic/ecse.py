"""ECSE: smooth ensembles of local coordinate frames (Pozdnyakov & Ceriotti).

Any function ``f`` of the Cartesian coordinates of an environment becomes exactly
equivariant as ``y = [Σ_c w_c ρ(F_c) f(F_cᵀ X) + w_aux f_aux(X)] / [Σ_c w_c + w_aux]``,
where the frames ``F_c`` rotate with the structure and the weights ``w_c`` are
invariant and smooth. This module builds the frames and weights (vectorised over all
atoms and frames, TorchScript-compatible); :mod:`symatomic.pet` uses them inside PET
(local mode) and :class:`symatomic.symmetrize.GlobalECSE` around any metatomic model
(global mode).

Construction (the original protocol, with the changes noted):

* an adaptive inner cutoff per atom: a smooth minimum over pairs of neighbors ``j<k``
  of ``v = smax_β(r_j, r_k) + W₀(1/e)/β``, with pair weights
  ``fc(r_j; r_out) fc(r_k; r_out)``, and the candidate ``r_out`` with weight 1, plus
  ``Δ_R``. Near-collinear pairs get a bounded penalty,
  ``v ← v + (1 - q(|r̂_j × r̂_k|²; w, Δw)) P`` with ``P = collinear_penalty``
  (0.5 Å). (The original protocol multiplies the pair weight by ``q``: inside the
  exponential average, the onset of ``q`` on a short pair is amplified by
  ``exp(β (r_in - v))``, and we saw ``r_in`` move by 0.06 Å over 1e-3 Å of
  motion. Pushing such pairs out to ``R = r_out + W₀(1/e)/β`` instead, as
  checkpoints before version 4 do (``collinear_penalty: null``), moves ``r_in``
  by up to ``r_out - r`` while a short pair crosses the angular switch: slopes of
  27-40 Å/Å, frame weights switching over ~10 mÅ, and force spikes of 4e3 eV/Å²
  in a trained model (``benchmarks/smoothness.py``). The bounded penalty keeps the
  slope near 4 Å/Å; an environment whose only short pairs are collinear then uses
  the fallback, smoothly.)
* a frame for every ordered pair of neighbors ``j≠k`` inside the inner cutoff:
  ``e1 = r̂_j``, ``e2 = r̂_j × r̂_k / |…|``, ``e3 = e1 × e2``, weighted by
  ``fc(r_j; r_in) fc(r_k; r_in) q_lin(|r̂_j × r̂_k|²; w - Δw, Δw)``;
* a fallback weight ``w_aux = fc(M; 0.5, 0.5)`` for degenerate environments, with
  ``M`` the smooth maximum of the weights;
* pruning, ``w ← w [q(w; s M, (1 - s) M)(1 - t) + t]`` with ``t = fc(M; 0.5,
  0.25)``, which keeps the frames whose weight is close to the largest (the original
  protocol applies it four times with ``s = 0.9``).

Defaults. The original parameters (``Δ_R = 0.15 Å, w = 0.2, Δw = 0.15``, pruning
4 × 0.9) give an exact and smooth, but steep, ensemble. A PET trained with ECSE in
the loop on the bundled water clusters, with ``Δ_R = 0.15 Å, w = 0.2, Δw = 0.15``
and one pruning pass at 0.5, wandered by 2.4 eV in 1 ps of NVE (water trimer,
0.5 fs steps, 300 K), and by 0.8 eV in 0.5 ps with ``w = Δw = 0.1``; the
unsymmetrized PET by 0.05 eV. ``w = 0.2`` switches over the H-O-H' angles a
hydrogen of a water molecule visits at every bending vibration; ``Δ_R = 0.15 Å``
switches frames over a few femtoseconds of motion; pruning sharpens every change.
Local mode therefore defaults to ``Δ_R = 0.3 Å, w = 0.1, Δw = 0.1`` and no pruning
(max deviation of the total energy 0.05 eV over 1 ps, drift 3 meV/ps per atom,
with about 4 frames per atom in liquid water and 10 in a QM7-X molecule); global
mode prunes once with ``s = 0.5`` (:data:`ECSE_GLOBAL_DEFAULTS`), since every
frame costs a whole model evaluation there.

Weights are normalised within groups: the atom itself (local mode) or the whole
structure (global mode, frames of all atoms pooled).
"""

from typing import Any, Dict, List, Optional

import torch

from .smooth import switch_off, switch_on, switch_on_linear

__all__ = [
    "ECSEFrames",
    "FrameSet",
    "ECSE_DEFAULTS",
    "ECSE_GLOBAL_DEFAULTS",
    "check_ecse_options",
    "frames_per_group",
    "same_center_pairs",
]

#: W₀(1/e), the principal branch of the Lambert W function at 1/e
_LAMBERT_W0_INV_E = 0.27846454276107380

#: defaults of the frames in local mode, tuned for smooth molecular dynamics (see
#: the module documentation)
ECSE_DEFAULTS = {
    "beta": 5.0,
    "beta_weights": 1.0,
    "delta_r": 0.3,
    "w": 0.1,
    "delta_w": 0.1,
    "max_outer_cutoff": 10.0,
    "pruning_iterations": 0,
    "pruning_start": 0.5,
    "collinear_penalty": 0.5,
}

#: defaults in global mode: frames pooled over a structure must be pruned, or the
#: model is evaluated once per frame of every atom
ECSE_GLOBAL_DEFAULTS = {**ECSE_DEFAULTS, "pruning_iterations": 1}


class FrameSet:
    """Frames and weights of a set of atoms.

    :param atoms: ``(n_frames,)`` atom whose environment defines each frame
    :param groups: ``(n_frames,)`` group of each frame (atom or structure)
    :param rotations: ``(n_frames, 3, 3)`` proper rotations, columns ``e1, e2, e3``;
        local coordinates are ``Fᵀ r``
    :param weights: ``(n_frames,)`` positive pruned weights
    :param aux_weights: ``(n_groups,)`` weight of the fallback
    :param normalization: ``(n_groups,)`` ``Σ weights + aux_weights`` (≥ ``w_aux``,
        positive)
    """

    def __init__(
        self,
        atoms: torch.Tensor,
        groups: torch.Tensor,
        rotations: torch.Tensor,
        weights: torch.Tensor,
        aux_weights: torch.Tensor,
        normalization: torch.Tensor,
    ):
        self.atoms = atoms
        self.groups = groups
        self.rotations = rotations
        self.weights = weights
        self.aux_weights = aux_weights
        self.normalization = normalization


def same_center_pairs(centers: torch.Tensor, n_atoms: int) -> List[torch.Tensor]:
    """All unordered pairs ``(a, b)``, ``a < b``, of pairs sharing their center.

    :param centers: ``(n_pairs,)`` sorted
    :return: ``[a, b]``, two ``(n_pair_pairs,)`` index tensors into ``centers``
    """
    n = centers.shape[0]
    device = centers.device
    counts = torch.zeros(n_atoms, dtype=torch.long, device=device)
    counts.index_add_(0, centers, torch.ones_like(centers))
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=device) - first.index_select(0, centers)
    after = counts.index_select(0, centers) - rank - 1
    a = torch.repeat_interleave(torch.arange(n, device=device), after)
    offsets = torch.cumsum(after, 0) - after
    b = a + 1 + torch.arange(a.shape[0], device=device) - offsets.index_select(0, a)
    return [a, b]


def _segment_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_add(
        0, index, values
    )


class ECSEFrames(torch.nn.Module):
    """Smooth frame ensembles from neighbor pairs.

    :param cutoff: cutoff of the neighbor list; ``r_out = min(cutoff,
        max_outer_cutoff)``
    :param beta: sharpness of the smooth minimum giving the inner cutoff (1/Å)
    :param beta_weights: sharpness of the smooth maximum of the weights
    :param delta_r: width of the radial switching functions (Å)
    :param w: threshold of ``|r̂_j × r̂_k|²`` below which pairs are collinear
    :param delta_w: width of that threshold
    :param max_outer_cutoff: upper bound of ``r_out``
    :param pruning_iterations: how many times the pruning is applied
    :param pruning_start: fraction ``s`` of the largest weight below which frames
        are removed (they are kept fully above the largest weight)
    """

    def __init__(
        self,
        cutoff: float,
        beta: float = 5.0,
        beta_weights: float = 1.0,
        delta_r: float = 0.3,
        w: float = 0.1,
        delta_w: float = 0.1,
        max_outer_cutoff: float = 10.0,
        pruning_iterations: int = 0,
        pruning_start: float = 0.5,
        collinear_penalty: Optional[float] = 0.5,
    ):
        super().__init__()
        if collinear_penalty is not None and not collinear_penalty > 0:
            raise ValueError("ECSE needs collinear_penalty > 0 (or None)")
        #: < 0: the value of near-collinear pairs is pushed out to r_out (the
        #: construction before checkpoint version 4)
        self.collinear_penalty = (
            -1.0 if collinear_penalty is None else float(collinear_penalty)
        )
        if pruning_iterations < 0 or not 0.0 < pruning_start < 1.0:
            raise ValueError(
                "ECSE needs pruning_iterations >= 0, 0 < pruning_start < 1"
            )
        self.pruning_iterations = int(pruning_iterations)
        self.pruning_start = float(pruning_start)
        if not 0 < delta_w <= w:
            raise ValueError("ECSE needs 0 < delta_w <= w")
        self.outer_cutoff = float(min(cutoff, max_outer_cutoff))
        self.beta = float(beta)
        self.beta_weights = float(beta_weights)
        self.delta_r = float(delta_r)
        self.w = float(w)
        self.delta_w = float(delta_w)
        self.offset = _LAMBERT_W0_INV_E / self.beta

    def inner_cutoffs(
        self,
        centers: torch.Tensor,
        distances: torch.Tensor,
        directions: torch.Tensor,
        n_atoms: int,
    ) -> torch.Tensor:
        """Adaptive inner cutoff of every atom, ``(n_atoms,)``."""
        dtype = distances.dtype
        r_out = torch.tensor(self.outer_cutoff, dtype=dtype, device=distances.device)
        delta = torch.tensor(self.delta_r, dtype=dtype, device=distances.device)
        outer = switch_off(distances, r_out, delta)
        inside = torch.nonzero(outer > 0).squeeze(1)
        centers_in = centers.index_select(0, inside)
        a, b = same_center_pairs(centers_in, n_atoms)
        a = inside.index_select(0, a)
        b = inside.index_select(0, b)
        r_a = distances.index_select(0, a)
        r_b = distances.index_select(0, b)
        cross = torch.linalg.cross(
            directions.index_select(0, a), directions.index_select(0, b)
        )
        s = (cross * cross).sum(dim=1)
        outer_weights = outer.index_select(0, a) * outer.index_select(0, b)
        angular = switch_on(
            s,
            torch.tensor(self.w, dtype=dtype, device=s.device),
            torch.tensor(self.delta_w, dtype=dtype, device=s.device),
        )
        # smooth maximum of the two distances, plus W0(1/e)/β
        top = torch.maximum(r_a, r_b).detach()
        ea = torch.exp(self.beta * (r_a - top))
        eb = torch.exp(self.beta * (r_b - top))
        values = (r_a * ea + r_b * eb) / (ea + eb) + self.offset
        # near-collinear pairs are pushed out to r_out + W0(1/e)/β (where they no
        # longer matter) rather than multiplied by a small weight: inside the
        # exponential average a small weight on a short pair is amplified by
        # exp(β (r_in - value)), which turns the onset of the angular switch into a
        # jump of r_in over a tiny change of geometry
        if self.collinear_penalty < 0:
            far = r_out + self.offset
            values = far + angular * (values - far)
        else:
            # a bounded penalty: r_in then moves by at most ~collinear_penalty as
            # a short pair turns collinear (pushing it out to r_out moved r_in by
            # up to r_out - r over the angular switch: slopes of 40 Å/Å, force
            # spikes of 1e3-1e5 eV/Å² in trained models)
            values = values + (1.0 - angular) * self.collinear_penalty
        # smooth minimum over the pairs and the candidate r_out (weight 1); the
        # exponentials are relative to r_out, so that they stay in range; pairs
        # leave through the outer cutoff, where their value is near r_out
        exponent = torch.exp(-self.beta * (values - r_out))
        pair_centers = centers.index_select(0, a)
        numerator = _segment_sum(
            outer_weights * values * exponent, pair_centers, n_atoms
        )
        denominator = _segment_sum(outer_weights * exponent, pair_centers, n_atoms)
        return (numerator + r_out) / (denominator + 1.0) + self.delta_r

    def forward(
        self,
        centers: torch.Tensor,
        vectors: torch.Tensor,
        n_atoms: int,
        atom_groups: torch.Tensor,
        n_groups: int,
    ) -> FrameSet:
        """Frames and weights.

        :param centers: ``(n_pairs,)`` center of every pair, sorted
        :param vectors: ``(n_pairs, 3)`` pair vectors ``r_j - r_i``
        :param n_atoms: number of atoms
        :param atom_groups: ``(n_atoms,)`` group (weight normalisation) of every atom
        :param n_groups: number of groups
        """
        dtype = vectors.dtype
        device = vectors.device
        distances = torch.sqrt((vectors * vectors).sum(dim=1) + 1e-30)
        directions = vectors / distances.unsqueeze(1)
        r_in = self.inner_cutoffs(centers, distances, directions, n_atoms)

        delta = torch.tensor(self.delta_r, dtype=dtype, device=device)
        inner = switch_off(distances, r_in.index_select(0, centers), delta)
        inside = torch.nonzero(inner > 0).squeeze(1)
        a, b = same_center_pairs(centers.index_select(0, inside), n_atoms)
        a = inside.index_select(0, a)
        b = inside.index_select(0, b)
        u_a = directions.index_select(0, a)
        u_b = directions.index_select(0, b)
        normal = torch.linalg.cross(u_a, u_b)
        s = (normal * normal).sum(dim=1)
        start = torch.tensor(self.w - self.delta_w, dtype=dtype, device=device)
        # pairs too close to collinear have exactly zero weight: drop them before
        # normalising the cross product
        keep = torch.nonzero(s > start).squeeze(1)
        a = a.index_select(0, keep)
        b = b.index_select(0, keep)
        u_a = u_a.index_select(0, keep)
        u_b = u_b.index_select(0, keep)
        normal = normal.index_select(0, keep)
        s = s.index_select(0, keep)
        weight = (
            inner.index_select(0, a)
            * inner.index_select(0, b)
            * switch_on_linear(
                s, start, torch.tensor(self.delta_w, dtype=dtype, device=device)
            )
        )
        # both orders of every pair: (e1 = r̂_a, e2 ∝ r̂_a × r̂_b) and the swapped one
        n_hat = normal / torch.sqrt(s).unsqueeze(1)
        e1 = torch.cat([u_a, u_b])
        e2 = torch.cat([n_hat, -n_hat])
        e3 = torch.linalg.cross(e1, e2)
        rotations = torch.stack([e1, e2, e3], dim=2)
        weights = torch.cat([weight, weight])
        frame_atoms = centers.index_select(0, torch.cat([a, a]))
        frame_groups = atom_groups.index_select(0, frame_atoms)

        # largest weight of every group (smooth), fallback and pruning
        top = torch.zeros(n_groups, dtype=dtype, device=device)
        if weights.shape[0] > 0:
            top = top.scatter_reduce(
                0, frame_groups, weights.detach(), reduce="amax", include_self=True
            )
        exponent = torch.exp(
            self.beta_weights * (weights - top.index_select(0, frame_groups))
        )
        numerator = _segment_sum(weights * weights * exponent, frame_groups, n_groups)
        denominator = _segment_sum(weights * exponent, frame_groups, n_groups)
        has_frames = denominator > 0
        largest = numerator / torch.where(
            has_frames, denominator, torch.ones_like(denominator)
        )
        half = torch.tensor(0.5, dtype=dtype, device=device)
        aux_weights = switch_off(largest, half, half)
        turn_on = switch_off(
            largest, half, torch.tensor(0.25, dtype=dtype, device=device)
        )
        frame_largest = largest.index_select(0, frame_groups)
        frame_turn_on = turn_on.index_select(0, frame_groups)
        safe_largest = torch.where(
            frame_largest > 0, frame_largest, torch.ones_like(frame_largest)
        )
        start = self.pruning_start * safe_largest
        width = (1.0 - self.pruning_start) * safe_largest
        for _ in range(self.pruning_iterations):
            keep_factor = switch_on(weights, start, width)
            weights = weights * (keep_factor * (1.0 - frame_turn_on) + frame_turn_on)

        survivors = torch.nonzero(weights > 0).squeeze(1)
        weights = weights.index_select(0, survivors)
        frame_groups = frame_groups.index_select(0, survivors)
        normalization = _segment_sum(weights, frame_groups, n_groups) + aux_weights
        return FrameSet(
            atoms=frame_atoms.index_select(0, survivors),
            groups=frame_groups,
            rotations=rotations.index_select(0, survivors),
            weights=weights,
            aux_weights=aux_weights,
            normalization=normalization,
        )


def frames_per_group(frames: FrameSet, n_groups: int) -> torch.Tensor:
    """Number of frames surviving pruning in every group, ``(n_groups,)``."""
    counts = torch.zeros(n_groups, dtype=torch.long, device=frames.weights.device)
    return counts.index_add_(0, frames.groups, torch.ones_like(frames.groups))


_ECSE_OPTION_TYPES = {
    "mode": str,
    "inversion": bool,
    "beta": float,
    "beta_weights": float,
    "delta_r": float,
    "w": float,
    "delta_w": float,
    "max_outer_cutoff": float,
    "pruning_iterations": int,
    "pruning_start": float,
    "frame_layers": int,
    "collinear_penalty": float,
}


def check_ecse_options(
    options: Any, where: str = "architecture.model.ecse"
) -> Dict[str, Any]:
    """Validate the ``ecse`` section of the model options, filling defaults.

    ``mode``: ``"none"`` (no frames), ``"local"`` (frames applied inside PET,
    exactly O(3)-equivariant and local) or ``"auto"`` (the default: ``none`` for
    PET with invariant edge inputs and for the SOAP backbone, ``local`` with
    ``frame_layers: 1`` for PET with Cartesian inputs; resolved by
    :func:`symatomic.model_options.resolve_model_hypers`); ``inversion``:
    also symmetrize over inversion (O(3) rather than SO(3)); ``frame_layers``: how
    many attention layers (counted through all GNN layers) run in every frame, the
    others seeing frame-averaged tokens and distances only (``null``: all, as needed
    to symmetrize a PET trained without ECSE); the other options are the parameters
    of :class:`ECSEFrames`.
    """
    result: Dict[str, Any] = {"mode": "auto", "inversion": True, "frame_layers": None}
    result.update(ECSE_DEFAULTS)
    if options is None:
        return result
    if isinstance(options, str):
        options = {"mode": options}
    if not isinstance(options, dict):
        raise ValueError(
            f"{where} must be a mapping or 'none'/'local'/'auto', got {options!r}"
        )
    for name, value in options.items():
        if name not in _ECSE_OPTION_TYPES:
            raise ValueError(
                f"{where}: unknown option '{name}'; known options are "
                f"{sorted(_ECSE_OPTION_TYPES)}"
            )
        expected = _ECSE_OPTION_TYPES[name]
        if name in ("frame_layers", "collinear_penalty") and value is None:
            result[name] = None
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (
            expected is not bool and isinstance(value, bool)
        ):
            raise ValueError(
                f"{where}.{name} must be a {expected.__name__}, got {value!r}"
            )
        result[name] = value
    if result["mode"] not in ("none", "local", "auto"):
        raise ValueError(
            f"{where}.mode must be 'none', 'local' or 'auto', got {result['mode']!r}"
        )
    for name in ("beta", "beta_weights", "delta_r", "w", "delta_w", "max_outer_cutoff"):
        if result[name] <= 0:
            raise ValueError(f"{where}.{name} must be positive")
    if result["collinear_penalty"] is not None and result["collinear_penalty"] <= 0:
        raise ValueError(f"{where}.collinear_penalty must be positive (or null)")
    if result["pruning_iterations"] < 0:
        raise ValueError(f"{where}.pruning_iterations must not be negative")
    if not 0 < result["pruning_start"] < 1:
        raise ValueError(f"{where}.pruning_start must be between 0 and 1")
    if result["delta_w"] > result["w"]:
        raise ValueError(f"{where}: delta_w must not exceed w")
    return result
