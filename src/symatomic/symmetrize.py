"""Global ECSE: exact O(3) symmetrization of any metatomic model.

:class:`GlobalECSE` wraps the module of an exported metatomic model. For every
structure it builds the ECSE frames of all atoms, pooled over the structure (one set
of weights per structure), evaluates the wrapped model on the structure expressed in
every surviving frame (and in its mirror image, for O(3)), rotates every output back
and averages with the frame weights:

``y(X) = [Σ_c w_c ρ(F_c) f(F_cᵀ X) + w_aux f_aux(X)] / [Σ_c w_c + w_aux]``.

Outputs are rotated according to their component axes: ``o3_mu`` with the Wigner-D
matrix of the block's ``o3_lambda`` (and ``o3_sigma (-1)^λ`` for improper frames),
``xyz`` as vectors, ``xyz_1, xyz_2`` as rank-2 tensors; outputs without components
are invariant. Forces and stress come from the symmetrized energy by automatic
differentiation (through the frames and weights), so they are exactly equivariant and
conservative.

The fallback ``f_aux`` of degenerate structures (every atom with fewer than two
non-collinear neighbors: isolated atoms, diatomics, linear molecules) averages the
wrapped model over the 48 operations of the cube: it is exactly invariant for an
isolated atom but only approximately equivariant for linear molecules.

Each prediction depends on the whole structure: the exported model declares an
infinite interaction range.
"""

import math
from typing import Dict, List, Optional

import torch
from metatensor.torch import Labels, LabelsEntry, TensorBlock, TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelCapabilities,
    ModelMetadata,
    ModelOutput,
    NeighborListOptions,
    System,
)

from .ecse import ECSE_GLOBAL_DEFAULTS, ECSEFrames
from .neighbors import sort_pairs
from .o3 import WignerD

__all__ = ["GlobalECSE", "symmetrize_model", "cube_operations"]


def cube_operations() -> torch.Tensor:
    """The 24 proper rotations of the cube, ``(24, 3, 3)`` (signed permutations with
    determinant +1)."""
    import itertools

    matrices = []
    for permutation in itertools.permutations(range(3)):
        for signs in itertools.product([1.0, -1.0], repeat=3):
            matrix = torch.zeros(3, 3, dtype=torch.float64)
            for row, column in enumerate(permutation):
                matrix[row, column] = signs[row]
            if torch.det(matrix) > 0:
                matrices.append(matrix)
    return torch.stack(matrices)


