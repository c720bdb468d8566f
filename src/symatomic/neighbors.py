"""Neighbor-pair bookkeeping shared by the data pipeline and the exported model.

Pairs are full neighbor lists (both ``i → j`` and ``j → i``), with integer cell shifts
``S`` such that the pair vector is ``r_j - r_i + S @ cell``. Every function here is
TorchScript-compatible.
"""

from typing import Tuple

import torch

__all__ = ["sort_pairs", "reverse_pair_index", "padded_layout", "pair_vectors"]


def sort_pairs(
    centers: torch.Tensor, neighbors: torch.Tensor, n_atoms: int
) -> torch.Tensor:
    """Permutation sorting pairs by center, then by neighbor (stable otherwise).

    :param centers: ``(n_pairs,)`` int64
    :param neighbors: ``(n_pairs,)`` int64
    :return: ``(n_pairs,)`` int64 permutation
    """
    key = centers * max(n_atoms, 1) + neighbors
    return torch.sort(key, stable=True)[1]


def _encode_pairs(
    first: torch.Tensor,
    second: torch.Tensor,
    shifts: torch.Tensor,
    n_atoms: int,
    offset: int,
) -> torch.Tensor:
    """A unique integer per ``(first, second, shift)`` triple (shifts in ±offset)."""
    width = 2 * offset + 1
    s = shifts + offset
    shift_code = (s[:, 0] * width + s[:, 1]) * width + s[:, 2]
    return (first * n_atoms + second) * (width * width * width) + shift_code


def reverse_pair_index(
    centers: torch.Tensor,
    neighbors: torch.Tensor,
    cell_shifts: torch.Tensor,
    n_atoms: int,
) -> torch.Tensor:
    """Index of the reverse pair ``(j, i, -S)`` of every pair ``(i, j, S)``.

    :param centers: ``(n_pairs,)`` int64
    :param neighbors: ``(n_pairs,)`` int64
    :param cell_shifts: ``(n_pairs, 3)`` integer shifts
    :param n_atoms: number of atoms the indices refer to
    :return: ``(n_pairs,)`` int64; raises if some pair has no reverse (the list was not
        a full neighbor list)
    """
    n_pairs = centers.shape[0]
    if n_pairs == 0:
        return torch.zeros(0, dtype=torch.long, device=centers.device)
    shifts = cell_shifts.to(torch.long)
    offset = int(shifts.abs().max().item())
    n = max(n_atoms, 1)

    keys = _encode_pairs(centers, neighbors, shifts, n, offset)
    reverse_keys = _encode_pairs(neighbors, centers, -shifts, n, offset)
    sorted_keys, order = torch.sort(keys)
    position = torch.searchsorted(sorted_keys, reverse_keys)
    position = position.clamp(max=n_pairs - 1)
    if not bool(torch.all(sorted_keys[position] == reverse_keys)):
        raise ValueError(
            "the neighbor list is not a full list: some pairs i->j have no j->i partner"
        )
    return order[position]


def padded_layout(
    centers: torch.Tensor, n_atoms: int
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Slots of pairs (sorted by center) in a padded ``(n_atoms, max_neighbors)`` grid.

    :param centers: ``(n_pairs,)`` int64, sorted
    :return: ``(slot, counts, max_neighbors)``: ``slot[p]`` is the flat index
        ``center * max_neighbors + k`` of pair ``p`` in the padded grid, ``counts`` the
        number of neighbors of every atom
    """
    counts = torch.zeros(n_atoms, dtype=torch.long, device=centers.device)
    counts.index_add_(0, centers, torch.ones_like(centers))
    max_neighbors = int(counts.max().item()) if n_atoms > 0 else 0
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(centers.shape[0], device=centers.device) - first[centers]
    slot = centers * max_neighbors + rank
    return slot, counts, max_neighbors


def pair_vectors(
    positions: torch.Tensor,
    cells: torch.Tensor,
    system_index: torch.Tensor,
    centers: torch.Tensor,
    neighbors: torch.Tensor,
    cell_shifts: torch.Tensor,
) -> torch.Tensor:
    """Pair vectors ``r_j - r_i + S @ cell`` (differentiable in positions and cells).

    :param positions: ``(n_atoms, 3)``
    :param cells: ``(n_systems, 3, 3)``, cell vectors as rows
    :param system_index: ``(n_atoms,)`` system of every atom
    :param centers: ``(n_pairs,)``
    :param neighbors: ``(n_pairs,)``
    :param cell_shifts: ``(n_pairs, 3)`` integer shifts
    :return: ``(n_pairs, 3)``
    """
    pair_cells = cells.index_select(0, system_index.index_select(0, centers))
    shifts = torch.bmm(
        cell_shifts.to(positions.dtype).unsqueeze(1), pair_cells
    ).squeeze(1)
    return (
        positions.index_select(0, neighbors)
        - positions.index_select(0, centers)
        + shifts
    )
