"""The symatomic model: a backbone and one read-out per target, metatomic-facing.

Assembly and evaluation live here; the options are checked and resolved in
:mod:`symatomic.model_options`, the read-outs are :class:`symatomic.readout.TargetReadout`,
the output statistics are fitted by :mod:`symatomic.statistics`, and the SOAP backbone
adapter is :class:`symatomic.backbone.SOAPBackbone`.

:class:`SymatomicModel` has two entry points sharing the same kernels:

* :meth:`SymatomicModel.forward` takes ``metatomic.torch.System`` objects and returns
  ``metatensor.torch.TensorMap`` objects (the interface of metatomic models; this is
  what is exported and run by ASE, i-PI and LAMMPS);
* :meth:`SymatomicModel.predict` takes plain tensors (used by the trainer).

Every target is predicted as per-atom contributions ``(n_atoms, n_flat)`` (all blocks
of the target flattened), multiplied by a per-property scale and shifted by a
per-species composition baseline on its invariant (λ = 0, σ = +1) blocks; per-structure
values are sums over atoms.
"""

import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelCapabilities,
    ModelMetadata,
    ModelOutput,
    NeighborListOptions,
    System,
)

from .backbone import SOAPBackbone
from .basis import pair_directions
from .data.targets import TargetSpec
from .heads import pool_pairs
from .long_range import SystemGeometry, make_long_range
from .model_options import (
    SOAP_DEFAULT_HYPERS,
    check_model_hypers,
    is_exactly_equivariant,
    resolve_model_hypers,
    tensor_heads_of,
)
from .neighbors import reverse_pair_index, sort_pairs
from .o3 import SolidHarmonics, WignerD
from .pet import PET, PETFeatures, atoms_and_pairs
from .readout import TargetReadout, atom_features, basis_inputs
from .statistics import fit_output_statistics
from .uncertainty import derived_output_names

__all__ = [
    "SOAP_DEFAULT_HYPERS",
    "SOAPBackbone",
    "SymatomicModel",
    "TargetReadout",
    "check_model_hypers",
    "is_exactly_equivariant",
    "resolve_model_hypers",
    "tensor_heads_of",
]