class GlobalECSE(torch.nn.Module):
    """Exact O(3) symmetrization of a metatomic model (global ECSE).

    :param model: the ``module`` of an :class:`AtomisticModel` (scripted or not),
        following metatomic's model interface
    :param capabilities: capabilities of the wrapped model
    :param cutoff: neighbor cutoff of the frames (Å in the model's length unit);
        defaults to the largest neighbor-list cutoff the model requests (at most
        ``max_outer_cutoff``), or 5
    :param inversion: symmetrize over O(3), not only SO(3)
    :param max_lambda: largest ``o3_lambda`` of the outputs
    :param frame_options: parameters of :class:`symatomic.ecse.ECSEFrames`
        (defaults: :data:`symatomic.ecse.ECSE_GLOBAL_DEFAULTS`)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        capabilities: ModelCapabilities,
        cutoff: Optional[float] = None,
        inversion: bool = True,
        max_lambda: int = 6,
        frame_options: Optional[Dict[str, float]] = None,
    ):
        super().__init__()
        self.model = model
        options = dict(ECSE_GLOBAL_DEFAULTS)
        options.update(frame_options or {})
        max_outer_cutoff = float(options["max_outer_cutoff"])
        if cutoff is None:
            cutoffs = [
                float(options.cutoff) for options in _requested_neighbor_lists(model)
            ]
            cutoff = min(max(cutoffs), max_outer_cutoff) if cutoffs else 5.0
        self.cutoff = float(cutoff)
        self.nl_options = NeighborListOptions(
            cutoff=self.cutoff, full_list=True, strict=True
        )
        self.frames = ECSEFrames(self.cutoff, **options)
        self.inversion = bool(inversion)
        self.wigner = WignerD(max_lambda)
        self.max_lambda = int(max_lambda)
        self.register_buffer("mirror", torch.diag(torch.tensor([1.0, -1.0, 1.0])))
        self.register_buffer("cube", cube_operations())
        # "features" is metatomic's alias of "feature", not an output of its own
        self.output_names: List[str] = [
            name for name in capabilities.outputs.keys() if name != "features"
        ]

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        """The full neighbor list of the frames (the wrapped model's own requests
        are collected from it by metatomic)."""
        return [self.nl_options]

    def _frames_of(self, systems: List[System]) -> List[List[torch.Tensor]]:
        """Per system: ``[rotations (n, 3, 3), weights (n,)]``, normalised, the
        fallback operations included."""
        n_systems = len(systems)
        device = systems[0].positions.device
        dtype = systems[0].positions.dtype
        centers: List[torch.Tensor] = []
        vectors: List[torch.Tensor] = []
        groups: List[torch.Tensor] = []
        offset = 0
        for index, system in enumerate(systems):
            n_atoms = system.positions.shape[0]
            pairs = system.get_neighbor_list(self.nl_options)
            samples = pairs.samples.values.to(torch.long)
            pair_vectors = pairs.values.reshape(-1, 3)
            distances = torch.linalg.vector_norm(pair_vectors.detach(), dim=1)
            keep = torch.nonzero(distances < self.cutoff).squeeze(1)
            first = samples[:, 0].index_select(0, keep)
            second = samples[:, 1].index_select(0, keep)
            order = sort_pairs(first, second, n_atoms)
            centers.append(first.index_select(0, order) + offset)
            vectors.append(pair_vectors.index_select(0, keep).index_select(0, order))
            groups.append(
                torch.full((n_atoms,), index, dtype=torch.long, device=device)
            )
            offset += n_atoms
        frames = self.frames(
            torch.cat(centers), torch.cat(vectors), offset, torch.cat(groups), n_systems
        )
        cube = self.cube.to(dtype=dtype, device=device)
        result: List[List[torch.Tensor]] = []
        for index in range(n_systems):
            mask = frames.groups == index
            rotations = frames.rotations[mask]
            weights = frames.weights[mask]
            aux = frames.aux_weights[index]
            if bool(aux > 0):
                rotations = torch.cat([rotations, cube])
                weights = torch.cat(
                    [weights, (aux / cube.shape[0]).expand(cube.shape[0])]
                )
            weights = weights / frames.normalization[index]
            if self.inversion:
                rotations = torch.cat(
                    [rotations, torch.matmul(rotations, self.mirror.to(dtype))]
                )
                weights = torch.cat([0.5 * weights, 0.5 * weights])
            result.append([rotations, weights])
        return result

    def forward(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        selected_atoms: Optional[Labels] = None,
    ) -> Dict[str, TensorMap]:
        """Evaluate the wrapped model in every frame and average, exactly
        equivariantly."""
        if len(systems) == 0:
            return self.model(systems, outputs, selected_atoms)
        for name, output in outputs.items():
            if len(output.explicit_gradients) > 0:
                raise ValueError(
                    "explicit gradients of '" + name + "' are not supported by the "
                    "ECSE wrapper; compute them with automatic differentiation"
                )
        frames = self._frames_of(systems)
        copies: List[System] = []
        copy_system: List[int] = []
        rotations: List[torch.Tensor] = []
        weights: List[torch.Tensor] = []
        for index, system in enumerate(systems):
            for rotation in frames[index][0].unbind(0):
                copies.append(_transform_system(system, rotation))
                copy_system.append(index)
            rotations.append(frames[index][0])
            weights.append(frames[index][1])
        all_rotations = torch.cat(rotations)
        all_weights = torch.cat(weights)
        device = systems[0].positions.device
        copy_index = torch.tensor(copy_system, dtype=torch.long, device=device)

        copy_selection: Optional[Labels] = None
        if selected_atoms is not None:
            selected_systems = selected_atoms.column("system").to(torch.long)
            rows: List[torch.Tensor] = []
            for copy, system_index in enumerate(copy_system):
                mask = selected_systems == system_index
                atoms = selected_atoms.column("atom")[mask]
                rows.append(torch.stack([torch.full_like(atoms, copy), atoms], dim=1))
            copy_selection = Labels(["system", "atom"], torch.cat(rows).to(torch.int32))

        results = self.model(copies, outputs, copy_selection)

        determinant = torch.linalg.det(all_rotations.detach())
        improper = determinant < 0
        sign = torch.where(improper, -1.0, 1.0).to(all_rotations.dtype)
        proper = all_rotations * sign.reshape(-1, 1, 1)
        wigner = self.wigner(proper)

        symmetrized: Dict[str, TensorMap] = {}
        for name, tensor in results.items():
            blocks: List[TensorBlock] = []
            for key, block in tensor.items():
                blocks.append(
                    _average_block(
                        key,
                        block,
                        all_rotations,
                        improper,
                        wigner,
                        all_weights,
                        copy_index,
                    )
                )
            symmetrized[name] = TensorMap(tensor.keys, blocks)
        return symmetrized


def _requested_neighbor_lists(model: torch.nn.Module) -> List[NeighborListOptions]:
    requests: List[NeighborListOptions] = []
    for module in model.modules():
        if hasattr(module, "requested_neighbor_lists"):
            requests.extend(module.requested_neighbor_lists())
    return requests


def _transform_system(system: System, rotation: torch.Tensor) -> System:
    """The system in the coordinates of a frame: ``r → Fᵀ r``, neighbor lists too."""
    transformed = System(
        types=system.types,
        positions=torch.matmul(system.positions, rotation),
        cell=torch.matmul(system.cell, rotation),
        pbc=system.pbc,
    )
    for options in system.known_neighbor_lists():
        pairs = system.get_neighbor_list(options)
        values = torch.matmul(pairs.values.squeeze(-1), rotation).unsqueeze(-1)
        transformed.add_neighbor_list(
            options,
            TensorBlock(
                values=values,
                samples=pairs.samples,
                components=pairs.components,
                properties=pairs.properties,
            ),
        )
    return transformed


def _average_block(
    key: LabelsEntry,
    block: TensorBlock,
    rotations: torch.Tensor,
    improper: torch.Tensor,
    wigner: List[torch.Tensor],
    weights: torch.Tensor,
    copy_index: torch.Tensor,
) -> TensorBlock:
    """Rotate every sample of ``block`` back from its copy's frame and sum the
    weighted copies of each system."""
    values = block.values
    sample_copy = block.samples.column("system").to(torch.long)
    sample_rotation = rotations.index_select(0, sample_copy)
    sample_improper = improper.index_select(0, sample_copy)
    parity_sign = 1
    for axis, component in enumerate(block.components):
        name = component.names[0]
        dim = axis + 1
        moved = torch.movedim(values, dim, -1)
        shape = moved.shape
        flat = moved.reshape(shape[0], -1, shape[-1])
        if name == "o3_mu":
            o3_lambda = int(key["o3_lambda"])
            o3_sigma = int(key["o3_sigma"])
            matrices = wigner[o3_lambda].index_select(0, sample_copy)
            flat = torch.matmul(flat, matrices.transpose(1, 2))
            parity_sign *= o3_sigma * (1 - 2 * (o3_lambda % 2))
        elif name == "xyz" or name.startswith("xyz_"):
            flat = torch.matmul(flat, sample_rotation.transpose(1, 2))
        else:
            raise ValueError(
                "can not rotate the component axis '" + name + "' of an output"
            )
        values = torch.movedim(flat.reshape(shape), -1, dim)
    if parity_sign != 1:
        factor = torch.where(sample_improper, -1.0, 1.0).to(values.dtype)
        values = values * factor.reshape([-1] + [1] * (values.dim() - 1))
    sample_weights = weights.index_select(0, sample_copy).to(values.dtype)
    values = values * sample_weights.reshape([-1] + [1] * (values.dim() - 1))

    # sum the copies of every system (samples are identical up to the system)
    samples = block.samples.values.clone()
    samples[:, 0] = copy_index.index_select(0, sample_copy).to(samples.dtype)
    unique, inverse = torch.unique(samples, dim=0, return_inverse=True)
    summed = torch.zeros(
        [unique.shape[0]] + list(values.shape[1:]),
        dtype=values.dtype,
        device=values.device,
    ).index_add(0, inverse, values)
    return TensorBlock(
        values=summed,
        samples=Labels(block.samples.names, unique),
        components=block.components,
        properties=block.properties,
    )


def symmetrize_model(
    model: AtomisticModel,
    inversion: bool = True,
    cutoff: Optional[float] = None,
    max_lambda: Optional[int] = None,
) -> AtomisticModel:
    """An exactly O(3)-equivariant version of an exported metatomic model.

    The result declares the same outputs and an infinite interaction range (every
    prediction depends on the whole structure).
    """
    capabilities = model.capabilities()
    if max_lambda is None:
        max_lambda = 6
    wrapper = GlobalECSE(
        model.module,
        capabilities,
        cutoff=cutoff,
        inversion=inversion,
        max_lambda=max_lambda,
    )
    metadata = model.metadata()
    new_capabilities = ModelCapabilities(
        outputs={
            name: output
            for name, output in capabilities.outputs.items()
            if name != "features"
        },
        atomic_types=capabilities.atomic_types,
        interaction_range=math.inf,
        length_unit=capabilities.length_unit,
        supported_devices=capabilities.supported_devices,
        dtype=capabilities.dtype,
    )
    extra = dict(metadata.extra)
    extra["symatomic:ecse"] = "global, " + ("O(3)" if inversion else "SO(3)")
    new_metadata = ModelMetadata(
        name=(metadata.name + " (ECSE)") if metadata.name else "ECSE-symmetrized model",
        description=(
            metadata.description
            + "\n\nExactly O(3)-symmetrized with global ECSE (symatomic)."
        ).strip(),
        authors=metadata.authors,
        references=metadata.references,
        extra=extra,
    )
    return AtomisticModel(wrapper.eval(), new_metadata, new_capabilities)
