"""Backbones in one interface: atoms (or ECSE frames) own features the heads read.

:class:`symatomic.pet.PET` is one; :class:`SOAPBackbone` adapts the invariant SOAP
model of :mod:`symatomic.soap` to the same :class:`~symatomic.pet.PETFeatures`.
"""

from typing import Any, Dict, Optional

import torch

from .pet import PETFeatures
from .soap import InvariantScalarModel

__all__ = ["SOAPBackbone"]


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
        active: Optional[torch.Tensor] = None,
    ) -> PETFeatures:
        """Same arguments as :meth:`symatomic.pet.PET.forward`; the features are
        exactly invariant. ``active`` is accepted for the common interface; every
        atom is computed (one layer: the SOAP of the ghosts is cheap)."""
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
