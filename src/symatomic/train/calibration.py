"""Fitting the calibrated last-layer uncertainties of :mod:`symatomic.uncertainty`.

1. The covariance ``C = Σ_train Σ_μ Φ_μ Φ_μᵀ`` of every block's last-layer
   features over the training samples (structures for per-structure targets, atoms
   for per-atom ones), accumulated in float64, and its eigendecomposition
   ``C = U diag(λ) Uᵀ``.
2. On the validation set, for every sample, ``w_j = mean_μ (Φ_μ · U_j)²`` and the
   squared errors ``e²_p = mean_μ (T_μp − T^ref_μp)²``; the variance with
   regulariser ``ς`` is ``v(ς) = Σ_j w_j / (λ_j + ς)``.
3. For every ``ς`` of a logarithmic grid, ``α_p² = mean(e²_p / v)`` (the maximum of
   the Gaussian likelihood); the ``ς`` of the smallest negative log-likelihood wins.
4. ``R = U diag((λ + ς)^(-1/2))`` (``Σ = R Rᵀ``) and ``α_p`` go into the model;
   ensemble members ``α_p ξ``, ``ξ = Σ^(1/2) g`` (symmetric square root),
   ``g ~ N(0, I)``.
"""

import logging
import math
from typing import Dict, List, Sequence

import torch

from ..data.batch import collate
from ..data.structures import Structure
from ..data.targets import TargetSpec
from ..model import SymatomicModel
from .losses import model_inputs

__all__ = ["fit_uncertainties", "last_layer_samples"]

LOGGER = logging.getLogger(__name__)

#: regularisers tried, relative to the mean eigenvalue of the covariance
_REGULARISERS = [10.0**k for k in range(-10, 3)]


def last_layer_samples(
    model: SymatomicModel,
    structures: Sequence[Structure],
    names: List[str],
    batch_size: int,
):
    """Predictions, references and last-layer features of ``names`` on
    ``structures``, batch after batch: yields ``(predictions, references,
    features)``, name → one tensor per block (:meth:`SymatomicModel.predict_last_layer`
    layout; references ``None`` where the structures have none)."""
    parameter = next(model.parameters())
    for start in range(0, len(structures), batch_size):
        batch = collate(
            list(structures[start : start + batch_size]),
            parameter.dtype,
            parameter.device,
        )
        species, vectors, geometry = model_inputs(model, batch)
        with torch.no_grad():
            predictions, features = model.predict_last_layer(
                species,
                vectors,
                batch.centers,
                batch.neighbors,
                batch.reverse,
                batch.system_index,
                batch.n_systems,
                names,
                geometry,
            )
        yield predictions, batch.targets, features


