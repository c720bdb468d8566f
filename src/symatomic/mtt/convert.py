"""Translation between metatrain's data description and symatomic's.

* :func:`spec_from_target_info`: a metatrain ``TargetInfo`` (a layout TensorMap)
  becomes a :class:`~symatomic.data.targets.TargetSpec` (the blocks the model learns);
* :func:`structures_from_dataset`: the samples of a metatrain dataset (a ``System``
  and one TensorMap per target) become :class:`~symatomic.data.structures.Structure`
  objects with symatomic's per-block target tensors, forces and stress.
"""

from typing import Any, Dict, List

import torch
from metatensor.torch import TensorBlock, TensorMap
from metatrain.utils.data import TargetInfo

from ..data.structures import Structure, compute_neighbors
from ..data.targets import BlockSpec, GradientSpec, TargetSpec

__all__ = ["spec_from_target_info", "structures_from_dataset"]


def spec_from_target_info(name: str, info: TargetInfo) -> TargetSpec:
    """The :class:`TargetSpec` learning the target ``name`` described by ``info``.

    Scalars keep their properties; Cartesian tensors of rank 1–3 are learned as all
    their spherical blocks (metatrain describes targets before any data is seen, so
    symmetric tensors cannot be detected); spherical targets keep their blocks,
    including per-atomic-type (``atom_type``) blocks. Energies (``quantity:
    energy``) get forces when the layout has ``positions`` gradients and stress when
    it has ``strain`` gradients.

    :raises ValueError: for targets symatomic cannot learn (per-pair targets,
        products of irreps), naming the target
    """
    sample_kind = info.sample_kind
    if sample_kind not in ("system", "atom"):
        raise ValueError(
            f"target '{name}': sample_kind '{sample_kind}' is not supported by "
            "symatomic (only 'system' and 'atom')"
        )
    layout = info.layout
    spec = TargetSpec(
        name=name,
        kind="scalar",
        sample_kind=sample_kind,
        quantity=info.quantity,
        unit=info.unit,
        description=info.description,
    )
    if info.is_scalar:
        block = layout.block()
        properties = block.properties
        spec.num_subtargets = len(properties)
        spec.key_names = ["_"]
        spec.blocks = [
            BlockSpec(
                0,
                1,
                list(properties.names),
                properties.values.tolist(),
            )
        ]
        if spec.is_energy:
            gradients = info.gradients
            if "positions" in gradients:
                spec.forces = GradientSpec(read_from="", key="positions")
            if "strain" in gradients:
                spec.stress = GradientSpec(read_from="", key="strain")
    elif info.is_cartesian:
        block = layout.block()
        rank = len(block.components)
        if rank not in (1, 2, 3):
            raise ValueError(
                f"target '{name}': Cartesian tensors of rank {rank} are not supported "
                "(1, 2 or 3)"
            )
        spec.kind = "cartesian"
        spec.rank = rank
        spec.num_subtargets = len(block.properties)
        spec.key_names = ["o3_lambda", "o3_sigma"]
        spec.set_cartesian_blocks(False)
    elif info.is_spherical:
        names = list(layout.keys.names)
        if names not in (
            ["o3_lambda", "o3_sigma"],
            ["o3_lambda", "o3_sigma", "atom_type"],
        ):
            raise ValueError(
                f"target '{name}': spherical targets with keys {names} (products of "
                "irreps) are not supported by symatomic"
            )
        spec.kind = "spherical"
        spec.key_names = names
        for key, block in layout.items():
            values = key.values.tolist()
            atom_type = int(values[2]) if len(values) == 3 else None
            spec.blocks.append(
                BlockSpec(
                    int(values[0]),
                    int(values[1]),
                    ["n"],
                    [[i] for i in range(len(block.properties))],
                    atom_type=atom_type,
                )
            )
    else:  # pragma: no cover - TargetInfo always sets one of the kinds
        raise ValueError(f"target '{name}': unknown kind of target")
    return spec


def _atom_order(block: TensorBlock) -> torch.Tensor:
    """Permutation sorting the samples of a per-atom block by atom index."""
    return torch.argsort(block.samples.column("atom").to(torch.long))


