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
from typing import Any, Dict, Tuple

import torch

from .neighbors import padded_layout
from .smooth import cutoff_function

__all__ = ["PET", "PET_DEFAULT_HYPERS", "check_pet_hypers", "count_parameters"]

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
}

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
        if not isinstance(value, expected) or isinstance(value, bool):
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
    return result


def _norm(kind: str, dim: int) -> torch.nn.Module:
    if kind == "RMSNorm":
        return torch.nn.RMSNorm(dim)
    return torch.nn.LayerNorm(dim)


class FeedForward(torch.nn.Module):
    """Two-layer perceptron, ``(…, d_in) → (…, d_in)``, SwiGLU or SiLU."""

    def __init__(self, d_in: int, d_hidden: int, activation: str):
        super().__init__()
        self.gated = activation == "SwiGLU"
        self.w_in = torch.nn.Linear(d_in, 2 * d_hidden if self.gated else d_hidden)
        self.w_out = torch.nn.Linear(d_hidden, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.gated:
            value, gate = h.chunk(2, dim=-1)
            h = value * torch.nn.functional.silu(gate)
        else:
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
        token_slots: torch.Tensor,
        attention_bias: torch.Tensor,
        n_tokens: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        :param nodes: ``(n_atoms, d_node)``
        :param edges: ``(n_pairs, d_pet)``
        :param token_slots: ``(n_atoms + n_pairs,)`` flat slots of node then edge
            tokens in the ``(n_atoms, n_tokens)`` grid
        :param attention_bias: ``(n_atoms, 1, 1, n_tokens)``: ``log fc`` of real
            tokens, ``-inf`` on padding
        :return: updated ``(nodes, edges)``
        """
        n_atoms = nodes.shape[0]
        node_tokens = self.node_contraction(nodes)
        tokens = torch.cat([node_tokens, edges], dim=0)
        qkv = self.qkv(self.norm_attention(tokens))
        grid = torch.zeros(
            n_atoms * n_tokens, qkv.shape[1], dtype=qkv.dtype, device=qkv.device
        ).index_copy(0, token_slots, qkv)
        grid = grid.view(n_atoms, n_tokens, 3, self.num_heads, self.head_dim)
        grid = grid.permute(2, 0, 3, 1, 4)  # (3, n_atoms, heads, n_tokens, head_dim)
        queries, keys, values = grid[0], grid[1], grid[2]
        scores = torch.matmul(queries, keys.transpose(-1, -2)) * (
            1.0 / math.sqrt(self.head_dim)
        )
        weights = torch.softmax(scores + attention_bias, dim=-1)
        attended = torch.matmul(weights, values)  # (n_atoms, heads, n_tokens, head_dim)
        attended = attended.transpose(1, 2).reshape(n_atoms * n_tokens, self.d_pet)
        attended = self.output(attended.index_select(0, token_slots))

        node_update, edge_update = attended.split([n_atoms, edges.shape[0]], dim=0)
        edges = edges + edge_update
        edges = edges + self.edge_mlp(self.norm_edges(edges))
        nodes = nodes + self.node_expansion(node_update)
        nodes = nodes + self.node_mlp(self.norm_nodes(nodes))
        return nodes, edges


class GNNLayer(torch.nn.Module):
    """One message-passing layer: edge tokens, then ``num_attention_layers`` layers."""

    def __init__(self, hypers: Dict[str, Any], n_species: int, is_first: bool):
        super().__init__()
        d_pet = int(hypers["d_pet"])
        self.edge_embedding = torch.nn.Linear(4, d_pet)
        n_inputs = 2 if is_first else 3
        # the first layer's messages already are neighbor-species embeddings
        self.neighbor_embeddings = torch.nn.ModuleList(
            [] if is_first else [torch.nn.Embedding(n_species, d_pet)]
        )
        self.compress = torch.nn.Sequential(
            torch.nn.Linear(n_inputs * d_pet, d_pet),
            torch.nn.SiLU(),
            torch.nn.Linear(d_pet, d_pet),
        )
        self.attention_layers = torch.nn.ModuleList(
            [AttentionLayer(hypers) for _ in range(int(hypers["num_attention_layers"]))]
        )

    def forward(
        self,
        nodes: torch.Tensor,
        messages: torch.Tensor,
        edge_geometry: torch.Tensor,
        neighbor_species: torch.Tensor,
        token_slots: torch.Tensor,
        attention_bias: torch.Tensor,
        n_tokens: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        :param nodes: ``(n_atoms, d_node)``
        :param messages: ``(n_pairs, d_pet)`` incoming messages
        :param edge_geometry: ``(n_pairs, 4)``: ``(x, y, z, r)`` of the pair vectors
        :param neighbor_species: ``(n_pairs,)`` species index of the neighbors
        :return: updated nodes and the output edge tokens ``(n_pairs, d_pet)``
        """
        parts = [self.edge_embedding(edge_geometry)]
        for embedding in self.neighbor_embeddings:
            parts.append(embedding(neighbor_species))
        parts.append(messages)
        edges = self.compress(torch.cat(parts, dim=1))
        for layer in self.attention_layers:
            nodes, edges = layer(nodes, edges, token_slots, attention_bias, n_tokens)
        return nodes, edges


class PET(torch.nn.Module):
    """PET backbone: atom and pair features from pair vectors and species.

    :param hypers: PET hyper-parameters (see :data:`PET_DEFAULT_HYPERS`)
    :param n_species: number of atomic types
    """

    def __init__(self, hypers: Dict[str, Any], n_species: int):
        super().__init__()
        hypers = check_pet_hypers(hypers)
        self.cutoff = float(hypers["cutoff"])
        self.cutoff_width = float(hypers["cutoff_width"])
        self.d_pet = int(hypers["d_pet"])
        self.d_node = int(hypers["d_node"])
        self.num_gnn_layers = int(hypers["num_gnn_layers"])
        self.node_embedding = torch.nn.Embedding(n_species, self.d_node)
        self.message_embedding = torch.nn.Embedding(n_species, self.d_pet)
        self.gnn_layers = torch.nn.ModuleList(
            [GNNLayer(hypers, n_species, i == 0) for i in range(self.num_gnn_layers)]
        )
        self.combination_norms = torch.nn.ModuleList(
            [torch.nn.LayerNorm(2 * self.d_pet) for _ in range(self.num_gnn_layers)]
        )
        self.combination_mlps = torch.nn.ModuleList(
            [
                torch.nn.Sequential(
                    torch.nn.Linear(2 * self.d_pet, 2 * self.d_pet),
                    torch.nn.SiLU(),
                    torch.nn.Linear(2 * self.d_pet, self.d_pet),
                )
                for _ in range(self.num_gnn_layers)
            ]
        )

    def forward(
        self,
        species: torch.Tensor,
        edge_vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        reverse: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        :param species: ``(n_atoms,)`` int64 species index
        :param edge_vectors: ``(n_pairs, 3)`` pair vectors, pairs sorted by center and
            closer than the cutoff
        :param centers: ``(n_pairs,)`` int64
        :param neighbors: ``(n_pairs,)`` int64
        :param reverse: ``(n_pairs,)`` int64 index of the reverse pair
        :return: ``(nodes, edges, fc)``: node features ``(n_atoms, d_node)``, edge
            features ``(n_pairs, d_pet)`` and the cutoff factors ``(n_pairs,)``
        """
        n_atoms = species.shape[0]
        distances = torch.sqrt((edge_vectors * edge_vectors).sum(dim=1) + 1e-30)
        fc = cutoff_function(distances, self.cutoff, self.cutoff_width)
        edge_geometry = torch.cat([edge_vectors, distances.unsqueeze(1)], dim=1)

        slot, counts, max_neighbors = padded_layout(centers, n_atoms)
        n_tokens = max_neighbors + 1
        # token grid: column 0 is the atom itself, columns 1.. its neighbors
        node_slots = torch.arange(n_atoms, device=species.device) * n_tokens
        edge_slots = slot + centers + 1  # center * n_tokens + rank + 1
        token_slots = torch.cat([node_slots, edge_slots])
        # fc > 0 for every pair inside the cutoff; the clamp only guards underflow
        log_fc = torch.log(fc.clamp(min=1e-30))
        bias = torch.full(
            (n_atoms * n_tokens,),
            -math.inf,
            dtype=edge_vectors.dtype,
            device=species.device,
        )
        bias = bias.index_put(
            (node_slots,), torch.zeros_like(node_slots, dtype=bias.dtype)
        )
        bias = bias.index_put((edge_slots,), log_fc)
        attention_bias = bias.view(n_atoms, 1, 1, n_tokens)

        neighbor_species = species.index_select(0, neighbors)
        nodes = self.node_embedding(species)
        messages = self.message_embedding(neighbor_species)
        for gnn_layer, norm, mlp in zip(
            self.gnn_layers, self.combination_norms, self.combination_mlps
        ):
            nodes, edges = gnn_layer(
                nodes,
                messages,
                edge_geometry,
                neighbor_species,
                token_slots,
                attention_bias,
                n_tokens,
            )
            reversed_edges = edges.index_select(0, reverse)
            messages = (
                messages + edges + mlp(norm(torch.cat([edges, reversed_edges], dim=1)))
            )
        return nodes, messages, fc


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())
