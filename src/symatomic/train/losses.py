"""Predictions on batches (with forces and stress), losses and error metrics."""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..data.batch import Batch
from ..data.targets import TargetSpec
from ..long_range import SystemGeometry
from ..model import SymatomicModel
from ..neighbors import pair_vectors

__all__ = [
    "predict_batch",
    "model_inputs",
    "LossTerms",
    "loss_terms",
    "ErrorAccumulator",
]


def model_inputs(
    model: SymatomicModel,
    batch: Batch,
    positions: Optional[torch.Tensor] = None,
    cells: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[SystemGeometry]]:
    """What :meth:`SymatomicModel.predict` takes from a batch: species indices,
    pair vectors ``(E, 3)`` and, for models with a long-range part, the geometry.

    :param positions: ``(N, 3)`` positions to use instead of the batch's (displaced,
        or requiring gradients)
    :param cells: ``(S, 3, 3)`` cells to use instead of the batch's (strained)
    """
    if positions is None:
        positions = batch.positions
    if cells is None:
        cells = batch.cells
    vectors = pair_vectors(
        positions,
        cells,
        batch.system_index,
        batch.centers,
        batch.neighbors,
        batch.cell_shifts,
    )
    geometry: Optional[SystemGeometry] = None
    if model.long_range.enabled:
        geometry = SystemGeometry(positions, cells, batch.pbc, batch.system_index)
    return model.species_index(batch.types), vectors, geometry


