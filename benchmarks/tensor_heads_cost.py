"""Cost of the tensor outputs: energy + forces alone against energy + forces + μ
(λ=1), α (λ=0, 2) and β (λ=1, 3) on the same backbone, and against metatrain's
SOAP-BPNN with its TensorBasis heads for the same outputs.

Models are exported metatomic models evaluated the way engines do (neighbor lists
included, forces by autograd of the energy, tensor outputs in the same call),
float32, untrained weights (the cost does not depend on them). Calls alternate
between the variants; medians are printed, and the ratio (energy + tensors) /
(energy only) for each backbone (goal: < 1.2).

    python benchmarks/tensor_heads_cost.py [--repeats 7] [--threads 2]
"""

import argparse
import statistics
import time
from typing import Callable, Dict, List

import ase
import torch
from metatomic.torch import ModelEvaluationOptions, ModelOutput, System
from systems import water_box

import symatomic.io
from symatomic.data.targets import parse_target_options
from symatomic.model import SymatomicModel

#: the tensor outputs: name → irreps (all σ = +1)
TENSORS = {
    "mtt::mu": [1],
    "mtt::alpha": [0, 2],
    "mtt::beta": [1, 3],
}

#: our backbones (architecture.model), metatrain's default PET sizes for PET
PET_SIZES = {
    "d_pet": 128,
    "d_node": 256,
    "d_head": 128,
    "d_feedforward": 256,
    "num_heads": 8,
    "num_attention_layers": 2,
    "num_gnn_layers": 2,
}
BACKBONES = {
    "soap, basis heads": {"backbone": "soap"},
    "PET (default), basis heads": dict(PET_SIZES, backbone="pet"),
    "PET+ECSE, basis heads": dict(
        PET_SIZES,
        backbone="pet",
        ecse={"mode": "local", "frame_layers": 1},
        tensor_heads="basis",
    ),
    "PET+ECSE, direct heads": dict(
        PET_SIZES,
        backbone="pet",
        ecse={"mode": "local", "frame_layers": 1},
        tensor_heads="direct",
    ),
    "PET, basis heads": dict(
        PET_SIZES, backbone="pet", ecse="none", tensor_heads="basis"
    ),
}


def _irreps(lambdas: List[int]) -> List[Dict[str, int]]:
    return [{"o3_lambda": lam, "o3_sigma": 1} for lam in lambdas]


def ours(model_hypers: Dict, types: List[int], with_tensors: bool):
    specs = {"energy": parse_target_options("energy", {"unit": "eV"}, "")}
    if with_tensors:
        for name, lambdas in TENSORS.items():
            specs[name] = parse_target_options(
                name, {"type": {"spherical": {"irreps": _irreps(lambdas)}}}, ""
            )
    return SymatomicModel(model_hypers, types, specs).export()


def metatrain_soap_bpnn(types: List[int]):
    from metatrain.soap_bpnn import SoapBpnn
    from metatrain.utils.architectures import get_default_hypers
    from metatrain.utils.data import DatasetInfo
    from metatrain.utils.data.target_info import (
        get_energy_target_info,
        get_generic_target_info,
    )

    targets = {
        "energy": get_energy_target_info(
            "energy", {"quantity": "energy", "unit": "eV"}, add_position_gradients=True
        )
    }
    for name, lambdas in TENSORS.items():
        # metatrain's SOAP-BPNN takes one irrep per spherical target
        for lam in lambdas:
            full = f"{name}_l{lam}"
            targets[full] = get_generic_target_info(
                full,
                {
                    "quantity": "",
                    "unit": "",
                    "type": {"spherical": {"irreps": _irreps([lam])}},
                    "sample_kind": "system",
                    "num_subtargets": 1,
                },
            )
    info = DatasetInfo(length_unit="angstrom", atomic_types=types, targets=targets)
    hypers = get_default_hypers("soap_bpnn")["model"]
    return SoapBpnn(hypers, info).export()


def evaluation(model, atoms: ase.Atoms, with_tensors: bool) -> Callable[[], None]:
    """A closure: energy, forces and (optionally) every other output of ``model``."""
    names = ["energy"]
    if with_tensors:
        names += [
            n
            for n in model.capabilities().outputs
            if n != "energy"
            and n not in ("feature", "features")
            and not n.startswith("mtt::aux::")
        ]
    options = ModelEvaluationOptions(
        length_unit="angstrom",
        outputs={name: ModelOutput(sample_kind="system") for name in names},
    )
    types = torch.tensor(atoms.numbers, dtype=torch.int32)
    cell = torch.tensor(atoms.cell.array, dtype=torch.float32)
    pbc = torch.tensor(atoms.pbc)

    def run() -> None:
        positions = torch.tensor(
            atoms.positions, dtype=torch.float32, requires_grad=True
        )
        system = System(types=types, positions=positions, cell=cell, pbc=pbc)
        symatomic.io.add_neighbor_lists([system], model)
        outputs = model([system], options, check_consistency=False)
        torch.autograd.grad(outputs["energy"].block().values.sum(), positions)
        for name in names[1:]:
            for block in outputs[name].blocks():
                block.values.detach()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-side", type=int, default=6, help="water box: n³ molecules")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    atoms = water_box(args.n_side)
    types = sorted(set(atoms.numbers.tolist()))
    runs: Dict[str, Callable[[], None]] = {}
    for name, hypers in BACKBONES.items():
        runs[f"{name} | energy"] = evaluation(ours(hypers, types, False), atoms, False)
        runs[f"{name} | +tensors"] = evaluation(ours(hypers, types, True), atoms, True)
    try:
        theirs = metatrain_soap_bpnn(types)
        runs["metatrain SOAP-BPNN | energy"] = evaluation(theirs, atoms, False)
        runs["metatrain SOAP-BPNN | +tensors"] = evaluation(theirs, atoms, True)
    except ImportError as error:
        print(f"metatrain SOAP-BPNN skipped: {error}")

    for run in runs.values():  # warm-up (TorchScript profiling runs)
        run()
        run()
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}

    print(
        f"water box, {len(atoms)} atoms, {args.threads} threads, float32, "
        f"medians of {args.repeats}; energy + forces, then with μ, α, β as well"
    )
    print(f"{'backbone':30s} {'energy (s)':>11s} {'+tensors (s)':>13s} {'ratio':>6s}")
    for name in list(BACKBONES) + ["metatrain SOAP-BPNN"]:
        if f"{name} | energy" not in medians:
            continue
        energy = medians[f"{name} | energy"]
        full = medians[f"{name} | +tensors"]
        print(f"{name:30s} {energy:11.3f} {full:13.3f} {full / energy:6.2f}")
    if "metatrain SOAP-BPNN | +tensors" in medians:
        reference = medians["metatrain SOAP-BPNN | +tensors"]
        for name in BACKBONES:
            ratio = medians[f"{name} | +tensors"] / reference
            print(
                f"{name:30s} with tensors / metatrain SOAP-BPNN with tensors: {ratio:.2f}"
            )


if __name__ == "__main__":
    main()
