"""Energy + forces time of symatomic's PET against metatrain's PET.

Both models use metatrain's default PET hyper-parameters (d_pet 128, d_node 256,
8 heads, 2 GNN layers x 2 attention layers, cutoff 4.5 Å), float32, and are evaluated
the way MD engines do: as exported metatomic models, neighbor lists precomputed,
forces by ``torch.autograd.grad`` of the energy. Calls alternate between the two
models; the script prints medians and the ratio ours / metatrain (goal: <= 1).

    python benchmarks/pet_speed.py [--repeats 7] [--threads 2]
"""

import argparse
import statistics
import time

import torch
from metatomic.torch import ModelEvaluationOptions, ModelOutput, System
from systems import silicon_512, water_box

import symatomic.io
from symatomic.data.targets import parse_target_options
from symatomic.model import SymatomicModel
from symatomic.pet import PET_SIZE_KEYS


def metatrain_pet(atomic_types, dtype=torch.float32):
    from metatrain.pet import PET
    from metatrain.utils.architectures import get_default_hypers
    from metatrain.utils.data import DatasetInfo
    from metatrain.utils.data.target_info import get_energy_target_info

    hypers = get_default_hypers("pet")["model"]
    target = get_energy_target_info(
        "energy", {"quantity": "energy", "unit": "eV"}, add_position_gradients=True
    )
    info = DatasetInfo(
        length_unit="angstrom", atomic_types=atomic_types, targets={"energy": target}
    )
    return PET(hypers, info).to(dtype).export(), hypers


def symatomic_pet(atomic_types, hypers):
    ours = {key: hypers[key] for key in PET_SIZE_KEYS}
    ours.update(backbone="pet", ecse="none")  # plain PET, as metatrain's
    spec = parse_target_options("energy", {"unit": "eV"}, "")
    model = SymatomicModel(ours, atomic_types, {"energy": spec})
    return model.export()


def energy_and_forces(model, atoms, dtype=torch.float32):
    """A closure computing energy and forces (neighbor list included, as in MD)."""
    options = ModelEvaluationOptions(
        length_unit="angstrom", outputs={"energy": ModelOutput(sample_kind="system")}
    )
    types = torch.tensor(atoms.numbers, dtype=torch.int32)
    cell = torch.tensor(atoms.cell.array, dtype=dtype)
    pbc = torch.tensor(atoms.pbc)

    def run():
        positions = torch.tensor(atoms.positions, dtype=dtype, requires_grad=True)
        system = System(types=types, positions=positions, cell=cell, pbc=pbc)
        symatomic.io.add_neighbor_lists([system], model)
        energy = model([system], options, check_consistency=False)["energy"]
        (forces,) = torch.autograd.grad(energy.block().values.sum(), positions)
        return forces

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"torch {torch.__version__}, {args.threads} threads, float32, energy+forces")
    for name, atoms in [
        ("Si 512 atoms", silicon_512()),
        ("water 648 atoms", water_box()),
    ]:
        types = sorted(set(atoms.numbers.tolist()))
        theirs, hypers = metatrain_pet(types)
        ours = symatomic_pet(types, hypers)
        run_theirs = energy_and_forces(theirs, atoms)
        run_ours = energy_and_forces(ours, atoms)
        for _ in range(2):
            run_theirs()
            run_ours()
        times = {"ours": [], "metatrain": []}
        for _ in range(args.repeats):
            for key, run in (("metatrain", run_theirs), ("ours", run_ours)):
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
        median_ours = statistics.median(times["ours"])
        median_theirs = statistics.median(times["metatrain"])
        n_ours = sum(p.numel() for p in ours.module.parameters())
        n_theirs = sum(p.numel() for p in theirs.module.parameters())
        print(
            f"{name:16s} metatrain PET {median_theirs:.3f} s ({n_theirs} parameters), "
            f"symatomic PET {median_ours:.3f} s ({n_ours} parameters), "
            f"ratio ours/metatrain {median_ours / median_theirs:.2f}"
        )


if __name__ == "__main__":
    main()
