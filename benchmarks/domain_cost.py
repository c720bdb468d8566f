"""One LAMMPS rank, emulated: what a domain of side L costs against the work its own
atoms take in a periodic run.

metatomic's LAMMPS interface hands every MPI rank a System of its own atoms (a cubic
domain of side L) plus every atom within the model's declared ``interaction_range``
(ghosts, the box-shaped region LAMMPS exchanges), with ``selected_atoms`` naming its
own. Here the domain is cut from a periodic water box (1 g/cm³; the ghost region may
wrap around the box, as in LAMMPS), and for every model (untrained, float32, energy +
forces by autograd, neighbor lists inside the timed call, calls alternating) the
script prints, for L = 8, 12, 16 Å:

* atoms per rank / local atoms;
* the rank's time / the local atoms' share of one periodic evaluation of the whole
  box (time per atom of the box x local atoms) — for symatomic both with every atom
  of the rank computed (``selected_atoms`` not given: what the model did before it
  computed only what reaches the selected atoms) and as an engine calls it;
* atoms each GNN layer computes / local atoms (symatomic, :func:`layer_reach`);
* the error of the rank's energy (the sum over its own atoms) against the same
  atoms' energies in the periodic run.

and, on paper (atom counts only, from the same model's layer reach), the same
ratios for larger domains (L = 30 Å), which do not fit in memory here.

    python benchmarks/domain_cost.py [--sides 8 12 16] [--box 10] [--repeats 3]
        [--threads 1] [--paper 30]
"""

import argparse
import math
from typing import Callable, Dict, List, Optional, Tuple

import ase
import numpy as np
import torch
from ecse_cost import time_models
from metatensor.torch import Labels
from metatomic.torch import ModelEvaluationOptions, ModelOutput, System
from pet_speed import metatrain_pet
from systems import water_box
from training import load

import symatomic.io
from symatomic.data.targets import parse_target_options
from symatomic.model import SymatomicModel
from symatomic.neighbors import sort_pairs
from symatomic.pet import layer_reach


def ours(types: List[int]):
    """The default model (exported), energy only, non-trivial outputs (the
    composition baseline would hide the model)."""
    spec = {"energy": parse_target_options("energy", {"unit": "eV"}, "")}
    torch.manual_seed(0)
    model = SymatomicModel({}, types, spec)
    model.readouts["energy"].scale.fill_(1.0)
    return model, model.export()


def domain(
    atoms: ase.Atoms, side: float, reach: float
) -> Tuple[np.ndarray, np.ndarray, int]:
    """The atoms of a rank whose domain is ``[0, side)³`` of the periodic box: its
    own atoms first, then every periodic image within ``reach`` of the domain (box
    region ``[-reach, side + reach)³``).

    :return: numbers, positions, number of local atoms
    """
    box = atoms.cell.array.diagonal()
    positions = atoms.get_positions(wrap=True)
    images = int(math.ceil(reach / box.min())) + 1
    local_numbers, local_positions = [], []
    ghost_numbers, ghost_positions = [], []
    for shift in np.ndindex(*(2 * images + 1,) * 3):
        offset = (np.array(shift) - images) * box
        moved = positions + offset
        inside = np.all((moved >= -reach) & (moved < side + reach), axis=1)
        own = np.all((moved >= 0) & (moved < side), axis=1)
        local_numbers.append(atoms.numbers[own])
        local_positions.append(moved[own])
        ghost = inside & ~own
        ghost_numbers.append(atoms.numbers[ghost])
        ghost_positions.append(moved[ghost])
    numbers = np.concatenate(local_numbers + ghost_numbers)
    coordinates = np.concatenate(local_positions + ghost_positions)
    return numbers, coordinates, sum(len(n) for n in local_numbers)


def local_indices(atoms: ase.Atoms, side: float) -> np.ndarray:
    positions = atoms.get_positions(wrap=True)
    return np.nonzero(np.all((positions >= 0) & (positions < side), axis=1))[0]


def evaluation(
    model,
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray,
    periodic: bool,
    selected: Optional[int],
    per_atom: bool,
) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
    """A closure: energy (per atom or summed over the selected atoms) and forces,
    neighbor lists inside the call."""
    dtype = torch.float32
    selected_atoms = None
    if selected is not None:
        selected_atoms = Labels(
            ["system", "atom"],
            torch.stack(
                [torch.zeros(selected, dtype=torch.int32), torch.arange(selected)],
                dim=1,
            ).to(torch.int32),
        )
    options = ModelEvaluationOptions(
        length_unit="angstrom",
        outputs={"energy": ModelOutput(sample_kind="atom" if per_atom else "system")},
        selected_atoms=selected_atoms,
    )
    types = torch.tensor(numbers, dtype=torch.int32)
    cell_tensor = torch.tensor(cell, dtype=dtype)
    pbc = torch.tensor([periodic] * 3)

    def run():
        coordinates = torch.tensor(positions, dtype=dtype, requires_grad=True)
        system = System(types=types, positions=coordinates, cell=cell_tensor, pbc=pbc)
        symatomic.io.add_neighbor_lists([system], model)
        energy = model([system], options, check_consistency=False)["energy"]
        values = energy.block().values
        (forces,) = torch.autograd.grad(-values.sum(), coordinates)
        return values.detach().reshape(-1), forces

    return run