def fit_uncertainties(
    model: SymatomicModel,
    training: Sequence[Structure],
    validation: Sequence[Structure],
    specs: Dict[str, TargetSpec],
    batch_size: int,
    n_members: int = 16,
    seed: int = 0,
) -> Dict[str, Dict[str, float]]:
    """Fit and store the uncertainty of every target of ``specs`` that has
    last-layer features (others are skipped and reported).

    :param training: structures of the covariance
    :param validation: structures of the calibration (the training structures are
        used, and a warning is logged, when there are none: the calibration is then
        optimistic)
    :param n_members: ensemble members per target (0: none)
    :param seed: seed of the ensemble draws
    :return: per block label (``name/o3_lambda=…,o3_sigma=…``) the chosen
        regulariser, the calibration factors and the validation negative
        log-likelihood
    """
    names = [name for name in specs if model.readouts[name].has_last_layer]
    if not names:
        return {}
    if not validation:
        LOGGER.warning(
            "warning: no validation set: the uncertainties are calibrated on the "
            "training set and will be too small"
        )
        validation = training
    was_training = model.training
    model.eval()
    covariances: Dict[str, List[torch.Tensor]] = {}
    for _, _, features in last_layer_samples(model, training, names, batch_size):
        for name in names:
            for index, phi in enumerate(features[name]):
                flat = phi.reshape(-1, phi.shape[-1]).to(torch.float64)
                update = flat.T @ flat
                blocks = covariances.setdefault(name, [])
                if len(blocks) <= index:
                    blocks.append(update)
                else:
                    blocks[index] += update
    decompositions = {
        name: [torch.linalg.eigh(c) for c in blocks]
        for name, blocks in covariances.items()
    }
    projections: Dict[str, List[List[torch.Tensor]]] = {n: [] for n in names}
    errors: Dict[str, List[List[torch.Tensor]]] = {n: [] for n in names}
    for predictions, references, features in last_layer_samples(
        model, validation, names, batch_size
    ):
        for name in names:
            for index, phi in enumerate(features[name]):
                eigenvectors = decompositions[name][index][1]
                projected = torch.matmul(phi.to(torch.float64), eigenvectors)
                if len(projections[name]) <= index:
                    projections[name].append([])
                    errors[name].append([])
                projections[name][index].append((projected**2).mean(dim=1))
                difference = predictions[name][index] - references[name][index]
                errors[name][index].append(
                    (difference.to(torch.float64) ** 2).mean(dim=1)
                )
    generator = torch.Generator().manual_seed(seed)
    report: Dict[str, Dict[str, float]] = {}
    for name in names:
        readout = model.readouts[name]
        for index, uncertainty in enumerate(readout.uncertainty):
            eigenvalues, eigenvectors = decompositions[name][index]
            eigenvalues = eigenvalues.clamp(min=0.0)
            weights = torch.cat(projections[name][index])
            squared = torch.cat(errors[name][index])
            best = _calibrate(eigenvalues, weights, squared)
            regulariser, alpha_squared, nll = best
            # R = U diag((λ + ς)^(-1/2)): the model's variance |Φ R|² is a sum of
            # squares, which float32 keeps (the form Φᵀ Σ Φ cancels)
            uncertainty.covariance_root = (
                eigenvectors / torch.sqrt(eigenvalues + regulariser)
            ).to(uncertainty.covariance_root)
            alpha = torch.sqrt(alpha_squared)
            uncertainty.calibration = alpha.to(uncertainty.calibration)
            draws = torch.randn(
                eigenvalues.shape[0],
                n_members,
                alpha.shape[0],
                dtype=torch.float64,
                generator=generator,
            )
            # the symmetric square root of Σ: unlike U diag((λ + ς)^(-1/2)), it
            # does not depend on the signs or the basis eigh picks in degenerate
            # subspaces, so equal models get equal ensembles
            root = (eigenvectors / torch.sqrt(eigenvalues + regulariser)) @ (
                eigenvectors.T
            )
            xi = torch.einsum("lj,jmp->lmp", root, draws)
            uncertainty.ensemble_weights = (xi * alpha).to(uncertainty.covariance_root)
            block = readout_label(specs[name], index)
            report[block] = {
                "regulariser": regulariser,
                "nll": nll,
                "calibration": float(alpha.mean()),
            }
    model.train(was_training)
    return report


def readout_label(spec: TargetSpec, index: int) -> str:
    block = spec.blocks[index]
    label = f"{spec.name}/o3_lambda={block.o3_lambda},o3_sigma={block.o3_sigma}"
    if block.atom_type is not None:
        label += f",atom_type={block.atom_type}"
    return label


def _calibrate(eigenvalues: torch.Tensor, weights: torch.Tensor, squared: torch.Tensor):
    """``(ς, α², nll)`` of the regulariser with the smallest mean negative
    log-likelihood of the errors ``squared`` ``(n, P)`` given the projected
    features ``weights`` ``(n, L)``."""
    scale = float(eigenvalues.mean())
    if not scale > 0:
        scale = 1.0
    best = None
    for factor in _REGULARISERS:
        regulariser = factor * scale
        variance = weights @ (1.0 / (eigenvalues + regulariser))
        variance = variance.clamp(min=1e-300).unsqueeze(1)
        alpha_squared = (squared / variance).mean(dim=0).clamp(min=1e-300)
        nll = float(
            0.5
            * (
                torch.log(2 * math.pi * alpha_squared * variance)
                + squared / (alpha_squared * variance)
            ).mean()
        )
        if best is None or nll < best[2]:
            best = (regulariser, alpha_squared, nll)
    assert best is not None
    return best