class SymatomicModel(torch.nn.Module):
    """PET with one head per target, in metatomic's interface.

    :param hypers: the ``architecture.model`` section (PET hyper-parameters)
    :param atomic_types: atomic numbers the model handles
    :param targets: the targets to predict
    :param length_unit: length unit of positions
    """

    _keys: Dict[str, Labels]
    uncertainty_outputs: Dict[str, str]
    ensemble_outputs: Dict[str, str]
    last_layer_outputs: Dict[str, str]
    _components: Dict[str, List[List[Labels]]]
    _properties: Dict[str, List[Labels]]

    def __init__(
        self,
        hypers: Dict[str, Any],
        atomic_types: Sequence[int],
        targets: Dict[str, TargetSpec],
        length_unit: str = "angstrom",
    ):
        super().__init__()
        self.hypers = resolve_model_hypers(check_model_hypers(hypers), targets)
        self.atomic_types: List[int] = sorted(int(t) for t in atomic_types)
        if len(self.atomic_types) == 0 or len(set(self.atomic_types)) != len(
            self.atomic_types
        ):
            raise ValueError(
                f"atomic_types must be distinct and non-empty: {atomic_types}"
            )
        self.target_specs: Dict[str, TargetSpec] = dict(targets)
        self.length_unit = length_unit
        self.cutoff = float(self.hypers["cutoff"])
        # every GNN layer reaches one cutoff further: num_gnn_layers × cutoff, and
        # one cutoff more when the features the heads read combine each edge i → j
        # with its reverse j → i after the last layer (j's environment; models
        # before reverse_last_layer was an option did), checked by the
        # domain-decomposition test in tests/test_engines.py
        self.interaction_range = (
            float(self.hypers["num_gnn_layers"])
            + (1.0 if self.hypers["reverse_last_layer"] else 0.0)
        ) * self.cutoff
        if self.hypers["backbone"] == "soap":
            # atom features reach one cutoff, pair features (through h_j) two
            self.interaction_range = 2.0 * self.cutoff

        type_to_index = torch.full((max(self.atomic_types) + 1,), -1, dtype=torch.long)
        for index, atomic_type in enumerate(self.atomic_types):
            type_to_index[atomic_type] = index
        self.register_buffer("type_to_index", type_to_index)

        model_only = (
            "ecse",
            "backbone",
            "soap",
            "tensor_heads",
            "basis_hidden",
            "long_range",
        )
        # edge_inputs is resolved (invariant or cartesian): PET takes it
        pet_hypers = {k: v for k, v in self.hypers.items() if k not in model_only}
        ecse = self.hypers["ecse"]
        self.tensor_heads = tensor_heads_of(self.hypers)
        uses_basis = self.tensor_heads == "basis" and any(
            not spec.is_invariant for spec in targets.values()
        )
        if self.hypers["backbone"] == "soap":
            self.backbone = SOAPBackbone(self.hypers, len(self.atomic_types))
            d_node = int(self.hypers["soap"]["d_out"])
            d_edge = int(self.hypers["soap"]["d_pair"])
        else:
            self.backbone = PET(
                pet_hypers,
                len(self.atomic_types),
                ecse=ecse if ecse["mode"] == "local" else None,
            )
            self.backbone.invariant_features = uses_basis
            d_node = int(self.hypers["d_node"])
            d_edge = int(self.hypers["d_pet"])
        #: width of the ``feature`` output: atom features and pooled pair features
        self.feature_size = d_node + d_edge
        #: learned charges and their long-range potential, added to the atom
        #: features (:mod:`symatomic.long_range`); the model is then not local
        self.long_range = make_long_range(
            self.hypers["long_range"], d_node, self.cutoff
        )
        if self.long_range.enabled:
            self.interaction_range = math.inf
        self.exactly_equivariant = is_exactly_equivariant(self.hypers)
        max_lambda = max(
            [b.o3_lambda for s in targets.values() for b in s.blocks] + [0]
        )
        self.wigner = WignerD(max_lambda)
        self.readouts = torch.nn.ModuleDict(
            {
                name: TargetReadout(
                    spec, len(self.atomic_types), self.hypers, d_node, d_edge
                )
                for name, spec in targets.items()
            }
        )
        self.target_names: List[str] = list(targets.keys())
        #: output name → target, for the uncertainty, ensemble and last-layer
        #: feature outputs
        self.uncertainty_outputs = {}
        self.ensemble_outputs = {}
        self.last_layer_outputs = {}
        for name, readout in self.readouts.items():
            if not readout.has_last_layer:
                continue
            uncertainty, ensemble, last_layer = derived_output_names(name)
            self.uncertainty_outputs[uncertainty] = name
            self.ensemble_outputs[ensemble] = name
            self.last_layer_outputs[last_layer] = name
        # harmonics of the pair directions up to the largest λ of a scalar-basis head
        self.basis_harmonics = SolidHarmonics(
            max(
                [
                    head.o3_lambda
                    for readout in self.readouts.values()
                    for head in readout.basis_heads
                ]
                + [0]
            )
        )
        self.nl_options = NeighborListOptions(
            cutoff=self.cutoff, full_list=True, strict=True
        )

        # metadata of the outputs, used to build TensorMaps in ``forward``
        self._keys: Dict[str, Labels] = {}
        self._components: Dict[str, List[List[Labels]]] = {}
        self._properties: Dict[str, List[Labels]] = {}
        for name, spec in targets.items():
            layout = spec.layout()
            self._keys[name] = layout.keys
            self._components[name] = [block.components for block in layout.blocks()]
            self._properties[name] = [block.properties for block in layout.blocks()]

    # ------------------------------------------------------------------ kernels
    def species_index(self, types: torch.Tensor) -> torch.Tensor:
        """Map atomic numbers to species indices, raising on unknown types."""
        types = types.to(torch.long)
        if types.numel() > 0:
            if int(types.min()) < 0 or int(types.max()) >= self.type_to_index.shape[0]:
                raise ValueError(
                    "unknown atomic type(s) in the input; this model knows "
                    + str(self.atomic_types)
                )
        species = self.type_to_index.index_select(0, types)
        if bool(torch.any(species < 0)):
            unknown: List[int] = torch.unique(types[species < 0]).tolist()
            raise ValueError(
                "unknown atomic type(s) "
                + str(unknown)
                + " in the input; this model knows "
                + str(self.atomic_types)
            )
        return species

    def atomic_outputs(
        self,
        species: torch.Tensor,
        edge_vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        reverse: torch.Tensor,
        names: List[str],
        geometry: Optional[SystemGeometry] = None,
    ) -> Dict[str, torch.Tensor]:
        """Per-atom contributions of the requested targets.

        :param species: ``(n_atoms,)`` species indices
        :param edge_vectors: ``(n_pairs, 3)``, pairs sorted by center
        :param centers: ``(n_pairs,)``
        :param neighbors: ``(n_pairs,)``
        :param reverse: ``(n_pairs,)`` index of the reverse pair
        :param names: targets to compute
        :param geometry: positions and cells (models with a long-range part)
        :return: name → ``(n_atoms, n_flat)`` in the target's unit
        """
        atomic, _ = self.evaluate(
            species, edge_vectors, centers, neighbors, reverse, names, [], geometry
        )
        return atomic

    def evaluate(
        self,
        species: torch.Tensor,
        edge_vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        reverse: torch.Tensor,
        names: List[str],
        last_layer_names: List[str],
        geometry: Optional[SystemGeometry] = None,
        active: Optional[torch.Tensor] = None,
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[torch.Tensor]]]:
        """Per-atom contributions of the targets ``names`` (as
        :meth:`atomic_outputs`) and the per-atom last-layer features of the
        targets ``last_layer_names``: name → ``[z, Φ_block_0, Φ_block_1, …]`` of
        :meth:`symatomic.readout.TargetReadout.last_layer_features`, one backbone
        evaluation for both.

        :param geometry: positions and cells, needed by models with a long-range
            part (:mod:`symatomic.long_range`)
        :param active: ``(n_atoms,)`` bool, the atoms whose outputs are read (an
            engine's selected atoms), or ``None`` for all: the backbone then
            computes only what reaches them; the other atoms' outputs are not
            meaningful. Ignored with a long-range part (its charges need every
            atom's features).
        """
        if self.long_range.enabled:
            active = None
        features = self.backbone(
            species, edge_vectors, centers, neighbors, reverse, active
        )
        n_atoms = species.shape[0]
        if self.long_range.enabled:
            features = self._add_long_range(
                features, n_atoms, geometry, edge_vectors, centers, neighbors
            )
        n_total = n_atoms
        heads_atoms: Optional[torch.Tensor] = None
        if active is not None and not features.symmetrized:
            # the heads read the active atoms and their pairs only
            heads_atoms, features, species, edge_vectors = _heads_subset(
                active, features, species, edge_vectors
            )
            n_atoms = species.shape[0]
        wigner: List[torch.Tensor] = []
        improper = torch.zeros(0, dtype=torch.bool, device=species.device)
        if features.symmetrized:
            determinant = torch.linalg.det(features.rotations.detach())
            improper = determinant < 0
            sign = torch.where(improper, -1.0, 1.0).to(features.rotations.dtype)
            wigner = self.wigner(features.rotations * sign.reshape(-1, 1, 1))
        # shared by every scalar-basis head: the harmonics of the pair directions
        # and the pooled pair features of the coefficient heads
        uses_basis = False
        for name, readout in self.readouts.items():
            if (name in names or name in last_layer_names) and readout.uses_basis:
                uses_basis = True
        pair_harmonics: Optional[List[torch.Tensor]] = None
        pooled: Optional[torch.Tensor] = None
        if uses_basis:
            nodes, edges, fc, centers = basis_inputs(features)
            pooled = pool_pairs(nodes.shape[0], edges, fc, centers)
            pair_harmonics = self.basis_harmonics(pair_directions(edge_vectors))
        result: Dict[str, torch.Tensor] = {}
        if "feature" in names:
            result["feature"] = atom_features(features, n_atoms)
        last_layer: Dict[str, List[torch.Tensor]] = {}
        for name, readout in self.readouts.items():
            predicted = False
            if name in last_layer_names:
                z, per_block = readout.last_layer_features(
                    features,
                    n_atoms,
                    edge_vectors,
                    wigner,
                    improper,
                    pair_harmonics,
                    pooled,
                )
                last_layer[name] = [z] + per_block
                if name in names and not readout.uses_basis and readout.invariant:
                    # invariant direct heads are linear in z: no second pass
                    result[name] = readout.from_last_layer(z, species)
                    predicted = True
            if name in names and not predicted:
                result[name] = readout(
                    features,
                    species,
                    wigner,
                    improper,
                    edge_vectors,
                    pair_harmonics,
                    pooled,
                )
        if heads_atoms is not None:
            # every atom's rows, zero for the atoms whose outputs were not asked
            for name in list(result.keys()):
                result[name] = _scatter_rows(result[name], heads_atoms, n_total)
            for name in list(last_layer.keys()):
                last_layer[name] = [
                    _scatter_rows(values, heads_atoms, n_total)
                    for values in last_layer[name]
                ]
        return result, last_layer

    def _add_long_range(
        self,
        features: PETFeatures,
        n_atoms: int,
        geometry: Optional[SystemGeometry],
        edge_vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
    ) -> PETFeatures:
        """The backbone's features with the long-range features of every atom
        added to its atom features (to every frame's, with ECSE frames): charges
        from the invariant atom features, so that the symmetry is kept."""
        source = features.invariant_nodes
        if source is None:
            source = features.atom_nodes
        if source is None:
            if features.symmetrized:
                weighted = features.nodes * features.owner_weights.unsqueeze(1)
                source = torch.zeros(
                    n_atoms,
                    weighted.shape[1],
                    dtype=weighted.dtype,
                    device=weighted.device,
                ).index_add(0, features.owner_atoms, weighted)
            else:
                source = features.nodes
        extra = self.long_range(source, geometry, edge_vectors, centers, neighbors)
        if features.symmetrized:
            features.nodes = features.nodes + extra.index_select(
                0, features.owner_atoms
            )
        else:
            features.nodes = features.nodes + extra
        atom_nodes = features.atom_nodes
        if atom_nodes is not None:
            features.atom_nodes = atom_nodes + extra
        invariant_nodes = features.invariant_nodes
        if invariant_nodes is not None:
            features.invariant_nodes = invariant_nodes + extra
        return features

    def predict(
        self,
        species: torch.Tensor,
        edge_vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        reverse: torch.Tensor,
        system_index: torch.Tensor,
        n_systems: int,
        names: List[str],
        geometry: Optional[SystemGeometry] = None,
    ) -> Dict[str, List[torch.Tensor]]:
        """Predictions in the targets' own layout (pure tensors).

        :return: name → one tensor per block: ``(n_systems, 2λ+1, p)`` for
            per-structure targets, ``(n_atoms_of_block, 2λ+1, p)`` for per-atom targets
            (atoms in order; only atoms of the block's type for per-type blocks)
        """
        atomic = self.atomic_outputs(
            species, edge_vectors, centers, neighbors, reverse, names, geometry
        )
        result: Dict[str, List[torch.Tensor]] = {}
        for name, readout in self.readouts.items():
            if name in atomic:
                result[name] = self._samples_of_blocks(
                    readout,
                    readout.split_blocks(atomic[name]),
                    species,
                    system_index,
                    n_systems,
                )
        return result

    def predict_last_layer(
        self,
        species: torch.Tensor,
        edge_vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        reverse: torch.Tensor,
        system_index: torch.Tensor,
        n_systems: int,
        names: List[str],
        geometry: Optional[SystemGeometry] = None,
    ) -> Tuple[Dict[str, List[torch.Tensor]], Dict[str, List[torch.Tensor]]]:
        """Predictions (as :meth:`predict`) and, in the same layout, the
        last-layer features ``Φ`` of every block, ``(n_samples, 2λ+1, n_last)``
        (sums over a structure's atoms for per-structure targets); only targets
        whose read-out has last-layer features."""
        with_last_layer = [name for name in names if self.readouts[name].has_last_layer]
        atomic, last_layer = self.evaluate(
            species,
            edge_vectors,
            centers,
            neighbors,
            reverse,
            names,
            with_last_layer,
            geometry,
        )
        predictions: Dict[str, List[torch.Tensor]] = {}
        features: Dict[str, List[torch.Tensor]] = {}
        for name in names:
            readout = self.readouts[name]
            predictions[name] = self._samples_of_blocks(
                readout,
                readout.split_blocks(atomic[name]),
                species,
                system_index,
                n_systems,
            )
            if name in last_layer:
                features[name] = self._samples_of_blocks(
                    readout, last_layer[name][1:], species, system_index, n_systems
                )
        return predictions, features

    def _samples_of_blocks(
        self,
        readout: TargetReadout,
        blocks: List[torch.Tensor],
        species: torch.Tensor,
        system_index: torch.Tensor,
        n_systems: int,
    ) -> List[torch.Tensor]:
        """Per-atom blocks ``(n_atoms, c, q)`` → the target's samples: the atoms
        of each block's type for per-atom targets, sums per structure else."""
        selected: List[torch.Tensor] = []
        for block, atom_type in zip(blocks, readout.block_atom_types):
            if readout.per_atom:
                if atom_type >= 0:
                    mask = species == int(self.type_to_index[atom_type])
                    block = block[mask]
                selected.append(block)
            else:
                selected.append(
                    torch.zeros(
                        [n_systems] + list(block.shape[1:]),
                        dtype=block.dtype,
                        device=block.device,
                    ).index_add(0, system_index, block)
                )
        return selected

    # ------------------------------------------------------------- metatomic API
    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        """The full, strict neighbor list within the cutoff (metatomic protocol)."""
        return [self.nl_options]

    def forward(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        selected_atoms: Optional[Labels] = None,
    ) -> Dict[str, TensorMap]:
        """Evaluate the model in metatomic's interface.

        Outputs are computed for every requested target; ``sample_kind="system"`` sums
        per-atom contributions over the (selected) atoms of each system.
        """
        fitted = self.uncertainties_fitted()
        targets_needed: List[str] = []
        last_layer_needed: List[str] = []
        for name in outputs.keys():
            if name in self.target_names or name == "feature":
                targets_needed.append(name)
            elif name in self.last_layer_outputs:
                last_layer_needed.append(self.last_layer_outputs[name])
            elif fitted and name in self.uncertainty_outputs:
                last_layer_needed.append(self.uncertainty_outputs[name])
            elif fitted and name in self.ensemble_outputs:
                last_layer_needed.append(self.ensemble_outputs[name])
                targets_needed.append(self.ensemble_outputs[name])
            else:
                raise ValueError(
                    "this model can not compute '"
                    + name
                    + "'; it computes "
                    + str(self.output_names())
                )
        if len(systems) == 0:
            raise ValueError("no systems given")
        device = systems[0].positions.device
        types: List[torch.Tensor] = []
        system_index: List[torch.Tensor] = []
        centers: List[torch.Tensor] = []
        neighbors: List[torch.Tensor] = []
        shifts: List[torch.Tensor] = []
        vectors: List[torch.Tensor] = []
        positions: List[torch.Tensor] = []
        cells: List[torch.Tensor] = []
        periodic: List[torch.Tensor] = []
        offset = 0
        for index, system in enumerate(systems):
            positions.append(system.positions)
            cells.append(system.cell)
            periodic.append(system.pbc)
            n_atoms = system.positions.shape[0]
            types.append(system.types)
            system_index.append(
                torch.full((n_atoms,), index, dtype=torch.long, device=device)
            )
            pairs = system.get_neighbor_list(self.nl_options)
            samples = pairs.samples.values.to(torch.long)
            centers.append(samples[:, 0] + offset)
            neighbors.append(samples[:, 1] + offset)
            shifts.append(samples[:, 2:5])
            # r_j - r_i + S·cell from the positions (not the list's stored vectors),
            # so that gradients do not depend on how the list's values were built
            # (they may belong to an autograd graph already used and freed)
            vectors.append(
                system.positions.index_select(0, samples[:, 1])
                - system.positions.index_select(0, samples[:, 0])
                + samples[:, 2:5].to(system.positions.dtype) @ system.cell
            )
            offset += n_atoms
        all_types = torch.cat(types)
        species = self.species_index(all_types)
        all_system_index = torch.cat(system_index)
        all_centers = torch.cat(centers)
        all_neighbors = torch.cat(neighbors)
        all_shifts = torch.cat(shifts)
        all_vectors = torch.cat(vectors)
        n_total = int(all_types.shape[0])

        distances = torch.linalg.vector_norm(all_vectors.detach(), dim=1)
        keep = distances < self.cutoff
        if not bool(torch.all(keep)):
            all_centers = all_centers[keep]
            all_neighbors = all_neighbors[keep]
            all_shifts = all_shifts[keep]
            all_vectors = all_vectors[keep]
        order = sort_pairs(all_centers, all_neighbors, n_total)
        all_centers = all_centers[order]
        all_neighbors = all_neighbors[order]
        all_shifts = all_shifts[order]
        all_vectors = all_vectors[order]
        reverse = reverse_pair_index(all_centers, all_neighbors, all_shifts, n_total)
        geometry: Optional[SystemGeometry] = None
        if self.long_range.enabled:
            geometry = SystemGeometry(
                torch.cat(positions),
                torch.stack(cells),
                torch.stack(periodic),
                all_system_index,
            )

        # first atom of every system, and index of every atom in its system
        starts = torch.cat(
            [
                torch.zeros(1, dtype=torch.long, device=device),
                torch.cumsum(
                    torch.bincount(all_system_index, minlength=len(systems)), 0
                ),
            ]
        )
        atom_in_system = torch.arange(n_total, device=device) - starts.index_select(
            0, all_system_index
        )
        selected = torch.ones(n_total, dtype=torch.bool, device=device)
        active: Optional[torch.Tensor] = None
        if selected_atoms is not None:
            selected = torch.zeros(n_total, dtype=torch.bool, device=device)
            system_column = selected_atoms.column("system").to(torch.long)
            atom_column = selected_atoms.column("atom").to(torch.long)
            selected[starts.index_select(0, system_column) + atom_column] = True
            active = selected

        atomic, last_layer = self.evaluate(
            species,
            all_vectors,
            all_centers,
            all_neighbors,
            reverse,
            targets_needed,
            last_layer_needed,
            geometry,
            active,
        )

        result: Dict[str, TensorMap] = {}
        for name, readout in self.readouts.items():
            if name in outputs:
                values = atomic[name]
                per_atom_request = outputs[name].sample_kind == "atom"
                blocks: List[TensorBlock] = []
                flat_blocks = readout.split_blocks(values)
                for block_index in range(len(flat_blocks)):
                    block_values = flat_blocks[block_index]
                    atom_type = readout.block_atom_types[block_index]
                    mask = selected
                    if atom_type >= 0:
                        mask = mask & (all_types.to(torch.long) == atom_type)
                    block_values, samples = _per_atom_or_summed(
                        block_values,
                        mask,
                        per_atom_request,
                        all_system_index,
                        atom_in_system,
                        len(systems),
                    )
                    components = [
                        c.to(device) for c in self._components[name][block_index]
                    ]
                    if readout.is_scalar:
                        block_values = block_values.reshape(block_values.shape[0], -1)
                    blocks.append(
                        TensorBlock(
                            values=block_values,
                            samples=samples,
                            components=components,
                            properties=self._properties[name][block_index].to(device),
                        )
                    )
                result[name] = TensorMap(self._keys[name].to(device), blocks)
        if "feature" in atomic:
            feature_values, samples = _per_atom_or_summed(
                atomic["feature"].unsqueeze(1),
                selected,
                outputs["feature"].sample_kind == "atom",
                all_system_index,
                atom_in_system,
                len(systems),
            )
            width = feature_values.shape[2]
            properties = Labels(
                ["feature"],
                torch.arange(width, dtype=torch.int32, device=device).reshape(-1, 1),
            )
            feature_block = TensorBlock(
                values=feature_values.reshape(-1, width),
                samples=samples,
                components=[],
                properties=properties,
            )
            result["feature"] = TensorMap(
                Labels(["_"], torch.zeros(1, 1, dtype=torch.int32, device=device)),
                [feature_block],
            )
        for name in outputs.keys():
            if (
                name in self.uncertainty_outputs
                or name in self.ensemble_outputs
                or name in self.last_layer_outputs
            ):
                result[name] = self._derived_output(
                    name,
                    outputs[name].sample_kind == "atom",
                    atomic,
                    last_layer,
                    selected,
                    all_types,
                    all_system_index,
                    atom_in_system,
                    len(systems),
                )
        return result

    def _derived_output(
        self,
        name: str,
        per_atom: bool,
        atomic: Dict[str, torch.Tensor],
        last_layer: Dict[str, List[torch.Tensor]],
        selected: torch.Tensor,
        types: torch.Tensor,
        system_index: torch.Tensor,
        atom_in_system: torch.Tensor,
        n_systems: int,
    ) -> TensorMap:
        """The uncertainty, ensemble or last-layer features output ``name``."""
        device = selected.device
        if name in self.last_layer_outputs:
            z = last_layer[self.last_layer_outputs[name]][0]
            values, samples = _per_atom_or_summed(
                z.unsqueeze(1),
                selected,
                per_atom,
                system_index,
                atom_in_system,
                n_systems,
            )
            width = values.shape[2]
            block = TensorBlock(
                values=values.reshape(-1, width),
                samples=samples,
                components=[],
                properties=Labels(
                    ["feature"],
                    torch.arange(width, dtype=torch.int32, device=device).reshape(
                        -1, 1
                    ),
                ),
            )
            return TensorMap(
                Labels(["_"], torch.zeros(1, 1, dtype=torch.int32, device=device)),
                [block],
            )
        is_ensemble = name in self.ensemble_outputs
        target = self.ensemble_outputs[name] if is_ensemble else ""
        if not is_ensemble:
            target = self.uncertainty_outputs[name]
        blocks: List[TensorBlock] = []
        for target_name, readout in self.readouts.items():
            if target_name == target:
                phi_blocks = last_layer[target][1:]
                predictions: List[torch.Tensor] = []
                if is_ensemble:
                    predictions = readout.split_blocks(atomic[target])
                for block_index, uncertainty in enumerate(readout.uncertainty):
                    atom_type = readout.block_atom_types[block_index]
                    mask = selected
                    if atom_type >= 0:
                        mask = mask & (types.to(torch.long) == atom_type)
                    phi, samples = _per_atom_or_summed(
                        phi_blocks[block_index],
                        mask,
                        per_atom,
                        system_index,
                        atom_in_system,
                        n_systems,
                    )
                    properties = self._properties[target][block_index].to(device)
                    if not is_ensemble:
                        blocks.append(
                            TensorBlock(
                                values=uncertainty(phi),
                                samples=samples,
                                components=[],
                                properties=properties,
                            )
                        )
                    else:
                        prediction, _ = _per_atom_or_summed(
                            predictions[block_index],
                            mask,
                            per_atom,
                            system_index,
                            atom_in_system,
                            n_systems,
                        )
                        members = uncertainty.ensemble(phi, prediction)
                        n_members = members.shape[2]
                        member_index = torch.arange(
                            n_members, dtype=torch.int32, device=device
                        ).repeat_interleave(properties.values.shape[0])
                        if name == "energy_ensemble":
                            member_properties = Labels(
                                ["energy"], member_index.reshape(-1, 1)
                            )
                        else:
                            member_properties = Labels(
                                ["ensemble_member"] + properties.names,
                                torch.cat(
                                    [
                                        member_index.reshape(-1, 1),
                                        properties.values.repeat(n_members, 1),
                                    ],
                                    dim=1,
                                ),
                            )
                        components = [
                            c.to(device) for c in self._components[target][block_index]
                        ]
                        values = members.reshape(members.shape[0], members.shape[1], -1)
                        if readout.is_scalar:
                            values = values.reshape(values.shape[0], -1)
                        blocks.append(
                            TensorBlock(
                                values=values,
                                samples=samples,
                                components=components,
                                properties=member_properties,
                            )
                        )
        return TensorMap(self._keys[target].to(device), blocks)

    @torch.jit.export
    def uncertainties_fitted(self) -> bool:
        """Whether every uncertainty block is calibrated (at least one exists)."""
        fitted = len(self.uncertainty_outputs) > 0
        for readout in self.readouts.values():
            for block in readout.uncertainty:
                if not block.is_fitted():
                    fitted = False
        return fitted

    @torch.jit.export
    def output_names(self) -> List[str]:
        """Every output this model computes (uncertainties and ensembles once
        calibrated)."""
        names = self.target_names + ["feature"]
        names = names + list(self.last_layer_outputs.keys())
        if self.uncertainties_fitted():
            names = names + list(self.uncertainty_outputs.keys())
            names = names + list(self.ensemble_outputs.keys())
        return names

    # --------------------------------------------------------------- statistics
    def fit_output_statistics(
        self, structures: Sequence[Any]
    ) -> Dict[str, List[float]]:
        """:func:`symatomic.statistics.fit_output_statistics` of this model."""
        return fit_output_statistics(self, structures)

    def start_heads_small(self, names: Optional[List[str]] = None) -> None:
        """Before training: shrink the last layers of the heads of ``names`` (all
        targets by default) to :data:`~symatomic.heads.LAST_LAYER_INIT` of their
        initialization, biases zero. With the pair sums divided by the average
        number of neighbors (:func:`fit_output_statistics`), the untrained model
        then predicts about its composition baselines, in a dense liquid as in a
        small molecule, and the first steps do not spend themselves on a random
        offset of ~1 eV per atom. (Models built for tests of symmetry or
        smoothness keep PyTorch's initialization: their outputs are not small.)"""
        for name, readout in self.readouts.items():
            if names is None or name in names:
                readout.head.start_small()

    # ------------------------------------------------------------------ export
    def capabilities(self) -> ModelCapabilities:
        """The metatomic capabilities of this model (outputs, types, range, units)."""
        outputs: Dict[str, ModelOutput] = {}
        for name, spec in self.target_specs.items():
            outputs[name] = ModelOutput(
                unit=spec.unit,
                sample_kind="atom",
                description=spec.description or _describe_target(spec),
            )
        outputs["feature"] = ModelOutput(
            unit="",
            sample_kind="atom",
            description="the backbone's last atom features and their pooled pair "
            "features ("
            + str(self.feature_size)
            + " per atom; per structure: their sum), exactly invariant when the "
            "model is exact",
        )
        fitted = self.uncertainties_fitted()
        for output, target in self.last_layer_outputs.items():
            outputs[output] = ModelOutput(
                unit="",
                sample_kind="atom",
                description="invariant last-layer features of '" + target + "'",
            )
        if fitted:
            for output, target in self.uncertainty_outputs.items():
                outputs[output] = ModelOutput(
                    unit=self.target_specs[target].unit,
                    sample_kind="atom",
                    description="calibrated last-layer uncertainty of '"
                    + target
                    + "': per sample and property, the root-mean-square standard "
                    "deviation of a block's components (exactly invariant)",
                )
            for output, target in self.ensemble_outputs.items():
                outputs[output] = ModelOutput(
                    unit=self.target_specs[target].unit,
                    sample_kind="atom",
                    description="last-layer ensemble of '"
                    + target
                    + "' (members equivariant like the target)",
                )
        dtype = next(self.parameters()).dtype
        return ModelCapabilities(
            outputs=outputs,
            atomic_types=self.atomic_types,
            interaction_range=self.interaction_range,
            length_unit=self.length_unit,
            supported_devices=["cpu", "cuda"],
            dtype="float64" if dtype == torch.float64 else "float32",
        )

    def export(self, metadata: Optional[ModelMetadata] = None) -> AtomisticModel:
        """Wrap this model in a :class:`metatomic.torch.AtomisticModel`.

        The target descriptions (reading keys, blocks, units) are stored in the
        metadata's ``extra`` under ``symatomic:targets``, so that ``symatomic eval``
        can find reference values in a data file.
        """
        extra = {
            "symatomic:targets": json.dumps(
                {name: spec.to_dict() for name, spec in self.target_specs.items()}
            )
        }
        if metadata is None:
            metadata = ModelMetadata(
                name="symatomic PET",
                description="PET model trained with symatomic",
                references={
                    "architecture": ["https://arxiv.org/abs/2305.19302"],
                    "implementation": ["https://github.com/symatomic/symatomic"],
                },
                extra=extra,
            )
        else:
            merged = dict(metadata.extra)
            merged.update(extra)
            metadata = ModelMetadata(
                name=metadata.name,
                description=metadata.description,
                authors=metadata.authors,
                references=metadata.references,
                extra=merged,
            )
        model = self.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return AtomisticModel(model, metadata, self.capabilities())

    # -------------------------------------------------------------- checkpoints
    def model_data(self) -> Dict[str, Any]:
        """Everything needed to rebuild this model (without its weights)."""
        return {
            "hypers": dict(self.hypers),
            "atomic_types": list(self.atomic_types),
            "targets": {
                name: spec.to_dict() for name, spec in self.target_specs.items()
            },
            "length_unit": self.length_unit,
        }

    @staticmethod
    def from_model_data(data: Dict[str, Any]) -> "SymatomicModel":
        targets = {
            name: TargetSpec.from_dict(spec) for name, spec in data["targets"].items()
        }
        return SymatomicModel(
            data["hypers"], data["atomic_types"], targets, data["length_unit"]
        )