def _target_blocks(
    spec: TargetSpec, tensor: TensorMap, structure: Structure, source: str
) -> List[torch.Tensor]:
    """symatomic's blocks ``(n_samples, 2λ+1, p)`` (float64) of one target."""
    if spec.kind == "scalar":
        block = tensor.block()
        values = block.values.detach().to(torch.float64)
        if spec.per_atom:
            values = values[_atom_order(block)]
        return [values.reshape(values.shape[0], 1, -1)]
    if spec.kind == "cartesian":
        block = tensor.block()
        values = block.values.detach().to(torch.float64)
        if spec.per_atom:
            values = values[_atom_order(block)]
        return [b.contiguous() for b in spec.decomposition().to_spherical(values)]
    blocks: List[torch.Tensor] = []
    for block_spec, key in zip(spec.blocks, spec.keys()):
        position = tensor.keys.position(key)
        if position is None:
            if block_spec.atom_type is None:
                raise ValueError(
                    f"target '{spec.name}' of {source}: missing block "
                    f"{dict(zip(key.names, key.values.tolist()))}"
                )
            # atomic-basis targets may omit the types absent from a structure
            count = int((structure.types == block_spec.atom_type).sum())
            if count != 0:
                raise ValueError(
                    f"target '{spec.name}' of {source}: missing block for atom_type "
                    f"{block_spec.atom_type}, which the structure contains"
                )
            blocks.append(
                torch.zeros(
                    0,
                    block_spec.num_components,
                    block_spec.num_properties,
                    dtype=torch.float64,
                )
            )
            continue
        block = tensor.block(position)
        values = block.values.detach().to(torch.float64)
        if spec.per_atom:
            values = values[_atom_order(block)]
        blocks.append(values.reshape(values.shape[0], block_spec.num_components, -1))
    return blocks


def structures_from_dataset(
    dataset: Any,
    specs: Dict[str, TargetSpec],
    cutoff: float,
    name: str = "dataset",
) -> List[Structure]:
    """Convert every sample of a metatrain dataset to a :class:`Structure`.

    :param dataset: a metatrain ``Dataset``/``DiskDataset`` or a ``Subset`` of one;
        ``dataset[i]`` has a ``system`` and one TensorMap per target
    :param specs: the targets of the model; every one must be in the samples
    :param cutoff: neighbor-list cutoff of the model
    :param name: name of the dataset, for error messages (``name[i]``)
    :return: structures with float64 positions, cells, targets, forces (``-dE/dr``)
        and stress (strain gradient / volume), and their neighbor lists
    """
    structures: List[Structure] = []
    for index in range(len(dataset)):
        sample = dataset[index]
        source = f"{name}[{index}]"
        system = sample["system"]
        structure = Structure(
            positions=system.positions.detach().to(torch.float64).cpu(),
            types=system.types.detach().to(torch.int32).cpu(),
            cell=system.cell.detach().to(torch.float64).cpu(),
            pbc=system.pbc.detach().cpu(),
            source=source,
        )
        fields = sample._fields if hasattr(sample, "_fields") else list(sample.keys())
        for target, spec in specs.items():
            if target not in fields:
                raise ValueError(f"{source} has no values for target '{target}'")
            tensor = sample[target]
            if tensor.device.type != "cpu":
                tensor = tensor.to("cpu")
            structure.targets[target] = _target_blocks(spec, tensor, structure, source)
            if spec.has_forces or spec.has_stress:
                _store_gradients(spec, tensor, structure, source)
        compute_neighbors(structure, cutoff)
        structures.append(structure)
    return structures


def _store_gradients(
    spec: TargetSpec, tensor: TensorMap, structure: Structure, source: str
) -> None:
    block = tensor.block()
    if spec.has_forces:
        if "positions" not in block.gradients_list():
            raise ValueError(f"{source}: no forces for target '{spec.name}'")
        gradient = block.gradient("positions")
        atoms = gradient.samples.column("atom").to(torch.long)
        forces = torch.zeros(len(structure), 3, dtype=torch.float64)
        forces[atoms] = -gradient.values.detach().to(torch.float64).reshape(-1, 3)
        structure.forces[spec.name] = forces
    if spec.has_stress:
        if "strain" not in block.gradients_list():
            raise ValueError(f"{source}: no stress/virial for target '{spec.name}'")
        if not bool(torch.all(structure.pbc)):
            raise ValueError(
                f"{source}: stress of target '{spec.name}' for a structure that is "
                "not periodic in all directions"
            )
        volume = float(torch.abs(torch.det(structure.cell)))
        strain = block.gradient("strain").values.detach().to(torch.float64)
        structure.stress[spec.name] = strain.reshape(3, 3) / volume
