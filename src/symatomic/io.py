"""TensorMap input/output: predictions and targets as metatensor TensorMaps.

Functions here take and return :class:`metatensor.torch.TensorMap` objects in the
layout of the targets: keys ``(o3_lambda, o3_sigma)`` for tensors (``_`` for scalars),
components ``o3_mu``, samples ``system`` or ``(system, atom)``. Energies carry forces
and stress as ``positions`` / ``strain`` gradients (``dE/dr`` and ``dE/dε``), as in
metatensor and metatrain.

>>> import ase.io, symatomic.io
>>> predictions = symatomic.io.predict("model.pt", ase.io.read("water.xyz", ":"))
>>> predictions["mtt::dipole"].keys  # o3_lambda=1, o3_sigma=1
>>> symatomic.io.save("dipoles.mts", predictions["mtt::dipole"])
"""

import json
import os
from typing import Dict, List, Optional, Sequence, Union

import ase
import metatensor.torch as mts
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelCapabilities,
    ModelEvaluationOptions,
    ModelOutput,
    System,
    load_atomistic_model,
)

from .data.structures import (
    Structure,
    read_frames,
    structure_from_atoms,
    warn_overlapping_atoms,
)
from .data.targets import TargetSpec
from .files import atomic_write

__all__ = [
    "predict",
    "save",
    "load",
    "load_model",
    "targets_to_tensormap",
    "model_target_specs",
    "default_outputs",
    "add_neighbor_lists",
]

TARGETS_METADATA_KEY = "symatomic:targets"


def save(path: str, tensor: TensorMap) -> None:
    """Save a TensorMap with :func:`metatensor.torch.save`, atomically."""
    with atomic_write(path) as temporary:
        mts.save(temporary, tensor)


