"""Output heads: per-atom predictions from backbone features (pure torch)."""

from typing import Optional

import torch

__all__ = [
    "LAST_LAYER_INIT",
    "DirectHead",
    "PooledHead",
    "pool_pairs",
    "shrink_last_layer",
]


class DirectHead(torch.nn.Module):
    """Unconstrained per-atom head, as in PET.

    ``y_i = W_n · MLP_n(h_i) + Σ_j fc(r_ij) W_e · MLP_e(m_ij)``: a node part and a
    cutoff-weighted sum of edge parts. Spherical components are predicted directly, so
    the output is only as equivariant as the backbone (exactly so under ECSE).

    :param d_node: node feature size
    :param d_edge: edge feature size
    :param d_head: hidden size of the two MLPs
    :param n_outputs: number of outputs per atom (all blocks flattened)
    """

    def __init__(self, d_node: int, d_edge: int, d_head: int, n_outputs: int):
        super().__init__()
        self.node_mlp = torch.nn.Sequential(
            torch.nn.Linear(d_node, d_head),
            torch.nn.SiLU(),
            torch.nn.Linear(d_head, d_head),
            torch.nn.SiLU(),
        )
        self.edge_mlp = torch.nn.Sequential(
            torch.nn.Linear(d_edge, d_head),
            torch.nn.SiLU(),
            torch.nn.Linear(d_head, d_head),
            torch.nn.SiLU(),
        )
        self.node_last = torch.nn.Linear(d_head, n_outputs)
        self.edge_last = torch.nn.Linear(d_head, n_outputs)

    def forward(
        self,
        nodes: torch.Tensor,
        edges: torch.Tensor,
        fc: torch.Tensor,
        centers: torch.Tensor,
        pooled: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        :param nodes: ``(n_atoms, d_node)``
        :param edges: ``(n_pairs, d_edge)``
        :param fc: ``(n_pairs,)`` cutoff factors
        :param centers: ``(n_pairs,)`` center of every pair
        :param pooled: not used (the signature of :class:`PooledHead`, so that the
            two are interchangeable in TorchScript)
        :return: ``(n_atoms, n_outputs)``
        """
        result = self.node_last(self.node_mlp(nodes))
        edge_values = self.edge_last(self.edge_mlp(edges)) * fc.unsqueeze(1)
        return result.index_add(0, centers, edge_values)

    @torch.jit.export
    def last_layer_features(
        self,
        nodes: torch.Tensor,
        edges: torch.Tensor,
        fc: torch.Tensor,
        centers: torch.Tensor,
        pooled: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The inputs ``z_i`` of the last linear layers, ``(n_atoms, 2 d_head + 2)``:
        ``[MLP_n(h_i), 1, Σ_j fc(r_ij) MLP_e(m_ij), Σ_j fc(r_ij)]``, so that the
        output is ``z_i · W`` with ``W`` = :meth:`last_layer_weights` (arguments as
        in :meth:`forward`)."""
        node_part = self.node_mlp(nodes)
        ones = torch.ones_like(node_part[:, :1])
        edge_part = self.edge_mlp(edges)
        edge_part = torch.cat([edge_part, torch.ones_like(edge_part[:, :1])], dim=1)
        pooled = torch.zeros(
            nodes.shape[0], edge_part.shape[1], dtype=nodes.dtype, device=nodes.device
        ).index_add(0, centers, edge_part * fc.unsqueeze(1))
        return torch.cat([node_part, ones, pooled], dim=1)

    def start_small(self) -> None:
        """Shrink the last layers before training (:func:`shrink_last_layer`): the head's
        outputs start small, and the model predicts about its baselines."""
        shrink_last_layer(self.node_last)
        shrink_last_layer(self.edge_last)

    def last_layer_weights(self) -> torch.Tensor:
        """``(2 d_head + 2, n_outputs)``: the weights and biases of the two last
        layers, in the order of :meth:`last_layer_features`."""
        return torch.cat(
            [
                self.node_last.weight.T,
                self.node_last.bias.unsqueeze(0),
                self.edge_last.weight.T,
                self.edge_last.bias.unsqueeze(0),
            ],
            dim=0,
        )


class PooledHead(torch.nn.Module):
    """Per-atom head on the atom features and the cutoff-weighted sum of the pair
    features: ``y_i = MLP([h_i, Σ_j fc(r_ij) e_ij])``.

    Invariant when ``h`` and ``e`` are; the only per-pair work is the sum, so its cost
    does not grow with the number of pairs times the width of the MLP (used for the
    coefficients of the scalar-basis heads, where every tensor target has one).

    :param d_node: node feature size
    :param d_edge: pair feature size
    :param d_head: hidden size of the MLP
    :param n_outputs: number of outputs per atom
    """

    def __init__(self, d_node: int, d_edge: int, d_head: int, n_outputs: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(d_node + d_edge, d_head),
            torch.nn.SiLU(),
            torch.nn.Linear(d_head, d_head),
            torch.nn.SiLU(),
            torch.nn.Linear(d_head, n_outputs),
        )

    def forward(
        self,
        nodes: torch.Tensor,
        edges: torch.Tensor,
        fc: torch.Tensor,
        centers: torch.Tensor,
        pooled: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        :param nodes: ``(n_atoms, d_node)``
        :param edges: ``(n_pairs, d_edge)``
        :param fc: ``(n_pairs,)`` cutoff factors
        :param centers: ``(n_pairs,)`` center of every pair
        :param pooled: optional :func:`pool_pairs` of these pairs (the same for
            every head on the same features: a model computes it once)
        :return: ``(n_atoms, n_outputs)``
        """
        if pooled is None:
            pooled = pool_pairs(nodes.shape[0], edges, fc, centers)
        return self.mlp(torch.cat([nodes, pooled], dim=1))

    @torch.jit.export
    def last_layer_features(
        self,
        nodes: torch.Tensor,
        edges: torch.Tensor,
        fc: torch.Tensor,
        centers: torch.Tensor,
        pooled: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The input of the last linear layer and a column of ones,
        ``(n_atoms, d_head + 1)``: the output is ``z_i · W`` with ``W`` =
        :meth:`last_layer_weights` (arguments as in :meth:`forward`)."""
        if pooled is None:
            pooled = pool_pairs(nodes.shape[0], edges, fc, centers)
        hidden = torch.cat([nodes, pooled], dim=1)
        hidden = self.mlp[1](self.mlp[0](hidden))
        hidden = self.mlp[3](self.mlp[2](hidden))
        return torch.cat([hidden, torch.ones_like(hidden[:, :1])], dim=1)

    def start_small(self) -> None:
        """Shrink the last layer before training (:func:`shrink_last_layer`)."""
        shrink_last_layer(self.mlp[4])

    def last_layer_weights(self) -> torch.Tensor:
        """``(d_head + 1, n_outputs)``: weights and bias of the last layer."""
        last = self.mlp[4]
        return torch.cat([last.weight.T, last.bias.unsqueeze(0)], dim=0)


#: a head's last layers start (:meth:`DirectHead.start_small`) with PyTorch's
#: default weights times this factor and zero biases
LAST_LAYER_INIT = 0.1


def shrink_last_layer(layer: torch.nn.Linear) -> None:
    """Scale a last layer's weights by :data:`LAST_LAYER_INIT` and zero its bias."""
    with torch.no_grad():
        layer.weight.mul_(LAST_LAYER_INIT)
        layer.bias.zero_()


def pool_pairs(
    n_atoms: int, edges: torch.Tensor, fc: torch.Tensor, centers: torch.Tensor
) -> torch.Tensor:
    """``Σ_j fc(r_ij) e_ij`` per atom, ``(n_atoms, d_edge)``.

    :param n_atoms: number of atoms
    :param edges: ``(n_pairs, d_edge)`` pair features
    :param fc: ``(n_pairs,)`` cutoff factors
    :param centers: ``(n_pairs,)`` center of every pair
    """
    return torch.zeros(
        n_atoms, edges.shape[1], dtype=edges.dtype, device=edges.device
    ).index_add(0, centers, edges * fc.unsqueeze(1))
