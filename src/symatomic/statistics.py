"""Output statistics of a model fitted on training data: composition baselines and
scales of every target (the trainer calls this once, before the first epoch)."""

from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from .smooth import cutoff_function

__all__ = ["average_neighbors", "fit_output_statistics"]


def average_neighbors(
    structures: Sequence[Any], cutoff: float, cutoff_width: float
) -> float:
    """The average over atoms of ``Σ_j fc(r_ij)``, the cutoff-weighted number of
    neighbors (at least 1).

    :param structures: structures with neighbor lists
        (:class:`symatomic.data.Structure`)
    :param cutoff: the model's cutoff (length unit of the structures)
    :param cutoff_width: width of the smooth cutoff
    """
    total = 0.0
    n_atoms = 0
    for structure in structures:
        n_atoms += len(structure)
        if structure.centers is None or structure.centers.numel() == 0:
            continue
        distances = torch.linalg.vector_norm(structure.pair_vectors(), dim=1)
        total += float(cutoff_function(distances, cutoff, cutoff_width).sum())
    if n_atoms == 0:
        return 1.0
    return max(total / n_atoms, 1.0)


def fit_output_statistics(
    model: Any, structures: Sequence[Any]
) -> Dict[str, List[float]]:
    """Fit composition baselines and scales of every target on training data, and
    the normalization of the heads' pair sums (``1 / N_avg``, with ``N_avg`` the
    :func:`average_neighbors` of the training set).

    Baselines: per-species contributions to invariant (λ=0, σ=+1) blocks, by least
    squares over structures (per-structure targets) or per-species means
    (per-atom targets). Scales: root mean square of the residual per atom and per
    component, for every property; for energies with forces, at least the root
    mean square force component (times one length unit).

    :param structures: training structures (:class:`symatomic.data.Structure`)
    :return: target name → root mean square residual per atom of every flattened
        output component (without the adjustment to forces), for logging
    """
    n_species = len(model.atomic_types)
    index = {t: i for i, t in enumerate(model.atomic_types)}
    report: Dict[str, List[float]] = {}
    neighbors = average_neighbors(
        structures, model.cutoff, float(model.hypers["cutoff_width"])
    )
    for readout in model.readouts.values():
        readout.pair_normalization.fill_(1.0 / neighbors)
    for name, spec in model.target_specs.items():
        readout = model.readouts[name]
        baseline = torch.zeros_like(readout.baseline, dtype=torch.float64)
        scale = torch.ones_like(readout.scale, dtype=torch.float64)
        natural = torch.ones_like(readout.scale, dtype=torch.float64)
        start = 0
        for block_index, block in enumerate(spec.blocks):
            size = block.num_components * block.num_properties
            values = [s.targets[name][block_index] for s in structures]
            invariant = block.o3_lambda == 0 and block.o3_sigma == 1
            if spec.per_atom:
                atom_species = []
                for s in structures:
                    types = s.types
                    if block.atom_type is not None:
                        types = types[types == block.atom_type]
                    atom_species.append(torch.tensor([index[int(t)] for t in types]))
                all_values = torch.cat(values).reshape(-1, size)
                all_species = torch.cat(atom_species)
                weights = torch.zeros(n_species, size, dtype=torch.float64)
                if invariant:
                    for sp in range(n_species):
                        mask = all_species == sp
                        if bool(mask.any()):
                            weights[sp] = all_values[mask].mean(0)
                residual = all_values - weights[all_species]
                mean_square = (
                    residual.reshape(-1, block.num_components, block.num_properties)
                    ** 2
                ).mean(dim=(0, 1))
            else:
                counts = np.zeros((len(structures), n_species))
                for row, s in enumerate(structures):
                    for t in s.types.tolist():
                        counts[row, index[t]] += 1
                y = torch.stack([v.reshape(size) for v in values]).numpy()
                weights = torch.zeros(n_species, size, dtype=torch.float64)
                if invariant:
                    solution = np.linalg.lstsq(counts, y, rcond=None)[0]
                    weights = torch.tensor(solution, dtype=torch.float64)
                residual = torch.tensor(y) - torch.tensor(counts) @ weights
                n_atoms = torch.tensor(counts.sum(1)).reshape(-1, 1)
                per_atom_square = residual**2 / n_atoms
                mean_square = per_atom_square.reshape(
                    -1, block.num_components, block.num_properties
                ).mean(dim=(0, 1))
            block_scale = torch.sqrt(mean_square)
            block_scale[block_scale == 0] = 1.0
            natural[start : start + size] = block_scale.repeat(block.num_components)
            if spec.is_energy and all(name in s.forces for s in structures):
                # forces are derivatives of the scaled output: a scale below
                # the force magnitude (per length unit) makes them slow to learn
                forces = torch.cat([s.forces[name].reshape(-1) for s in structures])
                force_scale = torch.sqrt((forces**2).mean())
                block_scale = torch.maximum(block_scale, force_scale)
            block_scale[
                ~(block_scale > 1e-12 * max(float(block_scale.max()), 1e-300))
            ] = 1.0
            block_scale[block_scale == 0] = 1.0
            baseline[:, start : start + size] = weights
            scale[start : start + size] = block_scale.repeat(block.num_components)
            start += size
        readout.baseline.copy_(baseline.to(readout.baseline.dtype))
        readout.scale.copy_(scale.to(readout.scale.dtype))
        report[name] = natural.tolist()
    return report
