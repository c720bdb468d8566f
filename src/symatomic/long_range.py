"""Long-range electrostatics: learned charges, their Coulomb potential, and features.

The ``long_range`` option of ``architecture.model`` (metatrain's names: ``enable``,
``use_ewald``, ``smearing``, ``kspace_resolution``, ``interpolation_nodes``; ours:
``num_charges``). After the backbone, every atom gets ``C`` invariant "charges"
``q_i = W h_i`` from its invariant features, their potential

    φ_i = Σ_j q_j [v_LR(r_ij) − f_cut(r_ij) v_LR(r_ij)]   (all periodic images),

the smooth long-range part of ``1/r`` (Gaussian smearing σ = ``smearing``) with the
part inside the model's cutoff switched off (torch-pme's ``exclusion_radius``, which
the local model describes), by Ewald summation or P3M for periodic systems and by
a direct sum over all pairs for molecules; then ``MLP([φ_i, q_i φ_i])`` is added to
the atom features every head reads. ``q_i φ_i`` are the atoms' electrostatic
energies (per channel), so an energy head reaches the Coulomb energy linearly.

Charges are invariant, and so are φ (for a periodic system, when positions and cell
rotate together: Ewald's k-vectors and P3M's mesh follow the cell): the features stay
exactly invariant and every output keeps the model's symmetry. The model becomes
non-local: exported models declare an infinite interaction range.

torch-pme is an optional dependency (``pip install symatomic[long-range]``).
"""

import json
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = [
    "EWALD_AUTO_ATOMS",
    "LONG_RANGE_DEFAULTS",
    "LongRange",
    "NoLongRange",
    "SystemGeometry",
    "canonical_orientation",
    "check_long_range_options",
    "make_long_range",
]

#: with ``use_ewald: auto``, structures with fewer atoms use Ewald summation, the
#: others P3M (``benchmarks/long_range.py``: Ewald's long-range part costs ~N^1.6
#: per structure and P3M's ~N^0.8 plus a fixed overhead; they cross near 125
#: atoms; the two agree to 2e-4 relative at the default resolution)
EWALD_AUTO_ATOMS = 128

#: defaults of ``architecture.model.long_range``
LONG_RANGE_DEFAULTS: Dict[str, Any] = {
    "enable": False,
    "use_ewald": "auto",
    "smearing": 1.4,
    "kspace_resolution": 1.33,
    "interpolation_nodes": 5,
    "num_charges": 8,
}


def check_long_range_options(options: Any, where: str) -> Dict[str, Any]:
    """Validate ``architecture.model.long_range`` and fill its defaults.

    :param options: the mapping given (or ``None``)
    :param where: where the options come from, for the error messages
    """
    if options is None:
        options = {}
    if isinstance(options, bool):
        options = {"enable": options}
    if not isinstance(options, dict):
        raise ValueError(f"{where} must be a mapping, got {options!r}")
    unknown = sorted(set(options) - set(LONG_RANGE_DEFAULTS))
    if unknown:
        raise ValueError(
            f"{where}: unknown option(s) {unknown}; known: {sorted(LONG_RANGE_DEFAULTS)}"
        )
    result = dict(LONG_RANGE_DEFAULTS)
    result.update(options)
    if not isinstance(result["enable"], bool):
        raise ValueError(
            f"{where}.enable must be true or false, got {result['enable']!r}"
        )
    if not isinstance(result["use_ewald"], bool) and result["use_ewald"] != "auto":
        raise ValueError(
            f"{where}.use_ewald must be true, false or auto, got "
            f"{result['use_ewald']!r}"
        )
    for key in ("smearing", "kspace_resolution"):
        value = result[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}.{key} must be a number, got {value!r}")
        if not value > 0:
            raise ValueError(f"{where}.{key} must be positive, got {value}")
        result[key] = float(value)
    for key, minimum in (("interpolation_nodes", 3), ("num_charges", 1)):
        value = result[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}.{key} must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"{where}.{key} must be at least {minimum}, got {value}")
    if result["interpolation_nodes"] > 7:
        raise ValueError(
            f"{where}.interpolation_nodes must be between 3 and 7 (P3M's orders), "
            f"got {result['interpolation_nodes']}"
        )
    if result["enable"]:
        try:
            import torchpme  # noqa: F401
        except ImportError as error:
            raise ValueError(
                f"{where}.enable needs torch-pme: pip install 'symatomic[long-range]' "
                "(or torch-pme)"
            ) from error
    return result