def predict_batch(
    model: SymatomicModel,
    batch: Batch,
    specs: Dict[str, TargetSpec],
    with_gradients: bool = True,
    create_graph: bool = False,
) -> Tuple[
    Dict[str, List[torch.Tensor]], Dict[str, torch.Tensor], Dict[str, torch.Tensor]
]:
    """Predict every target of ``specs`` on a batch.

    Forces are ``-dE/dr`` and stress is ``(1/V) dE/dε`` (strain derivative), both by
    automatic differentiation of the energy, for energy targets that have them.

    :param with_gradients: compute forces / stress where the targets have them
    :param create_graph: keep the graph of the gradients (training on forces)
    :return: ``(blocks, forces, stress)``
    """
    names = list(specs)
    need_forces = with_gradients and any(s.has_forces for s in specs.values())
    need_stress = with_gradients and any(s.has_stress for s in specs.values())
    positions = batch.positions
    cells = batch.cells
    if need_forces or need_stress:
        positions = positions.detach().requires_grad_(need_forces)
    strain = torch.zeros(
        (batch.n_systems, 3, 3),
        dtype=positions.dtype,
        device=positions.device,
        requires_grad=need_stress,
    )
    displaced_positions = positions
    displaced_cells = cells
    if need_stress:
        atom_strain = strain.index_select(0, batch.system_index)
        displaced_positions = positions + torch.bmm(
            positions.unsqueeze(1), atom_strain
        ).squeeze(1)
        displaced_cells = cells + torch.bmm(cells, strain)
    species, vectors, geometry = model_inputs(
        model, batch, displaced_positions, displaced_cells
    )
    blocks = model.predict(
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
    forces: Dict[str, torch.Tensor] = {}
    stress: Dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        if not spec.is_energy or not with_gradients:
            continue
        inputs = []
        if spec.has_forces:
            inputs.append(positions)
        if spec.has_stress:
            inputs.append(strain)
        if not inputs:
            continue
        energy = blocks[name][0].sum()
        gradients = torch.autograd.grad(
            energy, inputs, create_graph=create_graph, retain_graph=True
        )
        index = 0
        if spec.has_forces:
            forces[name] = -gradients[0]
            index = 1
        if spec.has_stress:
            volumes = torch.abs(torch.det(batch.cells)).reshape(-1, 1, 1)
            stress[name] = gradients[index] / volumes
    return blocks, forces, stress


@dataclass
class LossTerms:
    """Sums of squared normalised residuals and their (local) counts."""

    sums: Dict[str, torch.Tensor] = field(default_factory=dict)
    counts: Dict[str, float] = field(default_factory=dict)


def loss_terms(
    model: SymatomicModel,
    batch: Batch,
    specs: Dict[str, TargetSpec],
    predictions: Tuple[
        Dict[str, List[torch.Tensor]], Dict[str, torch.Tensor], Dict[str, torch.Tensor]
    ],
    loss_scales: Dict[str, Any],
) -> LossTerms:
    """Squared residuals normalised to unit variance.

    A block's residual is divided by ``loss_scales[name]`` (the output scales of the
    model: root mean square residual per atom of every component after the
    composition baseline, at least the force scale for energies with forces, see
    :meth:`SymatomicModel.fit_output_statistics`); per-structure residuals also by
    ``sqrt(n_atoms)``. Forces and stress are divided by their root mean square over
    the training set (``loss_scales[name + "/forces"]``, ``…/stress``).

    The loss of a term is ``sums[term] / counts[term]`` with counts summed over all
    ranks in distributed training.
    """
    blocks, forces, stress = predictions
    terms = LossTerms()
    n_atoms = batch.n_atoms.to(batch.positions.dtype)
    for name, spec in specs.items():
        readout = model.readouts[name]
        flat_scale = torch.tensor(
            loss_scales[name],
            dtype=batch.positions.dtype,
            device=batch.positions.device,
        )
        scales = readout.split_blocks(flat_scale.unsqueeze(0))
        total = torch.zeros(
            (), dtype=batch.positions.dtype, device=batch.positions.device
        )
        count = 0
        for prediction, reference, scale in zip(
            blocks[name], batch.targets[name], scales
        ):
            residual = (prediction - reference) / scale
            if not spec.per_atom:
                residual = residual / torch.sqrt(n_atoms).reshape(-1, 1, 1)
            total = total + (residual**2).sum()
            count += residual.numel()
        terms.sums[name] = total
        terms.counts[name] = float(count)
        if name in forces and name in batch.forces:
            residual = (forces[name] - batch.forces[name]) / loss_scales[
                name + "/forces"
            ]
            terms.sums[name + "/forces"] = (residual**2).sum()
            terms.counts[name + "/forces"] = float(residual.numel())
        if name in stress and name in batch.stress:
            residual = (stress[name] - batch.stress[name]) / loss_scales[
                name + "/stress"
            ]
            terms.sums[name + "/stress"] = (residual**2).sum()
            terms.counts[name + "/stress"] = float(residual.numel())
    return terms


class ErrorAccumulator:
    """Root-mean-square and mean absolute errors, accumulated over batches.

    Keys: the target name (all components; for Cartesian targets, per Cartesian
    component, since the spherical decomposition is orthonormal), ``name/per_atom``
    for per-structure targets (errors divided by the number of atoms),
    ``name/forces``, ``name/stress`` and ``name/o3_lambda=L,o3_sigma=S`` per block.
    """

    def __init__(self, specs: Dict[str, TargetSpec]):
        self.specs = specs
        self.squared: Dict[str, float] = {}
        self.absolute: Dict[str, float] = {}
        self.counts: Dict[str, float] = {}

    def _add(self, key: str, difference: torch.Tensor, count: float) -> None:
        difference = difference.detach().to(torch.float64)
        self.squared[key] = self.squared.get(key, 0.0) + float((difference**2).sum())
        self.absolute[key] = self.absolute.get(key, 0.0) + float(difference.abs().sum())
        self.counts[key] = self.counts.get(key, 0.0) + count

    def update(
        self,
        batch: Batch,
        predictions: Tuple[
            Dict[str, List[torch.Tensor]],
            Dict[str, torch.Tensor],
            Dict[str, torch.Tensor],
        ],
    ) -> None:
        blocks, forces, stress = predictions
        n_atoms = batch.n_atoms.to(torch.float64)
        for name, spec in self.specs.items():
            total_squared = 0.0
            total_absolute = 0.0
            n_samples = 0
            for block, prediction, reference in zip(
                spec.blocks, blocks[name], batch.targets[name]
            ):
                difference = (prediction - reference).detach().to(torch.float64)
                label = f"{name}/o3_lambda={block.o3_lambda},o3_sigma={block.o3_sigma}"
                if block.atom_type is not None:
                    label += f",atom_type={block.atom_type}"
                if not spec.is_scalar:
                    self._add(label, difference, float(difference.numel()))
                total_squared += float((difference**2).sum())
                total_absolute += float(difference.abs().sum())
                n_samples = max(n_samples, difference.shape[0])
                if spec.is_energy and not spec.per_atom:
                    per_atom = difference / n_atoms.reshape(-1, 1, 1)
                    self._add(name + "/per_atom", per_atom, float(per_atom.numel()))
            if spec.kind == "cartesian":
                count = float(n_samples * 3**spec.rank * spec.num_subtargets)
            else:
                count = float(sum(d.numel() for d in batch.targets[name]))
            self.squared[name] = self.squared.get(name, 0.0) + total_squared
            self.absolute[name] = self.absolute.get(name, 0.0) + total_absolute
            self.counts[name] = self.counts.get(name, 0.0) + count
            if name in forces and name in batch.forces:
                difference = forces[name] - batch.forces[name]
                self._add(name + "/forces", difference, float(difference.numel()))
            if name in stress and name in batch.stress:
                difference = stress[name] - batch.stress[name]
                self._add(name + "/stress", difference, float(difference.numel()))

    def reduce(self, context) -> None:  # noqa: ANN001 - DistributedContext
        """Sum the accumulated values over ranks."""
        if not context.enabled:
            return
        keys = sorted(self.counts)
        values = torch.tensor(
            [[self.squared[k], self.absolute[k], self.counts[k]] for k in keys],
            dtype=torch.float64,
        )
        context.all_reduce_sum(values)
        for key, row in zip(keys, values.tolist()):
            self.squared[key], self.absolute[key], self.counts[key] = row

    def rmse(self) -> Dict[str, float]:
        return {
            k: math.sqrt(self.squared[k] / self.counts[k])
            for k in self.counts
            if self.counts[k] > 0
        }

    def mae(self) -> Dict[str, float]:
        return {
            k: self.absolute[k] / self.counts[k]
            for k in self.counts
            if self.counts[k] > 0
        }


def error_unit(specs: Dict[str, TargetSpec], key: str, length_unit: str) -> str:
    """Unit of an error metric, for display."""
    name = key.split("/")[0]
    unit = specs[name].unit if name in specs else ""
    if not unit:
        return ""
    if key.endswith("/forces"):
        return f"{unit}/{length_unit}"
    if key.endswith("/stress"):
        return f"{unit}/{length_unit}^3"
    if key.endswith("/per_atom"):
        return f"{unit}/atom"
    return unit
