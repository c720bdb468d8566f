"""The Point Edge Transformer (PET) backbone, in pure torch.

PET is an edge-centred transformer: for every atom ``i`` a transformer runs over one
token per neighbor ``j`` (built from the pair vector ``r_ij``, the neighbor's species
and the message received from ``j``) plus one token for the atom itself. Attention
weights are multiplied by a smooth cutoff ``fc(r_ij)`` and renormalised, so neighbors
enter and leave smoothly. The output token of edge ``i → j`` becomes the input message
of edge ``j → i`` in the next layer. The hyper-parameters and their defaults are those
of metatrain's PET (pre-layer-norm transformer, "feedforward" featurizer).

Layout: per-token linear layers run on *packed* tensors (one row per real pair,
``(n_pairs, d_pet)``, and one per atom, ``(n_atoms, d_node)``), so no work is spent on
padding; only the attention itself uses a padded ``(n_atoms, 1 + max_neighbors)`` grid.

PET sees Cartesian components: it is not rotationally invariant by itself.
"""

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from .density import PairDensityProjections, radial_basis
from .ecse import ECSE_DEFAULTS, ECSEFrames
from .o3 import SolidHarmonics
from .smooth import cutoff_function

__all__ = [
    "PET",
    "PET_DEFAULT_HYPERS",
    "PET_SIZE_KEYS",
    "check_pet_hypers",
    "count_parameters",
    "LayerSubset",
    "atoms_and_pairs",
    "layer_reach",
]

PET_DEFAULT_HYPERS: Dict[str, Any] = {
    "cutoff": 4.5,
    "cutoff_width": 0.5,
    "d_pet": 128,
    "d_head": 128,
    "d_node": 256,
    "d_feedforward": 256,
    "num_heads": 8,
    "num_attention_layers": 2,
    "num_gnn_layers": 2,
    "normalization": "RMSNorm",
    "activation": "SwiGLU",
    "edge_inputs": "cartesian",
    "density_max_angular": 3,
    "density_max_radial": 5,
    "density_channels": 8,
    "density_features": 32,
    # combine the last layer's edge tokens with their reverses before the heads
    # (one cutoff more of interaction range); models before it did
    "reverse_last_layer": False,
}

#: the options of metatrain's PET (the rest are symatomic's own)
PET_SIZE_KEYS = (
    "cutoff",
    "cutoff_width",
    "d_pet",
    "d_head",
    "d_node",
    "d_feedforward",
    "num_heads",
    "num_attention_layers",
    "num_gnn_layers",
    "normalization",
    "activation",
)

_HYPER_TYPES = {
    "cutoff": float,
    "cutoff_width": float,
    "d_pet": int,
    "d_head": int,
    "d_node": int,
    "d_feedforward": int,
    "num_heads": int,
    "num_attention_layers": int,
    "num_gnn_layers": int,
    "normalization": str,
    "activation": str,
    "edge_inputs": str,
    "density_max_angular": int,
    "density_max_radial": int,
    "density_channels": int,
    "density_features": int,
    "reverse_last_layer": bool,
}


def check_pet_hypers(
    hypers: Dict[str, Any], where: str = "architecture.model"
) -> Dict[str, Any]:
    """Fill defaults and validate PET hyper-parameters, with errors naming the option."""
    result = dict(PET_DEFAULT_HYPERS)
    for name, value in hypers.items():
        if name not in _HYPER_TYPES:
            raise ValueError(
                f"{where}: unknown PET option '{name}'; known options are "
                f"{sorted(_HYPER_TYPES)}"
            )
        expected = _HYPER_TYPES[name]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (
            isinstance(value, bool) and expected is not bool
        ):
            raise ValueError(
                f"{where}.{name} must be a {expected.__name__}, got {value!r}"
            )
        result[name] = value
    for name in (
        "d_pet",
        "d_head",
        "d_node",
        "d_feedforward",
        "num_heads",
        "num_gnn_layers",
    ):
        if result[name] < 1:
            raise ValueError(f"{where}.{name} must be positive, got {result[name]}")
    if result["num_attention_layers"] < 1:
        raise ValueError(f"{where}.num_attention_layers must be positive")
    if result["d_pet"] % result["num_heads"] != 0:
        raise ValueError(
            f"{where}: d_pet ({result['d_pet']}) must be divisible by num_heads "
            f"({result['num_heads']})"
        )
    if not 0 < result["cutoff_width"] < result["cutoff"]:
        raise ValueError(f"{where}: need 0 < cutoff_width < cutoff")
    if result["normalization"] not in ("RMSNorm", "LayerNorm"):
        raise ValueError(f"{where}.normalization must be 'RMSNorm' or 'LayerNorm'")
    if result["activation"] not in ("SwiGLU", "SiLU"):
        raise ValueError(f"{where}.activation must be 'SwiGLU' or 'SiLU'")
    if result["edge_inputs"] not in ("cartesian", "invariant"):
        raise ValueError(
            f"{where}.edge_inputs must be 'cartesian' or 'invariant', got "
            f"{result['edge_inputs']!r}"
        )
    for name in ("density_max_angular", "density_max_radial"):
        if result[name] < 0:
            raise ValueError(f"{where}.{name} must not be negative")
    for name in ("density_channels", "density_features"):
        if result[name] < 1:
            raise ValueError(f"{where}.{name} must be positive")
    return result