def reach_counts(
    model: SymatomicModel, numbers: np.ndarray, positions: np.ndarray, n_local: int
) -> List[int]:
    """Atoms each GNN layer computes for the first ``n_local`` atoms (a
    non-periodic rank System)."""
    from vesin import NeighborList

    cutoff = model.cutoff
    i, j = NeighborList(cutoff=cutoff, full_list=True).compute(
        points=positions, box=np.zeros((3, 3)), periodic=False, quantities="ij"
    )
    centers = torch.tensor(i, dtype=torch.long)
    neighbors = torch.tensor(j, dtype=torch.long)
    order = sort_pairs(centers, neighbors, len(numbers))
    active = torch.zeros(len(numbers), dtype=torch.bool)
    active[:n_local] = True
    masks = layer_reach(
        active,
        centers[order],
        neighbors[order],
        model.backbone.num_gnn_layers,
        model.backbone.reverse_last_layer,
    )
    return [int(mask.sum()) for mask in masks[:-1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=float, nargs="+", default=[8.0, 12.0, 16.0])
    parser.add_argument("--box", type=int, default=10, help="molecules per side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--paper", type=float, nargs="*", default=[30.0, 50.0])
    parser.add_argument("--skip-metatrain", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(load(), "before")
    atoms = water_box(n_side=args.box)
    types = sorted(set(int(z) for z in atoms.numbers))
    module, model = ours(types)
    models = {"symatomic default": model}
    if not args.skip_metatrain:
        models["metatrain PET"] = metatrain_pet(types)[0]
    box = atoms.cell.array
    print(
        f"periodic water box: {len(atoms)} atoms, {box[0, 0]:.1f} Å; "
        f"{args.threads} thread(s), float32, energy + forces, medians of "
        f"{args.repeats}"
    )
    periodic: Dict[str, Tuple[np.ndarray, float]] = {}
    runs = {
        name: evaluation(m, atoms.numbers, atoms.positions, box, True, None, True)
        for name, m in models.items()
    }
    seconds = time_models(runs, args.repeats)
    for name, run in runs.items():
        periodic[name] = (run()[0].numpy().astype(np.float64), seconds[name])
        print(
            f"  {name}: {1e6 * seconds[name] / len(atoms):,.0f} µs/atom periodic, "
            f"interaction range {models[name].capabilities().interaction_range} Å"
        )
    header = (
        f"{'model':22s} {'L (Å)':>6s} {'local':>6s} {'rank/local atoms':>17s} "
        f"{'time/local share':>17s} {'all computed':>13s} {'per layer':>16s} "
        f"{'|ΔE| (eV)':>10s}"
    )
    print(header)
    for side in args.sides:
        local = local_indices(atoms, side)
        for name, exported in models.items():
            reach = exported.capabilities().interaction_range
            numbers, positions, n_local = domain(atoms, side, reach)
            assert n_local == len(local)
            zero = np.zeros((3, 3))
            functions = {
                "rank": evaluation(
                    exported, numbers, positions, zero, False, n_local, False
                )
            }
            if name == "symatomic default":
                functions["all"] = evaluation(
                    exported, numbers, positions, zero, False, None, False
                )
            seconds = time_models(functions, args.repeats)
            energy = float(functions["rank"]()[0].sum())
            per_atom, periodic_seconds = periodic[name]
            share = periodic_seconds / len(atoms) * n_local
            error = abs(energy - per_atom[local].sum())
            layers = ""
            everything = ""
            if name == "symatomic default":
                counts = reach_counts(module, numbers, positions, n_local)
                layers = " ".join(f"{c / n_local:.1f}" for c in counts)
                everything = f"{seconds['all'] / share:.1f}x"
            print(
                f"{name:22s} {side:6.0f} {n_local:6d} "
                f"{len(numbers) / n_local:16.1f}x {seconds['rank'] / share:16.1f}x "
                f"{everything:>13s} {layers:>16s} {error:10.2e}"
            )
    if args.paper:
        print("on paper (atom counts of the layer reach, symatomic default):")
        reach = model.capabilities().interaction_range
        for side in args.paper:
            n_side = int(math.ceil((side + 2 * reach) / box[0, 0] * args.box)) + 1
            large = water_box(n_side=n_side)
            numbers, positions, n_local = domain(large, side, reach)
            counts = reach_counts(module, numbers, positions, n_local)
            computed = sum(counts) / len(counts)
            print(
                f"  L = {side:.0f} Å: {n_local} local atoms, rank/local atoms "
                f"{len(numbers) / n_local:.1f}x, computed per layer "
                + " ".join(f"{c / n_local:.2f}x" for c in counts)
                + f" (mean {computed / n_local:.2f}x)"
            )
    print(load(), "after")


if __name__ == "__main__":
    main()