def _describe_target(spec: TargetSpec) -> str:
    blocks = ", ".join(
        f"(o3_lambda={b.o3_lambda}, o3_sigma={b.o3_sigma})" for b in spec.blocks
    )
    if spec.kind == "cartesian":
        return f"Cartesian rank-{spec.rank} tensor as spherical blocks {blocks}"
    if spec.kind == "spherical":
        return f"spherical tensor with blocks {blocks}"
    return "scalar"


def _per_atom_or_summed(
    values: torch.Tensor,
    mask: torch.Tensor,
    per_atom: bool,
    system_index: torch.Tensor,
    atom_in_system: torch.Tensor,
    n_systems: int,
) -> Tuple[torch.Tensor, Labels]:
    """The values ``(n_atoms, c, p)`` of the atoms in ``mask`` with their
    ``(system, atom)`` samples, or their sums per system with ``(system,)``
    samples."""
    device = values.device
    if per_atom:
        sample_values = torch.stack(
            [system_index[mask], atom_in_system[mask]], dim=1
        ).to(torch.int32)
        return values[mask], Labels(["system", "atom"], sample_values)
    masked = values * mask.to(values.dtype).reshape(-1, 1, 1)
    summed = torch.zeros(
        [n_systems, values.shape[1], values.shape[2]],
        dtype=values.dtype,
        device=device,
    ).index_add(0, system_index, masked)
    samples = Labels(
        ["system"],
        torch.arange(n_systems, dtype=torch.int32, device=device).reshape(-1, 1),
    )
    return summed, samples