class AttentionLayout:
    """Where the tokens of every atom go in the padded attention grids.

    Atoms are sorted by number of neighbors and split in a few groups, each padded to
    its own largest neighbor count, so that little attention work is spent on
    padding. Tokens are numbered node tokens first (``0 … n_atoms-1``), then edge
    tokens (``n_atoms + pair``).

    :param rows: per group, ``(atoms_in_group, tokens)`` token of every grid slot
        (padding slots point to token 0; their attention weight is exactly 0)
    :param biases: per group, ``(atoms_in_group, 1, 1, tokens)``: ``log fc`` of
        the edge tokens, 0 for the node token, ``-inf`` on padding
    :param inverse: ``(n_atoms + n_pairs,)`` position of every token in the
        concatenated flattened grids
    """

    def __init__(
        self,
        rows: List[torch.Tensor],
        biases: List[torch.Tensor],
        inverse: torch.Tensor,
    ):
        self.rows = rows
        self.biases = biases
        self.inverse = inverse


def attention_layout(
    centers: torch.Tensor, log_fc: torch.Tensor, n_atoms: int, max_groups: int
) -> AttentionLayout:
    """Build the :class:`AttentionLayout` of pairs sorted by center.

    :param centers: ``(n_pairs,)`` sorted
    :param log_fc: ``(n_pairs,)`` log of the cutoff factors (differentiable)
    :param max_groups: largest number of groups of atoms
    """
    device = centers.device
    n_pairs = centers.shape[0]
    counts = torch.zeros(n_atoms, dtype=torch.long, device=device)
    counts.index_add_(0, centers, torch.ones_like(centers))
    first = torch.cumsum(counts, 0) - counts
    order = torch.argsort(counts, stable=True)
    n_groups = max(1, min(max_groups, n_atoms // 32))
    if n_atoms > 0 and int(counts.min()) == int(counts.max()):
        n_groups = 1
    token_bias = torch.cat(
        [torch.zeros(n_atoms, dtype=log_fc.dtype, device=device), log_fc]
    )
    rows: List[torch.Tensor] = []
    biases: List[torch.Tensor] = []
    inverse = torch.zeros(n_atoms + n_pairs, dtype=torch.long, device=device)
    offset = 0
    for group in torch.tensor_split(order, n_groups):
        if group.shape[0] == 0:
            continue
        group_counts = counts.index_select(0, group)
        n_tokens = int(group_counts.max()) + 1
        rank = torch.arange(n_tokens - 1, device=device).unsqueeze(0)
        real = rank < group_counts.unsqueeze(1)
        edge_rows = torch.where(
            real, n_atoms + first.index_select(0, group).unsqueeze(1) + rank, 0
        )
        group_rows = torch.cat([group.unsqueeze(1), edge_rows], dim=1)
        group_real = torch.cat(
            [torch.ones((group.shape[0], 1), dtype=torch.bool, device=device), real],
            dim=1,
        )
        bias = torch.where(
            group_real,
            token_bias.index_select(0, group_rows.reshape(-1)).view(group_rows.shape),
            torch.full_like(token_bias[:1], -math.inf),
        )
        flat_real = group_real.reshape(-1)
        positions = torch.arange(flat_real.shape[0], device=device) + offset
        inverse[group_rows.reshape(-1)[flat_real]] = positions[flat_real]
        offset += flat_real.shape[0]
        rows.append(group_rows)
        biases.append(bias.view(group_rows.shape[0], 1, 1, n_tokens))
    return AttentionLayout(rows, biases, inverse)


def _norm(kind: str, dim: int) -> torch.nn.Module:
    if kind == "RMSNorm":
        return torch.nn.RMSNorm(dim)
    return torch.nn.LayerNorm(dim)


class FeedForward(torch.nn.Module):
    """Two-layer perceptron, ``(…, d_in) → (…, d_in)``, SwiGLU or SiLU.

    SwiGLU uses separate value and gate maps (rather than one map split in two),
    which avoids concatenating their gradients in the backward pass.
    """

    def __init__(self, d_in: int, d_hidden: int, activation: str):
        super().__init__()
        self.gated = activation == "SwiGLU"
        self.w_in = torch.nn.Linear(d_in, d_hidden)
        self.w_gate = torch.nn.ModuleList(
            [torch.nn.Linear(d_in, d_hidden)] if self.gated else []
        )
        self.w_out = torch.nn.Linear(d_hidden, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        gated = False
        for gate in self.w_gate:
            h = h * torch.nn.functional.silu(gate(x))
            gated = True
        if not gated:
            h = torch.nn.functional.silu(h)
        return self.w_out(h)


class AttentionLayer(torch.nn.Module):
    """One pre-layer-norm transformer layer over the node token and the edge tokens.

    The node token lives in ``d_node`` and is contracted to ``d_pet`` for attention
    (and expanded back, with residuals), as in metatrain's PET.
    """

    def __init__(self, hypers: Dict[str, Any]):
        super().__init__()
        d_pet = int(hypers["d_pet"])
        d_node = int(hypers["d_node"])
        self.num_heads = int(hypers["num_heads"])
        self.head_dim = d_pet // self.num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.d_pet = d_pet
        self.norm_attention = _norm(hypers["normalization"], d_pet)
        self.qkv = torch.nn.Linear(d_pet, 3 * d_pet)
        self.output = torch.nn.Linear(d_pet, d_pet)
        self.norm_edges = _norm(hypers["normalization"], d_pet)
        self.edge_mlp = FeedForward(
            d_pet, int(hypers["d_feedforward"]), hypers["activation"]
        )
        self.node_contraction = torch.nn.Linear(d_node, d_pet)
        self.node_expansion = torch.nn.Linear(d_pet, d_node)
        self.norm_nodes = _norm(hypers["normalization"], d_node)
        self.node_mlp = FeedForward(d_node, 2 * d_node, hypers["activation"])

    def forward(
        self,
        nodes: torch.Tensor,
        edges: torch.Tensor,
        layout: "AttentionLayout",
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        :param nodes: ``(n_atoms, d_node)``
        :param edges: ``(n_pairs, d_pet)``
        :param layout: where every token goes in the padded attention grids
        :return: updated ``(nodes, edges)``
        """
        n_atoms = nodes.shape[0]
        tokens = torch.cat([self.node_contraction(nodes), edges], dim=0)
        qkv = self.qkv(self.norm_attention(tokens))
        outputs: List[torch.Tensor] = []
        for rows, bias in zip(layout.rows, layout.biases):
            n_group, n_tokens = rows.shape
            grid = qkv.index_select(0, rows.reshape(-1))
            grid = grid.view(n_group, n_tokens, 3, self.num_heads, self.head_dim)
            queries, keys, values = grid.permute(2, 0, 3, 1, 4).unbind(0)
            scores = torch.matmul(queries * self.scale, keys.transpose(-1, -2))
            weights = torch.softmax(scores + bias, dim=-1)
            attended = torch.matmul(weights, values)  # (group, heads, tokens, dim)
            outputs.append(attended.transpose(1, 2).reshape(-1, self.d_pet))
        attended = torch.cat(outputs, dim=0).index_select(0, layout.inverse)
        attended = self.output(attended)

        node_update, edge_update = attended.split([n_atoms, edges.shape[0]], dim=0)
        edges = edges + edge_update
        edges = edges + self.edge_mlp(self.norm_edges(edges))
        nodes = nodes + self.node_expansion(node_update)
        nodes = nodes + self.node_mlp(self.norm_nodes(nodes))
        return nodes, edges


class GNNLayer(torch.nn.Module):
    """One message-passing layer: edge tokens, then ``num_attention_layers`` layers."""

    def __init__(
        self,
        hypers: Dict[str, Any],
        n_species: int,
        is_first: bool,
        d_geometry: int = 4,
    ):
        super().__init__()
        d_pet = int(hypers["d_pet"])
        # Edge tokens: compress(cat[embed(x, y, z, r), embed(species_j), m_ji]) with a
        # two-layer perceptron, as in PET. The first layer of that perceptron is
        # linear in each input, so it is written as a sum of three maps (the same
        # functions, fewer operations: no (n_pairs, 3 d) concatenation, and the
        # geometry and species maps act on 4 numbers and on a table).
        self.geometry_input = torch.nn.Linear(d_geometry, d_pet)
        # the first layer's messages already are neighbor-species embeddings
        self.species_inputs = torch.nn.ModuleList(
            [] if is_first else [torch.nn.Embedding(n_species, d_pet)]
        )
        self.message_input = torch.nn.Linear(d_pet, d_pet, bias=False)
        self.compress_output = torch.nn.Linear(d_pet, d_pet)
        self.attention_layers = torch.nn.ModuleList(
            [AttentionLayer(hypers) for _ in range(int(hypers["num_attention_layers"]))]
        )

    def forward(
        self,
        nodes: torch.Tensor,
        messages: torch.Tensor,
        edge_geometry: torch.Tensor,
        neighbor_species: torch.Tensor,
        layout: "AttentionLayout",
        extra_input: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        :param nodes: ``(n_atoms, d_node)``
        :param messages: ``(n_pairs, d_pet)`` incoming messages
        :param edge_geometry: ``(n_pairs, d_geometry)``: ``(x, y, z, r)`` of the pair
            vectors, or invariant pair features
        :param neighbor_species: ``(n_pairs,)`` species index of the neighbors
        :param extra_input: optional ``(n_pairs, d_pet)`` added to the first layer of
            the edge embedding (the density projections of invariant inputs, already
            mapped to ``d_pet``)
        :return: updated nodes and the output edge tokens ``(n_pairs, d_pet)``
        """
        edges = self.embed(messages, edge_geometry, neighbor_species, extra_input)
        for layer in self.attention_layers:
            nodes, edges = layer(nodes, edges, layout)
        return nodes, edges

    def embed(
        self,
        messages: torch.Tensor,
        edge_geometry: torch.Tensor,
        neighbor_species: torch.Tensor,
        extra_input: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The edge tokens ``(n_pairs, d_pet)`` entering the attention layers."""
        hidden = self.geometry_input(edge_geometry) + self.message_input(messages)
        if extra_input is not None:
            hidden = hidden + extra_input
        for embedding in self.species_inputs:
            hidden = hidden + embedding(neighbor_species)
        return self.compress_output(torch.nn.functional.silu(hidden))


class PETFeatures:
    """Features PET hands to the heads.

    Without ECSE every atom "owns" its features. With ECSE (local mode) the owners
    are the frames of every atom (and the fallback of degenerate environments):
    heads run on every owner, in the owner's frame, and their outputs are rotated
    back and averaged with the owner weights.

    :param nodes: ``(n_owners, d_node)``
    :param edges: ``(n_owner_pairs, d_pet)``
    :param fc: ``(n_owner_pairs,)`` cutoff factors
    :param edge_owners: ``(n_owner_pairs,)`` owner of every pair row (sorted)
    :param owner_atoms: ``(n_owners,)`` atom of every owner
    :param owner_weights: ``(n_owners,)`` weights, summing to 1 over an atom's owners
    :param rotations: ``(n_owners, 3, 3)`` frames (columns ``e1, e2, e3``; improper
        for mirrored frames, identity for the fallback)
    :param is_aux: ``(n_owners,)`` whether an owner is the (invariant) fallback
    :param symmetrized: whether ECSE is on
    :param atom_nodes: ``(n_atoms, d_node)`` invariant features of the atoms, when
        the last layers run outside the frames (heads of invariant targets use them)
    :param atom_edges: ``(n_pairs, d_pet)``, likewise
    :param fc: ``(n_pairs,)`` cutoff factors of the pairs
    :param centers: ``(n_pairs,)`` centers of the pairs
    :param invariant_nodes: ``(n_atoms, d_node)`` frame-averaged (exactly invariant)
        atom features of the last layer, with ECSE when the model asked for them
        (:attr:`PET.invariant_features`; the scalar-basis heads use them)
    :param invariant_edges: ``(n_pairs, d_pet)``, likewise for the pairs
    """

    def __init__(
        self,
        nodes: torch.Tensor,
        edges: torch.Tensor,
        fc: torch.Tensor,
        edge_owners: torch.Tensor,
        owner_atoms: torch.Tensor,
        owner_weights: torch.Tensor,
        rotations: torch.Tensor,
        is_aux: torch.Tensor,
        symmetrized: bool,
        atom_nodes: Optional[torch.Tensor] = None,
        atom_edges: Optional[torch.Tensor] = None,
        atom_fc: Optional[torch.Tensor] = None,
        centers: Optional[torch.Tensor] = None,
        invariant_nodes: Optional[torch.Tensor] = None,
        invariant_edges: Optional[torch.Tensor] = None,
    ):
        self.invariant_nodes = invariant_nodes
        self.invariant_edges = invariant_edges
        self.atom_nodes = atom_nodes
        self.atom_edges = atom_edges
        self.atom_fc = atom_fc
        self.centers = centers
        self.nodes = nodes
        self.edges = edges
        self.fc = fc
        self.edge_owners = edge_owners
        self.owner_atoms = owner_atoms
        self.owner_weights = owner_weights
        self.rotations = rotations
        self.is_aux = is_aux
        self.symmetrized = symmetrized


class PET(torch.nn.Module):
    """PET backbone: atom and pair features from pair vectors and species.

    :param hypers: PET hyper-parameters (see :data:`PET_DEFAULT_HYPERS`)
    :param n_species: number of atomic types
    :param ecse: ``None``, or the options of local ECSE (see
        :func:`symatomic.ecse.check_ecse_options`): every atom's transformer is then
        evaluated in each of the atom's frames (and their mirror images, for O(3))
        and averaged with the frame weights, so that all features are exactly
        invariant and the model stays local
    """

    def __init__(
        self,
        hypers: Dict[str, Any],
        n_species: int,
        ecse: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        hypers = check_pet_hypers(hypers)
        self.cutoff = float(hypers["cutoff"])
        self.cutoff_width = float(hypers["cutoff_width"])
        self.d_pet = int(hypers["d_pet"])
        self.d_node = int(hypers["d_node"])
        self.num_gnn_layers = int(hypers["num_gnn_layers"])
        self.max_groups = 4
        self.node_embedding = torch.nn.Embedding(n_species, self.d_node)
        self.message_embedding = torch.nn.Embedding(n_species, self.d_pet)
        self.invariant_inputs = hypers["edge_inputs"] == "invariant"
        if self.invariant_inputs and ecse is not None:
            raise ValueError(
                "ECSE frames need PET's Cartesian edge inputs (edge_inputs: "
                "cartesian); with edge_inputs: invariant PET is exactly invariant "
                "by itself"
            )
        densities: List[PairDensityProjections] = []
        d_geometry = 4
        max_angular = 0
        if self.invariant_inputs:
            max_angular = int(hypers["density_max_angular"])
            # 0.1 atoms per Å³ (liquid water) inside the cutoff
            average_neighbors = max(4.0 / 3.0 * math.pi * self.cutoff**3 * 0.1, 1.0)
            for _ in range(self.num_gnn_layers):
                densities.append(
                    PairDensityProjections(
                        self.d_pet,
                        d_out=self.d_pet,
                        max_angular=max_angular,
                        max_radial=int(hypers["density_max_radial"]),
                        n_channels=int(hypers["density_channels"]),
                        n_outputs=int(hypers["density_features"]),
                        average_neighbors=average_neighbors,
                    )
                )
            d_geometry = 2 + int(hypers["density_max_radial"])
        self.densities = torch.nn.ModuleList(densities)
        #: ε of the softened pair directions of the density (length unit)
        self.direction_softening = 0.04 * self.cutoff
        self.density_radial = radial_basis(
            self.cutoff, int(hypers["density_max_radial"])
        )
        self.density_harmonics = SolidHarmonics(max_angular)
        self.gnn_layers = torch.nn.ModuleList(
            [
                GNNLayer(hypers, n_species, i == 0, d_geometry)
                for i in range(self.num_gnn_layers)
            ]
        )
        #: whether the last layer's edge tokens are combined with their reverses
        #: (otherwise the heads read the last tokens as they are: the interaction
        #: range is num_gnn_layers x cutoff, not one cutoff more)
        self.reverse_last_layer = bool(hypers["reverse_last_layer"])
        n_combinations = self.num_gnn_layers - (0 if self.reverse_last_layer else 1)
        self.combination_norms = torch.nn.ModuleList(
            [torch.nn.LayerNorm(2 * self.d_pet) for _ in range(n_combinations)]
        )
        self.combination_mlps = torch.nn.ModuleList(
            [
                torch.nn.Sequential(
                    torch.nn.Linear(2 * self.d_pet, 2 * self.d_pet),
                    torch.nn.SiLU(),
                    torch.nn.Linear(2 * self.d_pet, self.d_pet),
                )
                for _ in range(n_combinations)
            ]
        )
        self.symmetrized = ecse is not None
        #: with ECSE, also hand frame-averaged invariant features of the last layer to
        #: the heads (set by the model when scalar-basis heads need them)
        self.invariant_features = False
        self.inversion = bool(ecse["inversion"]) if ecse is not None else False
        total_attention = self.num_gnn_layers * int(hypers["num_attention_layers"])
        frame_layers = None if ecse is None else ecse.get("frame_layers")
        self.frame_layers = (
            total_attention if frame_layers is None else int(frame_layers)
        )
        if not 1 <= self.frame_layers <= total_attention:
            raise ValueError(
                f"ecse.frame_layers must be between 1 and {total_attention} (the "
                f"number of attention layers), got {self.frame_layers}"
            )
        self.frames = ECSEFrames(
            self.cutoff,
            **({} if ecse is None else {k: ecse[k] for k in ECSE_DEFAULTS}),
        )
        self.register_buffer("mirror", torch.diag(torch.tensor([1.0, -1.0, 1.0])))

    def forward(
        self,
        species: torch.Tensor,
        edge_vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        reverse: torch.Tensor,
        active: Optional[torch.Tensor] = None,
    ) -> PETFeatures:
        """
        :param species: ``(n_atoms,)`` int64 species index
        :param edge_vectors: ``(n_pairs, 3)`` pair vectors, pairs sorted by center and
            closer than the cutoff
        :param centers: ``(n_pairs,)`` int64
        :param neighbors: ``(n_pairs,)`` int64
        :param reverse: ``(n_pairs,)`` int64 index of the reverse pair
        :param active: ``(n_atoms,)`` bool, the atoms whose features are read (an
            engine's ``selected_atoms``: a domain's own atoms, the others being its
            ghosts), or ``None`` for all. Each layer then computes only the atoms
            whose features can still reach an active atom (:func:`layer_reach`);
            the features of the active atoms and of their pairs are those of the
            full evaluation, the others' are not computed (left as they were).
            Without ECSE only; with ECSE every atom is computed.
        :return: the features of every atom (or of every frame, with ECSE)
        """
        n_atoms = species.shape[0]
        distances = torch.sqrt((edge_vectors * edge_vectors).sum(dim=1) + 1e-30)
        fc = cutoff_function(distances, self.cutoff, self.cutoff_width)
        # fc > 0 for every pair inside the cutoff; the clamp only guards underflow
        log_fc = torch.log(fc.clamp(min=1e-30))
        neighbor_species = species.index_select(0, neighbors)
        nodes = self.node_embedding(species)
        messages = self.message_embedding(neighbor_species)
        if self.symmetrized:
            return self._forward_ecse(
                nodes,
                messages,
                edge_vectors,
                distances,
                fc,
                log_fc,
                neighbor_species,
                centers,
                reverse,
            )

        edge_geometry = torch.cat([edge_vectors, distances.unsqueeze(1)], dim=1)
        harmonics: List[torch.Tensor] = []
        radial = distances.unsqueeze(1)
        if self.invariant_inputs:
            # softened directions r / sqrt(r² + ε²): unit vectors for r ≫ ε, but
            # smooth (a polynomial, not 1/r) as two atoms collide in hot MD
            softening = self.direction_softening**2
            harmonics = self.density_harmonics(
                edge_vectors
                / torch.sqrt(distances * distances + softening).unsqueeze(1)
            )
            radial = torch.cat(
                [distances.unsqueeze(1), self.density_radial(distances)], dim=1
            )
            # invariant edge inputs: r_ij, R_n(r_ij) and the projections of the
            # (message-weighted) neighbor density on r̂_ij
            edge_geometry = radial
        if active is not None and bool(active.all()):
            active = None
        # the layout of every atom's attention, or (with active atoms) the atoms
        # each layer computes, whose layouts are built layer by layer
        layout: Optional[AttentionLayout] = None
        reach: List[torch.Tensor] = []
        if active is None:
            layout = attention_layout(centers, log_fc, n_atoms, self.max_groups)
        else:
            reach = layer_reach(
                active,
                centers,
                neighbors,
                self.num_gnn_layers,
                self.reverse_last_layer,
            )
        layer_index = 0
        for gnn_layer in self.gnn_layers:
            if layout is not None:
                density_input = self._density_input(
                    layer_index, messages, radial, harmonics, fc, centers, n_atoms
                )
                nodes, edges = gnn_layer(
                    nodes,
                    messages,
                    edge_geometry,
                    neighbor_species,
                    layout,
                    density_input,
                )
                messages = self._combine(
                    layer_index, messages, edges, edges.index_select(0, reverse)
                )
            else:
                # only the atoms (and their pairs) that reach an active atom
                subset = LayerSubset(
                    reach[layer_index],
                    reach[layer_index + 1],
                    centers,
                    reverse,
                    log_fc,
                    self.max_groups,
                    self._combines(layer_index),
                )
                pairs = subset.pairs
                pair_messages = messages.index_select(0, pairs)
                density_input = self._density_input(
                    layer_index,
                    pair_messages,
                    radial.index_select(0, pairs),
                    [h.index_select(0, pairs) for h in harmonics],
                    fc.index_select(0, pairs),
                    subset.local_centers,
                    subset.atoms.shape[0],
                )
                new_nodes, edges = gnn_layer(
                    nodes.index_select(0, subset.atoms),
                    pair_messages,
                    edge_geometry.index_select(0, pairs),
                    neighbor_species.index_select(0, pairs),
                    subset.layout,
                    density_input,
                )
                nodes = nodes.index_copy(0, subset.atoms, new_nodes)
                own = edges.index_select(0, subset.own)
                combined = self._combine(
                    layer_index,
                    messages.index_select(0, subset.updated),
                    own,
                    edges.index_select(0, subset.reversed),
                )
                messages = messages.index_copy(0, subset.updated, combined)
            layer_index += 1
        atoms = torch.arange(n_atoms, device=species.device)
        return PETFeatures(
            nodes,
            messages,
            fc,
            centers,
            atoms,
            torch.ones(n_atoms, dtype=fc.dtype, device=fc.device),
            torch.eye(3, dtype=fc.dtype, device=fc.device).expand(n_atoms, 3, 3),
            torch.zeros(n_atoms, dtype=torch.bool, device=fc.device),
            False,
        )

    def _combines(self, layer_index: int) -> bool:
        """Whether layer ``layer_index`` combines each edge token with its
        reverse's (every layer but, without ``reverse_last_layer``, the last)."""
        return self.reverse_last_layer or layer_index < self.num_gnn_layers - 1

    def _combine(
        self,
        layer_index: int,
        messages: torch.Tensor,
        edges: torch.Tensor,
        reversed_edges: torch.Tensor,
    ) -> torch.Tensor:
        """The messages after layer ``layer_index``, ``(n, d_pet)``: the incoming
        ones plus the layer's edge tokens, and where the layer combines
        (:meth:`_combines`) an MLP of each token and its reverse's (rows of
        ``reversed_edges``; not read otherwise)."""
        result = messages + edges
        for index, (norm, mlp) in enumerate(
            zip(self.combination_norms, self.combination_mlps)
        ):
            if index == layer_index:
                result = result + mlp(norm(torch.cat([edges, reversed_edges], dim=1)))
        return result

    def _density_input(
        self,
        layer_index: int,
        messages: torch.Tensor,
        radial: torch.Tensor,
        harmonics: List[torch.Tensor],
        fc: torch.Tensor,
        centers: torch.Tensor,
        n_atoms: int,
    ) -> Optional[torch.Tensor]:
        """With invariant edge inputs, the projections of the (message-weighted)
        neighbor density on every pair direction, mapped to ``d_pet`` inside the
        density module (the same linear map as a part of the embedding's first
        layer, at a fraction of its cost); ``None`` otherwise."""
        density_input: Optional[torch.Tensor] = None
        if self.invariant_inputs:
            for index, density in enumerate(self.densities):
                if index == layer_index:
                    density_input = density(
                        messages, radial[:, 1:], harmonics, fc, centers, n_atoms
                    )
        return density_input

    def _forward_ecse(
        self,
        nodes: torch.Tensor,
        messages: torch.Tensor,
        edge_vectors: torch.Tensor,
        distances: torch.Tensor,
        fc: torch.Tensor,
        log_fc: torch.Tensor,
        neighbor_species: torch.Tensor,
        centers: torch.Tensor,
        reverse: torch.Tensor,
    ) -> PETFeatures:
        n_atoms = nodes.shape[0]
        device = nodes.device
        dtype = edge_vectors.dtype
        atoms = torch.arange(n_atoms, device=device)
        frames = self.frames(centers, edge_vectors, n_atoms, atoms, n_atoms)

        # owners: the frames (and their mirror images), then fallbacks
        rotations = frames.rotations
        weights = frames.weights
        owner_atoms = frames.atoms
        if self.inversion:
            mirrored = torch.matmul(rotations, self.mirror.to(dtype))
            rotations = torch.cat([rotations, mirrored])
            weights = torch.cat([0.5 * weights, 0.5 * weights])
            owner_atoms = torch.cat([owner_atoms, owner_atoms])
        aux = torch.nonzero(frames.aux_weights > 0).squeeze(1)
        n_frames = rotations.shape[0]
        rotations = torch.cat(
            [
                rotations,
                torch.eye(3, dtype=dtype, device=device).expand(aux.shape[0], 3, 3),
            ]
        )
        weights = torch.cat([weights, frames.aux_weights.index_select(0, aux)])
        owner_atoms = torch.cat([owner_atoms, aux])
        is_aux = torch.arange(owner_atoms.shape[0], device=device) >= n_frames
        # group the owners of every atom together (pairs of owners must be sorted)
        order = torch.argsort(owner_atoms, stable=True)
        rotations = rotations.index_select(0, order)
        owner_atoms = owner_atoms.index_select(0, order)
        is_aux = is_aux.index_select(0, order)
        weights = weights.index_select(0, order) / frames.normalization.index_select(
            0, owner_atoms
        )
        n_owners = owner_atoms.shape[0]

        # pairs of every owner: the pairs of its atom
        counts = torch.zeros(n_atoms, dtype=torch.long, device=device)
        counts.index_add_(0, centers, torch.ones_like(centers))
        first = torch.cumsum(counts, 0) - counts
        owner_counts = counts.index_select(0, owner_atoms)
        edge_owners = torch.repeat_interleave(
            torch.arange(n_owners, device=device), owner_counts
        )
        owner_offsets = torch.cumsum(owner_counts, 0) - owner_counts
        owner_edges = (
            first.index_select(0, owner_atoms).index_select(0, edge_owners)
            + torch.arange(edge_owners.shape[0], device=device)
            - owner_offsets.index_select(0, edge_owners)
        )

        # local coordinates Fᵀ r (zero for the fallback, which sees distances only)
        vectors = edge_vectors.index_select(0, owner_edges)
        local = torch.matmul(
            vectors.unsqueeze(1), rotations.index_select(0, edge_owners)
        ).squeeze(1)
        local = local * (~is_aux).to(dtype).index_select(0, edge_owners).unsqueeze(1)
        owner_geometry = torch.cat(
            [local, distances.index_select(0, owner_edges).unsqueeze(1)], dim=1
        )
        owner_layout = attention_layout(
            edge_owners, log_fc.index_select(0, owner_edges), n_owners, self.max_groups
        )
        owner_species = neighbor_species.index_select(0, owner_edges)
        owner_weight_column = weights.unsqueeze(1)
        edge_weight_column = weights.index_select(0, edge_owners).unsqueeze(1)
        # after the frame layers, PET sees distances only: it is invariant by itself
        invariant_geometry = torch.cat(
            [torch.zeros_like(edge_vectors), distances.unsqueeze(1)], dim=1
        )
        atom_layout = attention_layout(centers, log_fc, n_atoms, self.max_groups)
        n_pairs = messages.shape[0]

        in_frames = True
        attention_index = 0
        owner_nodes = nodes.index_select(0, owner_atoms)
        owner_tokens = messages.index_select(0, owner_edges)
        owner_messages = owner_tokens
        edges = messages
        owner_features = owner_tokens
        last_gnn = self.num_gnn_layers - 1
        last_invariant: Optional[torch.Tensor] = None
        gnn_index = 0
        for gnn_layer in self.gnn_layers:
            if in_frames:
                owner_messages = messages.index_select(0, owner_edges)
                owner_nodes = nodes.index_select(0, owner_atoms)
                owner_tokens = gnn_layer.embed(
                    owner_messages, owner_geometry, owner_species
                )
            else:
                edges = gnn_layer.embed(messages, invariant_geometry, neighbor_species)
            for layer in gnn_layer.attention_layers:
                if in_frames and attention_index >= self.frame_layers:
                    # leave the frames: average over them, continue on atoms
                    nodes = _average(
                        owner_nodes, owner_atoms, owner_weight_column, n_atoms
                    )
                    edges = _average(
                        owner_tokens, owner_edges, edge_weight_column, n_pairs
                    )
                    in_frames = False
                if in_frames:
                    owner_nodes, owner_tokens = layer(
                        owner_nodes, owner_tokens, owner_layout
                    )
                else:
                    nodes, edges = layer(nodes, edges, atom_layout)
                attention_index += 1
            if in_frames:
                nodes = _average(owner_nodes, owner_atoms, owner_weight_column, n_atoms)
                edges = _average(owner_tokens, owner_edges, edge_weight_column, n_pairs)
            reversed_edges = edges.index_select(0, reverse)
            if gnn_index == last_gnn and in_frames:
                if self.invariant_features:
                    # the last combination on the frame-averaged (invariant) tokens
                    last_invariant = self._combine(
                        gnn_index, messages, edges, reversed_edges
                    )
                # the heads see the features of every frame
                owner_features = self._combine(
                    gnn_index,
                    owner_messages,
                    owner_tokens,
                    reversed_edges.index_select(0, owner_edges),
                )
            else:
                messages = self._combine(gnn_index, messages, edges, reversed_edges)
            gnn_index += 1
        atom_nodes: Optional[torch.Tensor] = None
        atom_edges: Optional[torch.Tensor] = None
        invariant_nodes: Optional[torch.Tensor] = None
        invariant_edges: Optional[torch.Tensor] = None
        if self.invariant_features:
            invariant_nodes = nodes
            invariant_edges = messages if last_invariant is None else last_invariant
        if not in_frames:
            # heads of covariant targets see the invariant features plus the last
            # features computed in every frame (which carry the orientation);
            # heads of invariant targets see the invariant features only
            atom_nodes = nodes
            atom_edges = messages
            owner_nodes = nodes.index_select(0, owner_atoms) + owner_nodes
            owner_features = messages.index_select(0, owner_edges) + owner_tokens
        return PETFeatures(
            owner_nodes,
            owner_features,
            fc.index_select(0, owner_edges),
            edge_owners,
            owner_atoms,
            weights,
            rotations,
            is_aux,
            True,
            atom_nodes,
            atom_edges,
            fc,
            centers,
            invariant_nodes,
            invariant_edges,
        )


class LayerSubset:
    """The part of a GNN layer that reaches the active atoms (:func:`layer_reach`).

    :param computed: ``(n_atoms,)`` bool, the atoms the layer computes
    :param needed: ``(n_atoms,)`` bool, the atoms whose pair messages the next
        layer (or the heads) read: computed atoms whose neighbors are computed too
    :param centers: ``(n_pairs,)`` sorted centers of all pairs
    :param reverse: ``(n_pairs,)`` index of the reverse pair
    :param log_fc: ``(n_pairs,)`` log of the cutoff factors
    :param max_groups: largest number of groups of the attention layout
    :param with_reverse: whether the layer combines its edge tokens with their
        reverses (:meth:`PET._combines`)

    Attributes: ``atoms`` ``(n_computed,)`` computed atoms; ``pairs`` their pairs
    (indices into all pairs); ``local_centers`` the pairs' centers numbered among
    the computed atoms; ``layout`` their :class:`AttentionLayout`; ``updated`` the
    pairs whose messages are updated (centered on needed atoms); ``own`` and
    ``reversed`` the positions, among the computed pairs, of those pairs and of
    their reverses.
    """

    def __init__(
        self,
        computed: torch.Tensor,
        needed: torch.Tensor,
        centers: torch.Tensor,
        reverse: torch.Tensor,
        log_fc: torch.Tensor,
        max_groups: int,
        with_reverse: bool = True,
    ):
        device = centers.device
        self.atoms, self.pairs, self.local_centers = atoms_and_pairs(computed, centers)
        self.layout = attention_layout(
            self.local_centers,
            log_fc.index_select(0, self.pairs),
            self.atoms.shape[0],
            max_groups,
        )
        position = torch.full_like(centers, -1).index_copy(
            0,
            self.pairs,
            torch.arange(self.pairs.shape[0], dtype=torch.long, device=device),
        )
        self.updated = torch.nonzero(needed.index_select(0, centers)).reshape(-1)
        self.own = position.index_select(0, self.updated)
        # (without the combination with the reverses, their own positions: unread)
        self.reversed = self.own
        if with_reverse:
            self.reversed = position.index_select(
                0, reverse.index_select(0, self.updated)
            )


def atoms_and_pairs(
    mask: torch.Tensor, centers: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The atoms of ``mask`` (``(n_atoms,)`` bool) and their pairs: ``(atoms,
    pairs, local_centers)``, the indices of the atoms, of the pairs centered on
    them (among ``centers``, ``(n_pairs,)``; in order) and those pairs' centers
    numbered among the atoms."""
    atoms = torch.nonzero(mask).reshape(-1)
    pairs = torch.nonzero(mask.index_select(0, centers)).reshape(-1)
    local = torch.full((mask.shape[0],), -1, dtype=torch.long, device=mask.device)
    local = local.index_copy(
        0, atoms, torch.arange(atoms.shape[0], dtype=torch.long, device=mask.device)
    )
    return atoms, pairs, local.index_select(0, centers.index_select(0, pairs))


def layer_reach(
    active: torch.Tensor,
    centers: torch.Tensor,
    neighbors: torch.Tensor,
    n_layers: int,
    reverse_last_layer: bool = False,
) -> List[torch.Tensor]:
    """The atoms each GNN layer must compute for the features of the ``active``
    atoms: ``n_layers + 1`` masks ``(n_atoms,)``, the last being ``active``. The
    heads read the nodes and pair messages of the active atoms; the messages after
    layer ``k`` of the pairs centered on the atoms of mask ``k + 1`` combine the
    layer's edge tokens of those pairs and of their reverses, so layer ``k``
    computes those atoms and their neighbors (mask ``k``): one cutoff more per
    layer, the reach of :attr:`symatomic.model.SymatomicModel.interaction_range`.
    Without ``reverse_last_layer`` the last layer's tokens are not combined: it
    computes the active atoms only.

    :param active: ``(n_atoms,)`` bool
    :param centers: ``(n_pairs,)`` centers (full neighbor list, both directions)
    :param neighbors: ``(n_pairs,)`` neighbors
    :param n_layers: number of GNN layers
    :param reverse_last_layer: whether the last layer combines its tokens with
        their reverses (:attr:`PET.reverse_last_layer`)
    """
    masks: List[torch.Tensor] = [active]
    current = active
    grown_layers = n_layers
    if not reverse_last_layer:
        # the last layer's tokens are read as they are: it computes the active
        # atoms only
        masks.insert(0, active)
        grown_layers = n_layers - 1
    for _ in range(grown_layers):
        grown = current.clone()
        grown[neighbors[current.index_select(0, centers)]] = True
        masks.insert(0, grown)
        current = grown
    return masks


def _average(
    values: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, size: int
) -> torch.Tensor:
    """Weighted sum of per-frame ``values`` into ``size`` rows (the weights of the
    frames of every row sum to one)."""
    return torch.zeros(
        size, values.shape[1], dtype=values.dtype, device=values.device
    ).index_add(0, index, weights * values)


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())
