"""Read-out of one target from backbone features: heads, rotation back from ECSE
frames, scale and composition baseline (pure torch, scriptable)."""

from typing import Any, Dict, List, Optional, Tuple

import torch

from .basis import ScalarBasisHead
from .data.targets import TargetSpec
from .heads import DirectHead, PooledHead, pool_pairs
from .model_options import tensor_heads_of
from .pet import PETFeatures
from .uncertainty import BlockUncertainty

__all__ = ["TargetReadout", "atom_features", "basis_inputs"]


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


def atom_features(features: PETFeatures, n_atoms: int) -> torch.Tensor:
    """The ``feature`` output: ``(n_atoms, d_node + d_edge)``, the backbone's last atom
    features and the cutoff-weighted sum of its last pair features,
    ``[h_i, Σ_j fc(r_ij) e_ij]`` (what the coefficient heads read).

    Exactly invariant for exact models: the SOAP backbone's, PET's with invariant
    edge inputs, and with ECSE frames the invariant frame averages (or, where the
    backbone has none, the weighted average over an atom's frames of the features
    computed in each frame, which are invariant themselves). Plain PET's features
    are only approximately invariant.

    :param features: the backbone's output
    :param n_atoms: number of atoms
    """
    nodes = features.invariant_nodes
    edges = features.invariant_edges
    fc = features.atom_fc
    centers = features.centers
    if (
        nodes is not None
        and edges is not None
        and fc is not None
        and centers is not None
    ):
        return torch.cat([nodes, pool_pairs(n_atoms, edges, fc, centers)], dim=1)
    n_owners = features.nodes.shape[0]
    per_owner = torch.cat(
        [
            features.nodes,
            pool_pairs(n_owners, features.edges, features.fc, features.edge_owners),
        ],
        dim=1,
    )
    if not features.symmetrized:
        return per_owner
    weighted = per_owner * features.owner_weights.unsqueeze(1)
    return torch.zeros(
        n_atoms, weighted.shape[1], dtype=weighted.dtype, device=weighted.device
    ).index_add(0, features.owner_atoms, weighted)


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
        #: ``1 / N_avg``: sums over an atom's pairs in the heads are divided by
        #: the average (cutoff-weighted) number of neighbors of the training set,
        #: so that outputs and their updates do not grow with the density (dense
        #: liquids have ~40 neighbors per atom, small molecules 2-8)
        self.register_buffer("pair_normalization", torch.ones(()))
        #: whether the outputs are linear in last-layer weights whose features
        #: :meth:`last_layer_features` gives (every head: invariant targets,
        #: scalar-basis heads, and direct heads of covariant targets, whose
        #: features carry the rotations of the ECSE frames)
        self.has_last_layer: bool = True
        d_last = int(hypers["d_head"]) + 1
        if not self.uses_basis:
            d_last = 2 * int(hypers["d_head"]) + 2
        #: size of the invariant last-layer features ``z`` of the head
        self.last_layer_size: int = d_last
        #: size of the last-layer features ``Φ`` of each block
        self.block_last_layer_sizes: List[int] = (
            [h.n_basis * d_last for h in basis_heads]
            if self.uses_basis
            else [c * d_last for c in self.block_components]
        )
        #: calibrated last-layer uncertainty of every block (symatomic.uncertainty)
        self.uncertainty = torch.nn.ModuleList(
            [
                BlockUncertainty(n_last, n_properties)
                for n_last, n_properties in zip(
                    self.block_last_layer_sizes, self.block_properties
                )
            ]
        )

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
            raw = self.head(atom_nodes, atom_edges, self._pairs(atom_fc), centers)
            return raw * self.scale + self.baseline.index_select(0, species)
        raw = self.head(
            features.nodes,
            features.edges,
            self._pairs(features.fc),
            features.edge_owners,
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
        coefficients = self.head(
            nodes, edges, self._pairs(fc), centers, self._pooled(pooled)
        ).split(self.coefficient_sizes, dim=1)
        blocks: List[torch.Tensor] = []
        for index, head in enumerate(self.basis_heads):
            block = head(
                coefficients[index], edges, edge_vectors, fc, centers, pair_harmonics
            )
            blocks.append(block.reshape(block.shape[0], -1))
        raw = torch.cat(blocks, dim=1)
        return raw * self.scale + self.baseline.index_select(0, species)

    @torch.jit.export
    def last_layer_features(
        self,
        features: PETFeatures,
        n_atoms: int,
        edge_vectors: torch.Tensor,
        wigner: List[torch.Tensor],
        improper: torch.Tensor,
        pair_harmonics: Optional[List[torch.Tensor]] = None,
        pooled: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The last-layer features of this target, in which its output is linear.

        :return: ``z``, ``(n_atoms, last_layer_size)``, the invariant inputs of
            the head's last layer (with a column of ones for its bias), and per
            block ``Φ``, ``(n_atoms, 2λ+1, block_last_layer_size)``, such that the
            block is ``(Φ · w_p) · scale_p + baseline`` for property ``p`` with
            ``w_p`` the last-layer weights of :meth:`block_last_layer_weights`.
            Invariant targets: ``Φ = z`` for every block. Scalar-basis heads:
            ``Φ_{i,μ,(b,k)} = B_{i,μ,b} z_{i,k}``, which rotates like the block.
            Direct heads of covariant targets: ``Φ_{i,μ,(μ',k)} = Σ_f w_f s_f
            D^λ_{μμ'}(R_f) z_{f,k}`` over the atom's ECSE frames ``f`` (weights
            ``w_f``, parity signs ``s_f``; the invariant fallback only in proper
            scalars), ``δ_{μμ'} z_{i,k}`` without frames; it rotates like the
            block because the frames do. Arguments as in :meth:`forward`;
            ``n_atoms`` is the number of atoms.
        """
        if self.uses_basis:
            nodes, edges, fc, centers = basis_inputs(features)
            z = self.head.last_layer_features(
                nodes, edges, self._pairs(fc), centers, self._pooled(pooled)
            )
            per_block: List[torch.Tensor] = []
            for head in self.basis_heads:
                basis = head.compute_basis(
                    edges, edge_vectors, fc, centers, n_atoms, pair_harmonics
                )
                phi = basis.unsqueeze(3) * z.unsqueeze(1).unsqueeze(2)
                per_block.append(phi.reshape(n_atoms, basis.shape[1], -1))
            return z, per_block
        if not self.invariant:
            return self._covariant_last_layer(features, n_atoms, wigner, improper)
        atom_nodes = features.atom_nodes
        atom_edges = features.atom_edges
        atom_fc = features.atom_fc
        centers = features.centers
        if (
            atom_nodes is not None
            and atom_edges is not None
            and atom_fc is not None
            and centers is not None
        ):
            z = self.head.last_layer_features(
                atom_nodes, atom_edges, self._pairs(atom_fc), centers
            )
        else:
            z = self.head.last_layer_features(
                features.nodes,
                features.edges,
                self._pairs(features.fc),
                features.edge_owners,
            )
            if features.symmetrized:
                weighted = z * features.owner_weights.unsqueeze(1)
                z = torch.zeros(
                    n_atoms, z.shape[1], dtype=z.dtype, device=z.device
                ).index_add(0, features.owner_atoms, weighted)
        return z, [z.unsqueeze(1) for _ in self.block_sizes]

    def _covariant_last_layer(
        self,
        features: PETFeatures,
        n_atoms: int,
        wigner: List[torch.Tensor],
        improper: torch.Tensor,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        z = self.head.last_layer_features(
            features.nodes,
            features.edges,
            self._pairs(features.fc),
            features.edge_owners,
        )
        n_owners = z.shape[0]
        per_block: List[torch.Tensor] = []
        for o3_lambda, o3_sigma in zip(self.block_lambdas, self.block_sigmas):
            n_components = 2 * o3_lambda + 1
            if not features.symmetrized:
                identity = torch.eye(n_components, dtype=z.dtype, device=z.device)
                phi = identity.reshape(1, n_components, n_components, 1) * z.reshape(
                    n_owners, 1, 1, -1
                )
                per_block.append(phi.reshape(n_owners, n_components, -1))
                continue
            coefficient = features.owner_weights
            parity = o3_sigma * (1 - 2 * (o3_lambda % 2))
            if parity != 1:
                coefficient = torch.where(improper, -coefficient, coefficient)
            if o3_lambda != 0 or o3_sigma != 1:
                coefficient = torch.where(
                    features.is_aux, torch.zeros_like(coefficient), coefficient
                )
            if o3_lambda > 0:
                rotation = wigner[o3_lambda]
            else:
                rotation = torch.ones(n_owners, 1, 1, dtype=z.dtype, device=z.device)
            phi = (rotation * coefficient.reshape(-1, 1, 1)).unsqueeze(3) * z.reshape(
                n_owners, 1, 1, -1
            )
            phi = phi.reshape(n_owners, n_components, -1)
            per_block.append(
                torch.zeros(
                    n_atoms, n_components, phi.shape[2], dtype=z.dtype, device=z.device
                ).index_add(0, features.owner_atoms, phi)
            )
        if features.symmetrized:
            weighted = z * features.owner_weights.unsqueeze(1)
            z = torch.zeros(
                n_atoms, z.shape[1], dtype=z.dtype, device=z.device
            ).index_add(0, features.owner_atoms, weighted)
        return z, per_block

    def _pairs(self, fc: torch.Tensor) -> torch.Tensor:
        """The weights of the pair sums of the heads: ``fc / N_avg``."""
        return fc * self.pair_normalization.to(fc.dtype)

    def _pooled(self, pooled: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The model's :func:`~symatomic.heads.pool_pairs` (``Σ_j fc e_ij``), divided
        by ``N_avg`` like every pair sum of the heads."""
        if pooled is None:
            return None
        return pooled * self.pair_normalization.to(pooled.dtype)

    @torch.jit.export
    def from_last_layer(self, z: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """The output of a direct head from its :meth:`last_layer_features` ``z``,
        ``(n_atoms, n_flat)`` (what :meth:`forward` gives, for invariant
        targets)."""
        raw = torch.matmul(z, self.head.last_layer_weights())
        return raw * self.scale + self.baseline.index_select(0, species)

    def block_last_layer_weights(self) -> List[torch.Tensor]:
        """Per block, ``(block_last_layer_size, n_properties)``: the last-layer
        weights ``w_p`` of :meth:`last_layer_features` (not scripted)."""
        weights = self.head.last_layer_weights()
        result: List[torch.Tensor] = []
        if self.uses_basis:
            offset = 0
            for head in self.basis_heads:
                block = weights[:, offset : offset + head.n_coefficients]
                block = block.reshape(-1, head.n_basis, head.n_properties)
                result.append(block.transpose(0, 1).reshape(-1, head.n_properties))
                offset += head.n_coefficients
            return result
        # Φ's columns run over (μ', k): the weights of component μ' of the head's
        # output, stacked
        for columns, n_components, n_properties in zip(
            weights.split(self.block_sizes, dim=1),
            self.block_components,
            self.block_properties,
        ):
            block = columns.reshape(-1, n_components, n_properties).transpose(0, 1)
            result.append(block.reshape(-1, n_properties))
        return result

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