def _heads_subset(
    active: torch.Tensor,
    features: PETFeatures,
    species: torch.Tensor,
    edge_vectors: torch.Tensor,
) -> Tuple[torch.Tensor, PETFeatures, torch.Tensor, torch.Tensor]:
    """The active atoms (``(n_active,)`` indices) and the features, species and
    pair vectors of them and of their pairs, pairs renumbered among them (a
    backbone without frames: atoms own their features)."""
    atoms, pairs, local_centers = atoms_and_pairs(active, features.edge_owners)
    subset = PETFeatures(
        features.nodes.index_select(0, atoms),
        features.edges.index_select(0, pairs),
        features.fc.index_select(0, pairs),
        local_centers,
        torch.arange(atoms.shape[0], device=species.device),
        features.owner_weights.index_select(0, atoms),
        features.rotations.index_select(0, atoms),
        features.is_aux.index_select(0, atoms),
        False,
    )
    return (
        atoms,
        subset,
        species.index_select(0, atoms),
        edge_vectors.index_select(0, pairs),
    )


def _scatter_rows(
    values: torch.Tensor, rows: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """``values`` (one row per entry of ``rows``) in ``n_rows`` rows, zero
    elsewhere."""
    shape = [n_rows] + list(values.shape[1:])
    return torch.zeros(shape, dtype=values.dtype, device=values.device).index_copy(
        0, rows, values
    )