class SystemGeometry:
    """What the long-range part needs beyond the pairs: positions and cells.

    :param positions: ``(n_atoms, 3)`` in Å (differentiable for forces)
    :param cells: ``(n_systems, 3, 3)``, cell vectors as rows (differentiable for
        stress)
    :param pbc: ``(n_systems, 3)`` periodic directions
    :param system_index: ``(n_atoms,)`` structure of every atom (atoms of a
        structure contiguous)
    """

    def __init__(
        self,
        positions: torch.Tensor,
        cells: torch.Tensor,
        pbc: torch.Tensor,
        system_index: torch.Tensor,
    ):
        self.positions = positions
        self.cells = cells
        self.pbc = pbc
        self.system_index = system_index


def canonical_orientation(
    positions: torch.Tensor, cell: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions ``(n, 3)`` and cell ``(3, 3)`` (rows) rotated so that the cell is
    lower triangular with a positive diagonal (``a`` along x, ``b`` in the xy
    plane; LAMMPS' convention). The result is the same for every rotation and
    inversion of the input (to rounding): ``cellᵀ = Q R`` with ``diag(R) > 0`` is
    unique, and a rotation ``U`` of the input only changes ``Q`` to ``U Q``.
    Differentiable (forces and stress)."""
    q, r = torch.linalg.qr(cell.transpose(0, 1))
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(cell.dtype)
    q = q * signs.reshape(1, 3)
    r = r * signs.reshape(3, 1)
    return positions @ q, r.transpose(0, 1)


class NoLongRange(torch.nn.Module):
    """Stand-in when ``long_range.enable`` is false (TorchScript needs a module with
    the same interface): adds nothing."""

    def __init__(self):
        super().__init__()
        self.enabled: bool = False

    def forward(
        self,
        atom_nodes: torch.Tensor,
        geometry: Optional[SystemGeometry],
        edge_vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
    ) -> torch.Tensor:
        """Zeros like ``atom_nodes`` (arguments as :meth:`LongRange.forward`)."""
        return torch.zeros_like(atom_nodes)


class LongRange(torch.nn.Module):
    """Long-range features of the atoms from their invariant features.

    :param options: checked ``long_range`` options
    :param d_node: size of the atom features
    :param cutoff: cutoff of the local model (Å): the exclusion radius of the
        potential, and the pairs the real-space part of Ewald/P3M uses
    """

    def __init__(self, options: Dict[str, Any], d_node: int, cutoff: float):
        super().__init__()
        from torchpme import (
            Calculator,
            CoulombPotential,
            EwaldCalculator,
            P3MCalculator,
        )

        self.enabled: bool = True
        # what __deepcopy__ rebuilds from (a string: TorchScript types it)
        self._construction = json.dumps([options, d_node, cutoff])
        use_ewald = options["use_ewald"]
        #: structures with fewer atoms use Ewald, the others P3M
        self.ewald_below: int = (
            EWALD_AUTO_ATOMS if use_ewald == "auto" else (2**62 if use_ewald else 0)
        )
        n_charges = int(options["num_charges"])
        smearing = float(options["smearing"])
        resolution = float(options["kspace_resolution"])
        self.ewald = EwaldCalculator(
            potential=CoulombPotential(smearing=smearing, exclusion_radius=cutoff),
            lr_wavelength=resolution,
            full_neighbor_list=True,
        )
        self.p3m = P3MCalculator(
            potential=CoulombPotential(smearing=smearing, exclusion_radius=cutoff),
            mesh_spacing=resolution,
            interpolation_nodes=int(options["interpolation_nodes"]),
            full_neighbor_list=True,
        )
        # molecules: all pairs once (a half list), 1/r outside the cutoff
        self.direct = Calculator(
            potential=CoulombPotential(smearing=None, exclusion_radius=cutoff),
            full_neighbor_list=False,
        )
        self.charges = torch.nn.Linear(d_node, n_charges)
        self.projection = torch.nn.Sequential(
            torch.nn.Linear(2 * n_charges, d_node),
            torch.nn.SiLU(),
            torch.nn.Linear(d_node, d_node),
        )

    def __deepcopy__(self, memo: Dict[int, Any]) -> "LongRange":
        # torch-pme's P3M keeps the mesh and k-vectors of the last call as plain
        # attributes (part of that call's autograd graph, which deepcopy refuses):
        # a copy is a fresh module with the same parameters
        options, d_node, cutoff = json.loads(self._construction)
        parameter = self.charges.weight
        copy = LongRange(options, d_node, cutoff).to(
            device=parameter.device, dtype=parameter.dtype
        )
        copy.load_state_dict(self.state_dict())
        copy.train(self.training)
        memo[id(self)] = copy
        return copy

    def potential(
        self,
        charges: torch.Tensor,
        geometry: SystemGeometry,
        edge_vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
    ) -> torch.Tensor:
        """The long-range potential ``(n_atoms, C)`` of the charges ``(n_atoms, C)``
        (in e/Å for unit charges), one system at a time; pairs (sorted by center,
        full list within the cutoff) serve the real-space part of periodic
        systems."""
        n_systems = geometry.cells.shape[0]
        counts = torch.bincount(geometry.system_index, minlength=n_systems)
        pair_counts = torch.bincount(
            geometry.system_index.index_select(0, centers), minlength=n_systems
        )
        distances = torch.linalg.vector_norm(edge_vectors, dim=1)
        atom_counts: List[int] = counts.tolist()
        pair_sizes: List[int] = pair_counts.tolist()
        periodic_of: List[List[bool]] = geometry.pbc.tolist()
        potentials: List[torch.Tensor] = []
        first_atom = 0
        first_pair = 0
        for index in range(n_systems):
            n_atoms = atom_counts[index]
            n_pairs = pair_sizes[index]
            system_charges = charges[first_atom : first_atom + n_atoms]
            positions = geometry.positions[first_atom : first_atom + n_atoms]
            cell = geometry.cells[index]
            n_periodic = 0
            for flag in periodic_of[index]:
                if flag:
                    n_periodic += 1
            if n_periodic == 0:
                pairs = torch.combinations(
                    torch.arange(n_atoms, device=positions.device), 2
                )
                pair_distances = torch.linalg.vector_norm(
                    positions.index_select(0, pairs[:, 1])
                    - positions.index_select(0, pairs[:, 0]),
                    dim=1,
                )
                potential = self.direct(
                    charges=system_charges,
                    cell=cell,
                    positions=positions,
                    neighbor_indices=pairs,
                    neighbor_distances=pair_distances,
                )
            elif n_periodic == 1:
                raise ValueError(
                    "long range: structure "
                    + str(index)
                    + " is periodic in one direction only; Ewald and P3M need "
                    "two or three periodic directions (or none)"
                )
            else:
                pairs = torch.stack(
                    [
                        centers[first_pair : first_pair + n_pairs] - first_atom,
                        neighbors[first_pair : first_pair + n_pairs] - first_atom,
                    ],
                    dim=1,
                )
                pair_distances = distances[first_pair : first_pair + n_pairs]
                periodic = geometry.pbc[index]
                # P3M's mesh kernel is not rotation-covariant: evaluate both
                # methods in the cell's own orientation (exactly invariant)
                positions, cell = canonical_orientation(positions, cell)
                if n_atoms < self.ewald_below:
                    potential = self.ewald(
                        charges=system_charges,
                        cell=cell,
                        positions=positions,
                        neighbor_indices=pairs,
                        neighbor_distances=pair_distances,
                        periodic=periodic,
                    )
                else:
                    potential = self.p3m(
                        charges=system_charges,
                        cell=cell,
                        positions=positions,
                        neighbor_indices=pairs,
                        neighbor_distances=pair_distances,
                        periodic=periodic,
                    )
            potentials.append(potential)
            first_atom += n_atoms
            first_pair += n_pairs
        return torch.cat(potentials)

    def forward(
        self,
        atom_nodes: torch.Tensor,
        geometry: Optional[SystemGeometry],
        edge_vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
    ) -> torch.Tensor:
        """Long-range features ``(n_atoms, d_node)``, to add to the atom features.

        :param atom_nodes: ``(n_atoms, d_node)`` invariant atom features
        :param geometry: positions and cells of the structures
        :param edge_vectors: ``(n_pairs, 3)`` pair vectors (Å), sorted by center
        :param centers: ``(n_pairs,)``
        :param neighbors: ``(n_pairs,)``
        """
        if geometry is None:
            raise ValueError(
                "this model has a long-range part: it needs the positions and cells "
                "of the structures (geometry)"
            )
        charges = self.charges(atom_nodes)
        potential = self.potential(charges, geometry, edge_vectors, centers, neighbors)
        return self.projection(torch.cat([potential, charges * potential], dim=1))


def make_long_range(
    options: Dict[str, Any], d_node: int, cutoff: float
) -> torch.nn.Module:
    """:class:`LongRange` when ``options["enable"]``, else :class:`NoLongRange`."""
    if options["enable"]:
        return LongRange(options, d_node, cutoff)
    return NoLongRange()