def load(path: str) -> TensorMap:
    """Load a TensorMap saved by :func:`save` (or any metatensor ``.mts`` file)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"'{path}' does not exist")
    return mts.load(path)


def load_model(path: str) -> AtomisticModel:
    """Load an exported metatomic model, with a one-line error for a missing,
    truncated or foreign file (``ValueError``, ``FileNotFoundError``)."""
    from .train.checkpoint import torch_load_reason

    if not os.path.exists(path):
        raise FileNotFoundError(f"model '{path}' does not exist")
    if os.path.isdir(path):
        raise ValueError(f"model '{path}' is a directory, not an exported model")
    try:
        return load_atomistic_model(path)
    except Exception as error:
        hint = (
            "it looks like a checkpoint: export it with 'symatomic export "
            f"{path} -o model.pt'"
            if path.endswith(".ckpt")
            else "export the model again with 'symatomic export CHECKPOINT -o "
            f"{path} --force'"
        )
        raise ValueError(
            f"model '{path}' is not a readable metatomic model "
            f"({torch_load_reason(error)}); {hint}"
        ) from None


#: outputs that are not predictions of a target, computed only when asked for
#: (metatomic also lists ``features``, the deprecated name of ``feature``)
AUXILIARY_OUTPUTS = ("feature", "features", "energy_uncertainty", "energy_ensemble")


def default_outputs(capabilities: ModelCapabilities) -> List[str]:
    """What :func:`predict` and ``symatomic eval`` compute unless told: every output
    of the model except :data:`AUXILIARY_OUTPUTS` (``feature``, the energy's
    uncertainty and ensemble) and metatrain's
    auxiliary ``mtt::aux::`` outputs."""
    return [
        name
        for name in capabilities.outputs
        if name not in AUXILIARY_OUTPUTS and not name.startswith("mtt::aux::")
    ]


def model_target_specs(model: AtomisticModel) -> Dict[str, TargetSpec]:
    """The target descriptions stored in a model exported by symatomic (empty for
    other models)."""
    extra = model.metadata().extra
    if TARGETS_METADATA_KEY not in extra:
        return {}
    data = json.loads(extra[TARGETS_METADATA_KEY])
    return {name: TargetSpec.from_dict(spec) for name, spec in data.items()}


def _as_structures(
    structures: Union[str, ase.Atoms, Sequence[ase.Atoms], Sequence[Structure]],
) -> List[Structure]:
    if isinstance(structures, str):
        frames = read_frames(structures)
        return [
            structure_from_atoms(a, f"{structures}[{i}]") for i, a in enumerate(frames)
        ]
    if isinstance(structures, ase.Atoms):
        structures = [structures]
    result = []
    for index, item in enumerate(structures):
        if isinstance(item, Structure):
            result.append(item)
        elif isinstance(item, ase.Atoms):
            result.append(structure_from_atoms(item, f"#{index}"))
        else:
            raise TypeError(
                f"expected ase.Atoms or Structure, got {type(item).__name__}"
            )
    return result


def predict(
    model: Union[str, AtomisticModel],
    structures: Union[str, ase.Atoms, Sequence[ase.Atoms], Sequence[Structure]],
    outputs: Optional[Sequence[str]] = None,
    batch_size: int = 16,
    forces: bool = True,
    stress: bool = True,
) -> Dict[str, TensorMap]:
    """Evaluate an exported metatomic model and gather its outputs as TensorMaps.

    :param model: path of a ``.pt`` file or a loaded :class:`AtomisticModel`
    :param structures: a file readable by ASE, ASE atoms, or structures
    :param outputs: names of the outputs (default: :func:`default_outputs`; ask for
        ``"feature"`` to get the model's invariant features)
    :param batch_size: number of structures evaluated together
    :param forces: attach ``positions`` gradients (``dE/dr``) to energies
    :param stress: with ``forces``, also attach ``strain`` gradients (``dE/dε``) to
        energies when every structure of a batch is periodic
    :return: output name → TensorMap over all structures (``system`` samples numbered
        in the order of ``structures``)
    """
    if isinstance(model, str):
        model = load_model(model)
    capabilities = model.capabilities()
    dtype = torch.float64 if capabilities.dtype == "float64" else torch.float32
    all_structures = _as_structures(structures)
    for structure in all_structures:
        unknown = set(structure.types.tolist()) - set(capabilities.atomic_types)
        if unknown:
            raise ValueError(
                f"structure {structure.source} contains atomic type(s) {sorted(unknown)} "
                f"unknown to the model (it knows {capabilities.atomic_types})"
            )
    names = list(outputs) if outputs is not None else default_outputs(capabilities)
    for name in names:
        if name not in capabilities.outputs:
            raise ValueError(
                f"the model has no output '{name}'; it has {list(capabilities.outputs)}"
            )
    requested = {
        name: ModelOutput(
            unit=capabilities.outputs[name].unit,
            sample_kind=_natural_sample_kind(model, name),
        )
        for name in names
    }
    options = ModelEvaluationOptions(
        length_unit=capabilities.length_unit, outputs=requested
    )

    pieces: Dict[str, List[TensorMap]] = {name: [] for name in names}
    with_forces = forces and any(_is_energy(model, n) for n in names)
    for start in range(0, len(all_structures), batch_size):
        chunk = all_structures[start : start + batch_size]
        with_stress = (
            stress and with_forces and all(bool(torch.all(s.pbc)) for s in chunk)
        )
        leaves = [
            s.positions.to(dtype).detach().requires_grad_(with_forces) for s in chunk
        ]
        strain = None
        if with_stress:
            strain = torch.zeros((len(chunk), 3, 3), dtype=dtype, requires_grad=True)
        systems = []
        for index, structure in enumerate(chunk):
            positions = leaves[index]
            cell = structure.cell.to(dtype)
            if strain is not None:
                deformation = torch.eye(3, dtype=dtype) + strain[index]
                positions = positions @ deformation
                cell = cell @ deformation
            systems.append(
                System(
                    types=structure.types,
                    positions=positions,
                    cell=cell,
                    pbc=structure.pbc,
                )
            )
        add_neighbor_lists(systems, model)
        _warn_overlapping_atoms(chunk, systems, capabilities.length_unit)
        results = model(systems, options, check_consistency=False)
        for name in names:
            tensor = results[name]
            if with_forces and _is_energy(model, name):
                tensor = _attach_energy_gradients(tensor, leaves, strain)
            else:
                tensor = _detach(tensor)
            pieces[name].append(_offset_systems(tensor.to(dtype=torch.float64), start))
    return {name: mts.join(tensors, axis="samples") for name, tensors in pieces.items()}


def add_neighbor_lists(systems: List[System], model: AtomisticModel) -> None:
    """Compute (with vesin) and store the neighbor lists ``model`` asks for."""
    from vesin.metatomic import neighbor_lists_for_model

    length_unit = model.capabilities().length_unit
    for calculator in neighbor_lists_for_model(length_unit, model):
        calculator.add_neighbor_list(systems)


def _warn_overlapping_atoms(
    structures: Sequence[Structure], systems: List[System], length_unit: str
) -> None:
    """Warn for structures with atoms closer than
    :data:`symatomic.data.structures.OVERLAP_DISTANCE` (from the model's first
    neighbor list)."""
    for structure, system in zip(structures, systems):
        known = system.known_neighbor_lists()
        if not known:
            continue
        pairs = system.get_neighbor_list(known[0])
        samples = pairs.samples
        distances = torch.linalg.vector_norm(
            pairs.values.detach().reshape(-1, 3), dim=1
        )
        warn_overlapping_atoms(
            structure.source,
            samples.column("first_atom"),
            samples.column("second_atom"),
            distances,
            length_unit,
        )


def _natural_sample_kind(model: AtomisticModel, name: str) -> str:
    specs = model_target_specs(model)
    if name in specs:
        return specs[name].sample_kind
    if name == "feature":
        return "atom"
    return "system"


def _is_energy(model: AtomisticModel, name: str) -> bool:
    if name == "energy" or name.startswith("energy/"):
        return True
    specs = model_target_specs(model)
    return name in specs and specs[name].is_energy


def _attach_energy_gradients(
    tensor: TensorMap, positions: List[torch.Tensor], strain: Optional[torch.Tensor]
) -> TensorMap:
    block = tensor.block()
    energy = block.values.sum()
    inputs = list(positions) + ([strain] if strain is not None else [])
    gradients = torch.autograd.grad(energy, inputs)
    new_block = TensorBlock(
        values=block.values.detach(),
        samples=block.samples,
        components=block.components,
        properties=block.properties,
    )
    rows = []
    values = []
    for system, gradient in enumerate(gradients[: len(positions)]):
        n = gradient.shape[0]
        rows.append(
            torch.stack(
                [
                    torch.full((n,), system, dtype=torch.int32),
                    torch.full((n,), system, dtype=torch.int32),
                    torch.arange(n, dtype=torch.int32),
                ],
                dim=1,
            )
        )
        values.append(gradient.detach())
    new_block.add_gradient(
        "positions",
        TensorBlock(
            values=torch.cat(values).reshape(-1, 3, 1),
            samples=Labels(["sample", "system", "atom"], torch.cat(rows)),
            components=[Labels.range("xyz", 3)],
            properties=block.properties,
        ),
    )
    if strain is not None:
        n = strain.shape[0]
        new_block.add_gradient(
            "strain",
            TensorBlock(
                values=gradients[-1].detach().reshape(n, 3, 3, 1),
                samples=Labels(
                    ["sample"], torch.arange(n, dtype=torch.int32).reshape(-1, 1)
                ),
                components=[Labels.range("xyz_1", 3), Labels.range("xyz_2", 3)],
                properties=block.properties,
            ),
        )
    return TensorMap(tensor.keys, [new_block])


def _detach(tensor: TensorMap) -> TensorMap:
    return TensorMap(
        tensor.keys,
        [
            TensorBlock(
                values=block.values.detach(),
                samples=block.samples,
                components=block.components,
                properties=block.properties,
            )
            for block in tensor.blocks()
        ],
    )


def _offset_systems(tensor: TensorMap, offset: int) -> TensorMap:
    if offset == 0:
        return tensor
    blocks = []
    for block in tensor.blocks():
        samples = block.samples.values.clone()
        samples[:, 0] += offset
        new_block = TensorBlock(
            values=block.values,
            samples=Labels(block.samples.names, samples),
            components=block.components,
            properties=block.properties,
        )
        for parameter, gradient in block.gradients():
            gradient_samples = gradient.samples.values.clone()
            if "system" in gradient.samples.names:
                column = gradient.samples.names.index("system")
                gradient_samples[:, column] += offset
            new_block.add_gradient(
                parameter,
                TensorBlock(
                    values=gradient.values,
                    samples=Labels(gradient.samples.names, gradient_samples),
                    components=gradient.components,
                    properties=gradient.properties,
                ),
            )
        blocks.append(new_block)
    return TensorMap(tensor.keys, blocks)


def targets_to_tensormap(
    spec: TargetSpec, structures: Sequence[Structure]
) -> TensorMap:
    """Reference values of one target (as read into ``structures``) as a TensorMap in
    the target's layout (float64). Only the values: forces and stress of energies are
    in ``structure.forces`` / ``structure.stress``."""
    layout = spec.layout()
    blocks = []
    for block_index, template in enumerate(layout.blocks()):
        values = []
        samples = []
        for system, structure in enumerate(structures):
            block_values = structure.targets[spec.name][block_index]
            values.append(block_values)
            if spec.per_atom:
                atom_type = spec.blocks[block_index].atom_type
                atoms = (
                    torch.arange(len(structure))
                    if atom_type is None
                    else torch.nonzero(structure.types == atom_type)[:, 0]
                )
                samples.append(
                    torch.stack([torch.full_like(atoms, system), atoms], dim=1)
                )
            else:
                samples.append(torch.tensor([[system]]))
        stacked = torch.cat(values)
        if spec.is_scalar:
            stacked = stacked.reshape(stacked.shape[0], -1)
        block = TensorBlock(
            values=stacked,
            samples=Labels(template.samples.names, torch.cat(samples).to(torch.int32)),
            components=template.components,
            properties=template.properties,
        )
        blocks.append(block)
    return TensorMap(layout.keys, blocks)
