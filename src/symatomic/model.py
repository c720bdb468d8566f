"""The symatomic model: PET backbone, heads, baselines and scaling, metatomic-facing.

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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
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

from .basis import ScalarBasisHead, pair_directions
from .data.targets import TargetSpec
from .ecse import check_ecse_options
from .heads import DirectHead, PooledHead, pool_pairs
from .neighbors import reverse_pair_index, sort_pairs
from .o3 import SolidHarmonics, WignerD
from .pet import PET, PETFeatures, check_pet_hypers
from .soap import InvariantScalarModel

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

#: defaults of ``architecture.model.soap`` (the invariant SOAP backbone)
SOAP_DEFAULT_HYPERS: Dict[str, Any] = {
    "max_radial": 6,
    "max_angular": 4,
    "n_pseudo_species": 4,
    "d_hidden": 128,
    "n_hidden_layers": 2,
    "d_out": 128,
    "d_pair": 32,
}

_BACKBONES = ("auto", "pet", "soap")
_TENSOR_HEADS = ("direct", "basis")
_EDGE_INPUTS = ("auto", "invariant", "cartesian")


def _check_soap_hypers(options: Any, where: str) -> Dict[str, Any]:
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ValueError(f"{where} must be a mapping, got {options!r}")
    unknown = sorted(set(options) - set(SOAP_DEFAULT_HYPERS))
    if unknown:
        raise ValueError(
            f"{where}: unknown option(s) {unknown}; known: {sorted(SOAP_DEFAULT_HYPERS)}"
        )
    result = dict(SOAP_DEFAULT_HYPERS)
    result.update(options)
    for key, value in result.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}.{key} must be an integer, got {value!r}")
        minimum = 0 if key in ("max_angular", "max_radial") else 1
        if value < minimum:
            raise ValueError(f"{where}.{key} must be at least {minimum}, got {value}")
    return result


def check_model_hypers(
    hypers: Dict[str, Any], where: str = "architecture.model"
) -> Dict[str, Any]:
    """Validate the ``architecture.model`` section and fill its defaults.

    ``backbone`` is ``pet`` (default) or ``soap`` (an exactly invariant SOAP power
    spectrum with an MLP, options in ``soap``); ``tensor_heads`` is ``direct``
    (components predicted by the backbone's heads: exact with ECSE, approximate
    without) or ``basis`` (invariant coefficients times a basis of (λ, σ) tensors,
    :mod:`symatomic.basis`); ``basis_hidden`` is the hidden size of the basis' pair
    MLPs; ``ecse`` selects the exact symmetrization of PET
    (:func:`symatomic.ecse.check_ecse_options`). Everything else are PET
    hyper-parameters (``cutoff`` and ``cutoff_width`` are shared with SOAP).
    """
    hypers = dict(hypers)
    ecse = check_ecse_options(hypers.pop("ecse", None), where + ".ecse")
    backbone = hypers.pop("backbone", "auto")
    if backbone not in _BACKBONES:
        raise ValueError(
            f"{where}.backbone must be one of {_BACKBONES}, got {backbone!r}"
        )
    soap = _check_soap_hypers(hypers.pop("soap", None), where + ".soap")
    tensor_heads = hypers.pop("tensor_heads", None)
    if tensor_heads is not None and tensor_heads not in _TENSOR_HEADS:
        raise ValueError(
            f"{where}.tensor_heads must be one of {_TENSOR_HEADS} (or null: what the "
            f"backbone can do), got {tensor_heads!r}"
        )
    if backbone == "soap" and tensor_heads == "direct":
        raise ValueError(
            f"{where}: the soap backbone is invariant, its tensor outputs need "
            "tensor_heads: basis"
        )
    if backbone == "soap" and ecse["mode"] == "local":
        raise ValueError(
            f"{where}: ecse applies to the pet backbone; the soap backbone is exactly "
            "invariant already"
        )
    edge_inputs = hypers.pop("edge_inputs", "auto")
    if edge_inputs not in _EDGE_INPUTS:
        raise ValueError(
            f"{where}.edge_inputs must be one of {_EDGE_INPUTS}, got {edge_inputs!r}"
        )
    if edge_inputs == "invariant" and ecse["mode"] == "local":
        raise ValueError(
            f"{where}: ecse frames need edge_inputs: cartesian (with edge_inputs: "
            "invariant, PET is exactly invariant without frames)"
        )
    if edge_inputs == "invariant" and tensor_heads == "direct":
        raise ValueError(
            f"{where}: with edge_inputs: invariant, tensor outputs need "
            "tensor_heads: basis (direct heads of an invariant PET are invariant)"
        )
    basis_hidden = hypers.pop("basis_hidden", 0)
    if isinstance(basis_hidden, bool) or not isinstance(basis_hidden, int):
        raise ValueError(
            f"{where}.basis_hidden must be an integer, got {basis_hidden!r}"
        )
    if basis_hidden < 0:
        raise ValueError(f"{where}.basis_hidden must be >= 0, got {basis_hidden}")
    result = check_pet_hypers(hypers, where)
    result["edge_inputs"] = edge_inputs
    result["ecse"] = ecse
    result["backbone"] = backbone
    result["soap"] = soap
    result["tensor_heads"] = tensor_heads
    result["basis_hidden"] = basis_hidden
    return result


def tensor_heads_of(hypers: Dict[str, Any]) -> str:
    """The tensor heads of a model: ``tensor_heads``, or ``basis`` when it is
    ``None`` (the default: measured more accurate than ``direct`` on the dipoles and
    hyperpolarizabilities of the reference data, and cheaper; see
    ``benchmarks/tensor_accuracy.py`` and ``benchmarks/tensor_heads_cost.py``)."""
    choice = hypers.get("tensor_heads")
    if choice is None:
        return "basis"
    return str(choice)


def resolve_model_hypers(
    hypers: Dict[str, Any], targets: Dict[str, TargetSpec]
) -> Dict[str, Any]:
    """Replace the ``auto`` choices of checked hyper-parameters by what works best
    for these targets (measured: ``benchmarks/tensor_accuracy.py``,
    ``benchmarks/pet_accuracy.py``, ``benchmarks/ecse_accuracy.py``):

    - ``backbone: auto`` → ``pet`` for every kind of target: PET is the more
      accurate energy model, and with ECSE-averaged coefficients and the scalar
      basis it was also the most accurate exact model on 9 of the 13 tensor targets
      of the water monomer, water dimer and QM7-X reference data, and ahead of
      metatrain's SOAP-BPNN and PET on all 13 (the SOAP backbone, 4-13x cheaper to
      train and ~50x cheaper to evaluate, is a little less accurate;
      ``docs/heads.rst``);
    - ``ecse.mode: auto`` → ``local`` with ``frame_layers: 1`` (unless given) for
      PET, ``none`` for SOAP.

    Either way the model is exactly O(3)-equivariant; ``backbone: pet`` with
    ``ecse: none`` is the approximately equivariant model one opts into.
    """
    result = dict(hypers)
    ecse = dict(result["ecse"])
    if result["backbone"] == "auto":
        result["backbone"] = "pet"
    if result.get("edge_inputs", "auto") == "auto":
        # an explicit ecse mode asks for PET's Cartesian inputs (frames, or the
        # unconstrained PET one opts into); otherwise invariant inputs
        result["edge_inputs"] = "invariant" if ecse["mode"] == "auto" else "cartesian"
    if result["backbone"] == "soap":
        result["edge_inputs"] = "cartesian"
    if result["edge_inputs"] == "invariant":
        if ecse["mode"] == "local":
            raise ValueError(
                "ecse frames need edge_inputs: cartesian; with edge_inputs: "
                "invariant PET is exactly invariant without frames"
            )
        ecse["mode"] = "none"
    if ecse["mode"] == "auto":
        if result["backbone"] == "pet":
            ecse["mode"] = "local"
            if ecse["frame_layers"] is None:
                ecse["frame_layers"] = 1
        else:
            ecse["mode"] = "none"
    if result["backbone"] == "soap" and ecse["mode"] == "local":
        raise ValueError(
            "ecse applies to the pet backbone; the soap backbone is exactly "
            "invariant already"
        )
    result["ecse"] = ecse
    result["tensor_heads"] = tensor_heads_of(result)
    return result


def is_exactly_equivariant(hypers: Dict[str, Any]) -> bool:
    """Whether a model with these (checked) hyper-parameters is exactly
    O(3)-equivariant in every output: the SOAP backbone, or PET with ECSE."""
    return (
        hypers["backbone"] == "soap"
        or hypers["ecse"]["mode"] != "none"
        or hypers.get("edge_inputs") == "invariant"
    )


class SOAPBackbone(torch.nn.Module):
    """The invariant SOAP model (:class:`symatomic.soap.InvariantScalarModel`) in the
    backbone interface: atoms own their features, there are no frames.

    :param hypers: checked model hyper-parameters (``cutoff``, ``cutoff_width``,
        ``soap``)
    :param n_species: number of atomic types
    """

    def __init__(self, hypers: Dict[str, Any], n_species: int):
        super().__init__()
        soap = hypers["soap"]
        self.model = InvariantScalarModel(
            n_species,
            float(hypers["cutoff"]),
            float(hypers["cutoff_width"]),
            max_radial=int(soap["max_radial"]),
            max_angular=int(soap["max_angular"]),
            n_pseudo_species=int(soap["n_pseudo_species"]),
            d_hidden=int(soap["d_hidden"]),
            n_hidden_layers=int(soap["n_hidden_layers"]),
            d_out=int(soap["d_out"]),
            d_pair=int(soap["d_pair"]),
        )
        self.symmetrized = False

    def forward(
        self,
        species: torch.Tensor,
        edge_vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        reverse: torch.Tensor,
    ) -> PETFeatures:
        """Same arguments as :meth:`symatomic.pet.PET.forward`; the features are
        exactly invariant."""
        n_atoms = species.shape[0]
        atoms, pairs, fc = self.model(species, edge_vectors, centers, neighbors)
        return PETFeatures(
            atoms,
            pairs,
            fc,
            centers,
            torch.arange(n_atoms, device=species.device),
            torch.ones(n_atoms, dtype=fc.dtype, device=fc.device),
            torch.eye(3, dtype=fc.dtype, device=fc.device).expand(n_atoms, 3, 3),
            torch.zeros(n_atoms, dtype=torch.bool, device=fc.device),
            False,
        )


def basis_inputs(
    features: PETFeatures,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(nodes, edges, fc, centers)`` on which the scalar-basis heads are built:
    ECSE's invariant frame averages when the backbone has frames, else the atoms' own
    features (SOAP: invariant; plain PET: not)."""
    nodes = features.invariant_nodes
    edges = features.invariant_edges
    fc = features.atom_fc
    centers = features.centers
    if nodes is None or edges is None or fc is None or centers is None:
        return features.nodes, features.edges, features.fc, features.edge_owners
    return nodes, edges, fc, centers


class TargetReadout(torch.nn.Module):
    """Head and output transformation (scale, composition baseline) of one target.

    Covariant targets with ``tensor_heads: basis`` are predicted as invariant
    coefficients (a :class:`~symatomic.heads.DirectHead` on invariant features: the
    SOAP backbone's, ECSE's frame averages, or plain PET's, which are only
    approximately invariant) times the tensor basis of every block
    (:class:`symatomic.basis.ScalarBasisHead`).

    :param spec: the target
    :param n_species: number of atomic types of the model
    :param hypers: model hyper-parameters
    :param d_node: size of the atom features of the backbone
    :param d_edge: size of the pair features of the backbone
    """

    coefficient_sizes: List[int]

    def __init__(
        self,
        spec: TargetSpec,
        n_species: int,
        hypers: Dict[str, Any],
        d_node: int = -1,
        d_edge: int = -1,
    ):
        super().__init__()
        if d_node < 0:
            d_node = int(hypers["d_node"])
        if d_edge < 0:
            d_edge = int(hypers["d_pet"])
        self.per_atom = spec.per_atom
        self.is_scalar = spec.is_scalar
        self.block_components: List[int] = [b.num_components for b in spec.blocks]
        self.block_properties: List[int] = [b.num_properties for b in spec.blocks]
        self.block_sizes: List[int] = [
            b.num_components * b.num_properties for b in spec.blocks
        ]
        self.block_atom_types: List[int] = [
            -1 if b.atom_type is None else int(b.atom_type) for b in spec.blocks
        ]
        self.block_lambdas: List[int] = [b.o3_lambda for b in spec.blocks]
        self.block_sigmas: List[int] = [b.o3_sigma for b in spec.blocks]
        self.invariant = spec.is_invariant
        n_flat = sum(self.block_sizes)
        basis_heads: List[ScalarBasisHead] = []
        if tensor_heads_of(hypers) == "basis" and not self.invariant:
            for block in spec.blocks:
                basis_heads.append(
                    ScalarBasisHead(
                        block.o3_lambda,
                        block.o3_sigma,
                        block.num_properties,
                        d_edge,
                        d_hidden=int(hypers.get("basis_hidden", 0)),
                    )
                )
        self.basis_heads = torch.nn.ModuleList(basis_heads)
        self.uses_basis = len(basis_heads) > 0
        self.coefficient_sizes: List[int] = [h.n_coefficients for h in basis_heads]
        if self.uses_basis:
            self.head = PooledHead(
                d_node, d_edge, int(hypers["d_head"]), sum(self.coefficient_sizes)
            )
        else:
            self.head = DirectHead(d_node, d_edge, int(hypers["d_head"]), n_flat)
        self.register_buffer("scale", torch.ones(n_flat))
        self.register_buffer("baseline", torch.zeros(n_species, n_flat))

    def forward(
        self,
        features: PETFeatures,
        species: torch.Tensor,
        wigner: List[torch.Tensor],
        improper: torch.Tensor,
        edge_vectors: torch.Tensor,
        pair_harmonics: Optional[List[torch.Tensor]] = None,
        pooled: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Per-atom contributions ``(n_atoms, n_flat)`` in the target's unit.

        With ECSE, the head runs on every frame's features; block ``(λ, σ)`` of
        each frame is rotated back with ``D^λ`` of the frame (times ``σ (-1)^λ``
        for mirrored frames) and averaged with the frame weights; the invariant
        fallback only contributes to proper scalars.

        :param wigner: ``D^λ`` of the proper part of every owner's frame, per λ
        :param improper: ``(n_owners,)`` whether each owner's frame is improper
        :param edge_vectors: ``(n_pairs, 3)`` pair vectors (the scalar basis)
        :param pair_harmonics: optional ``Y^l(r̂_ij)``, ``l = 0 …`` at least the
            largest λ of the target, of :func:`symatomic.basis.pair_directions`
        :param pooled: optional :func:`symatomic.heads.pool_pairs` of the
            :func:`basis_inputs` of ``features``
        """
        if self.uses_basis:
            return self._basis_forward(
                features, species, edge_vectors, pair_harmonics, pooled
            )
        atom_nodes = features.atom_nodes
        atom_edges = features.atom_edges
        atom_fc = features.atom_fc
        centers = features.centers
        if (
            self.invariant
            and atom_nodes is not None
            and atom_edges is not None
            and atom_fc is not None
            and centers is not None
        ):
            raw = self.head(atom_nodes, atom_edges, atom_fc, centers)
            return raw * self.scale + self.baseline.index_select(0, species)
        raw = self.head(
            features.nodes, features.edges, features.fc, features.edge_owners
        )
        if features.symmetrized:
            blocks = self.split_blocks(raw)
            rotated: List[torch.Tensor] = []
            for block, o3_lambda, o3_sigma in zip(
                blocks, self.block_lambdas, self.block_sigmas
            ):
                if o3_lambda > 0:
                    block = torch.matmul(wigner[o3_lambda], block)
                parity = o3_sigma * (1 - 2 * (o3_lambda % 2))
                if parity != 1:
                    block = torch.where(improper.reshape(-1, 1, 1), -block, block)
                if o3_lambda != 0 or o3_sigma != 1:
                    block = torch.where(
                        features.is_aux.reshape(-1, 1, 1),
                        torch.zeros_like(block),
                        block,
                    )
                rotated.append(block.reshape(block.shape[0], -1))
            raw = torch.cat(rotated, dim=1) * features.owner_weights.unsqueeze(1)
            raw = torch.zeros(
                species.shape[0], raw.shape[1], dtype=raw.dtype, device=raw.device
            ).index_add(0, features.owner_atoms, raw)
        return raw * self.scale + self.baseline.index_select(0, species)

    def _basis_forward(
        self,
        features: PETFeatures,
        species: torch.Tensor,
        edge_vectors: torch.Tensor,
        pair_harmonics: Optional[List[torch.Tensor]],
        pooled: Optional[torch.Tensor],
    ) -> torch.Tensor:
        nodes, edges, fc, centers = basis_inputs(features)
        coefficients = self.head(nodes, edges, fc, centers, pooled).split(
            self.coefficient_sizes, dim=1
        )
        blocks: List[torch.Tensor] = []
        for index, head in enumerate(self.basis_heads):
            block = head(
                coefficients[index], edges, edge_vectors, fc, centers, pair_harmonics
            )
            blocks.append(block.reshape(block.shape[0], -1))
        raw = torch.cat(blocks, dim=1)
        return raw * self.scale + self.baseline.index_select(0, species)

    def split_blocks(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """``(n, n_flat)`` → one ``(n, 2λ+1, p)`` tensor per block."""
        result: List[torch.Tensor] = []
        for values, components, properties in zip(
            flat.split(self.block_sizes, dim=1),
            self.block_components,
            self.block_properties,
        ):
            result.append(values.reshape(-1, components, properties))
        return result


class SymatomicModel(torch.nn.Module):
    """PET with one head per target, in metatomic's interface.

    :param hypers: the ``architecture.model`` section (PET hyper-parameters)
    :param atomic_types: atomic numbers the model handles
    :param targets: the targets to predict
    :param length_unit: length unit of positions
    """

    _keys: Dict[str, Labels]
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
        # every GNN layer reaches one cutoff further, and the features the heads read
        # combine each edge i → j with its reverse j → i once more after the last
        # layer (j's environment): (num_gnn_layers + 1) × cutoff, checked by the
        # domain-decomposition test in tests/test_engines.py
        self.interaction_range = (
            float(self.hypers["num_gnn_layers"]) + 1.0
        ) * self.cutoff
        if self.hypers["backbone"] == "soap":
            # atom features reach one cutoff, pair features (through h_j) two
            self.interaction_range = 2.0 * self.cutoff

        type_to_index = torch.full((max(self.atomic_types) + 1,), -1, dtype=torch.long)
        for index, atomic_type in enumerate(self.atomic_types):
            type_to_index[atomic_type] = index
        self.register_buffer("type_to_index", type_to_index)

        model_only = ("ecse", "backbone", "soap", "tensor_heads", "basis_hidden")
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
    ) -> Dict[str, torch.Tensor]:
        """Per-atom contributions of the requested targets.

        :param species: ``(n_atoms,)`` species indices
        :param edge_vectors: ``(n_pairs, 3)``, pairs sorted by center
        :param centers: ``(n_pairs,)``
        :param neighbors: ``(n_pairs,)``
        :param reverse: ``(n_pairs,)`` index of the reverse pair
        :param names: targets to compute
        :return: name → ``(n_atoms, n_flat)`` in the target's unit
        """
        features = self.backbone(species, edge_vectors, centers, neighbors, reverse)
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
            if name in names and readout.uses_basis:
                uses_basis = True
        pair_harmonics: Optional[List[torch.Tensor]] = None
        pooled: Optional[torch.Tensor] = None
        if uses_basis:
            nodes, edges, fc, centers = basis_inputs(features)
            pooled = pool_pairs(nodes.shape[0], edges, fc, centers)
            pair_harmonics = self.basis_harmonics(pair_directions(edge_vectors))
        result: Dict[str, torch.Tensor] = {}
        for name, readout in self.readouts.items():
            if name in names:
                result[name] = readout(
                    features,
                    species,
                    wigner,
                    improper,
                    edge_vectors,
                    pair_harmonics,
                    pooled,
                )
        return result

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
    ) -> Dict[str, List[torch.Tensor]]:
        """Predictions in the targets' own layout (pure tensors).

        :return: name → one tensor per block: ``(n_systems, 2λ+1, p)`` for
            per-structure targets, ``(n_atoms_of_block, 2λ+1, p)`` for per-atom targets
            (atoms in order; only atoms of the block's type for per-type blocks)
        """
        atomic = self.atomic_outputs(
            species, edge_vectors, centers, neighbors, reverse, names
        )
        result: Dict[str, List[torch.Tensor]] = {}
        for name, readout in self.readouts.items():
            if name in atomic:
                values = atomic[name]
                if readout.per_atom:
                    blocks = readout.split_blocks(values)
                    selected: List[torch.Tensor] = []
                    for block, atom_type in zip(blocks, readout.block_atom_types):
                        if atom_type >= 0:
                            mask = species == int(self.type_to_index[atom_type])
                            block = block[mask]
                        selected.append(block)
                    result[name] = selected
                else:
                    summed = torch.zeros(
                        n_systems,
                        values.shape[1],
                        dtype=values.dtype,
                        device=values.device,
                    ).index_add(0, system_index, values)
                    result[name] = readout.split_blocks(summed)
        return result

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
        for name in outputs.keys():
            if name not in self.target_names:
                raise ValueError(
                    "this model can not compute '"
                    + name
                    + "'; it computes "
                    + str(self.target_names)
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
        offset = 0
        for index, system in enumerate(systems):
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

        names: List[str] = list(outputs.keys())
        atomic = self.atomic_outputs(
            species, all_vectors, all_centers, all_neighbors, reverse, names
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
        if selected_atoms is not None:
            selected = torch.zeros(n_total, dtype=torch.bool, device=device)
            system_column = selected_atoms.column("system").to(torch.long)
            atom_column = selected_atoms.column("atom").to(torch.long)
            selected[starts.index_select(0, system_column) + atom_column] = True

        result: Dict[str, TensorMap] = {}
        for name, readout in self.readouts.items():
            if name in atomic:
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
                    if per_atom_request:
                        block_values = block_values[mask]
                        sample_values = torch.stack(
                            [all_system_index[mask], atom_in_system[mask]], dim=1
                        ).to(torch.int32)
                        samples = Labels(["system", "atom"], sample_values)
                    else:
                        masked = block_values * mask.to(block_values.dtype).reshape(
                            -1, 1, 1
                        )
                        block_values = torch.zeros(
                            [
                                len(systems),
                                block_values.shape[1],
                                block_values.shape[2],
                            ],
                            dtype=block_values.dtype,
                            device=device,
                        ).index_add(0, all_system_index, masked)
                        samples = Labels(
                            ["system"],
                            torch.arange(
                                len(systems), dtype=torch.int32, device=device
                            ).reshape(-1, 1),
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
        return result

    # --------------------------------------------------------------- statistics
    def fit_output_statistics(
        self, structures: Sequence[Any]
    ) -> Dict[str, List[float]]:
        """Fit composition baselines and scales of every target on training data.

        Baselines: per-species contributions to invariant (λ=0, σ=+1) blocks, by least
        squares over structures (per-structure targets) or per-species means
        (per-atom targets). Scales: root mean square of the residual per atom and per
        component, for every property; for energies with forces, at least the root
        mean square force component (times one length unit).

        :param structures: training structures (:class:`symatomic.data.Structure`)
        :return: target name → root mean square residual per atom of every flattened
            output component (without the adjustment to forces), for logging
        """
        n_species = len(self.atomic_types)
        index = {t: i for i, t in enumerate(self.atomic_types)}
        report: Dict[str, List[float]] = {}
        for name, spec in self.target_specs.items():
            readout = self.readouts[name]
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
                        atom_species.append(
                            torch.tensor([index[int(t)] for t in types])
                        )
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
