"""Peers timed next to symatomic: metatrain's PET and MACE (mace-torch).

mace-torch is a benchmark-only peer: install it next to symatomic in a benchmark
environment (``pip install torch==2.13.0 mace-torch``); with torch 2.13 its e3nn
needs ``torch.serialization.add_safe_globals([slice])``, done here.
"""

import copy
import math
import time
from typing import Callable, List, Optional

import ase
import numpy as np
import torch

#: MACE-small: ScaleShiftMACE, 128x0e hidden, r_max 5 Å, 2 interactions, max_ell 3,
#: correlation 3, 8 Bessel functions, radial MLP [64, 64, 64]
MACE_SMALL = {
    "hidden_irreps": "128x0e",
    "r_max": 5.0,
    "num_interactions": 2,
    "max_ell": 3,
    "correlation": 3,
    "num_bessel": 8,
    "radial_MLP": [64, 64, 64],
}


def mace_available() -> Optional[str]:
    """``None`` when mace-torch imports, else the reason it does not."""
    try:
        torch.serialization.add_safe_globals([slice])
        import mace.modules  # noqa: F401
    except Exception as error:  # pragma: no cover - depends on the environment
        return f"mace-torch is not installed ({error.__class__.__name__}: {error})"
    return None


def mace_model(
    atomic_numbers: List[int], dtype: torch.dtype = torch.float32, **changes
) -> torch.nn.Module:
    """An untrained ScaleShiftMACE with the :data:`MACE_SMALL` settings."""
    torch.serialization.add_safe_globals([slice])
    from e3nn import o3
    from mace import modules

    settings = dict(MACE_SMALL, **changes)
    torch.manual_seed(0)
    model = modules.ScaleShiftMACE(
        r_max=settings["r_max"],
        num_bessel=settings["num_bessel"],
        num_polynomial_cutoff=5,
        max_ell=settings["max_ell"],
        interaction_cls=modules.interaction_classes[
            "RealAgnosticResidualInteractionBlock"
        ],
        interaction_cls_first=modules.interaction_classes[
            "RealAgnosticResidualInteractionBlock"
        ],
        num_interactions=settings["num_interactions"],
        num_elements=len(atomic_numbers),
        hidden_irreps=o3.Irreps(settings["hidden_irreps"]),
        MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.zeros(len(atomic_numbers)),
        avg_num_neighbors=30.0,
        atomic_numbers=list(atomic_numbers),
        correlation=settings["correlation"],
        gate=torch.nn.functional.silu,
        radial_MLP=settings["radial_MLP"],
        atomic_inter_scale=1.0,
        atomic_inter_shift=0.0,
    )
    return model.to(dtype).eval()


def mace_energy_and_forces(
    model: torch.nn.Module, atoms: ase.Atoms
) -> Callable[[], torch.Tensor]:
    """A closure computing energy and forces with MACE, its neighbor list (built
    by mace's own data pipeline, as its ASE calculator does) inside the call."""
    from mace import data as mace_data
    from mace.tools import torch_geometric, utils

    dtype = next(model.parameters()).dtype
    z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
    r_max = float(model.r_max)

    def run() -> torch.Tensor:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            config = mace_data.config_from_atoms(atoms)
            graph = mace_data.AtomicData.from_config(
                config, z_table=z_table, cutoff=r_max
            )
        finally:
            torch.set_default_dtype(previous)
        loader = torch_geometric.dataloader.DataLoader(
            [graph], batch_size=1, shuffle=False
        )
        batch = next(iter(loader)).to_dict()
        output = model(batch, compute_force=True, training=False)
        return output["forces"]

    return run


def reference_energy(atoms: ase.Atoms) -> float:
    """The reference energy of a structure read from extended XYZ (ASE keeps it in
    ``info`` or in a single-point calculator)."""
    if "energy" in atoms.info:
        return float(atoms.info["energy"])
    return float(atoms.get_potential_energy())


def reference_forces(atoms: ase.Atoms) -> np.ndarray:
    """The reference forces ``(n_atoms, 3)`` of a structure (``arrays`` or
    calculator)."""
    if "forces" in atoms.arrays:
        return np.asarray(atoms.arrays["forces"])
    return np.asarray(atoms.get_forces())


def _with_references(atoms: ase.Atoms) -> ase.Atoms:
    copy_ = atoms.copy()
    copy_.calc = None
    copy_.info["REF_energy"] = reference_energy(atoms)
    copy_.arrays["REF_forces"] = reference_forces(atoms)
    return copy_


def _mace_graphs(frames: List[ase.Atoms], z_table, r_max: float) -> list:
    from mace import data as mace_data

    keys = mace_data.KeySpecification(
        info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"}
    )
    graphs = []
    for atoms in frames:
        atoms = _with_references(atoms)
        config = mace_data.config_from_atoms(atoms, key_specification=keys)
        graphs.append(
            mace_data.AtomicData.from_config(config, z_table=z_table, cutoff=r_max)
        )
    return graphs


def train_mace(
    train: List[ase.Atoms],
    validation: List[ase.Atoms],
    seconds: float,
    batch_size: int = 5,
    learning_rate: float = 0.01,
    forces_weight: float = 100.0,
    seed: int = 0,
    clock: Callable[[], float] = time.monotonic,
):
    """Train a :data:`MACE_SMALL` model on energies and forces for ``seconds``
    (float32, one process): per-species energies by least squares, MACE's scale and
    shift from the training set, its weighted energy (per atom) + forces loss, Adam
    (amsgrad) with a cosine decay over the epochs that fit (planned after the first
    epoch), the epoch with the lowest validation loss kept.

    :return: the model (eval mode) and ``{"epochs": …, "history": […]}``
    """
    torch.serialization.add_safe_globals([slice])
    from e3nn import o3
    from mace import modules
    from mace.modules.loss import WeightedEnergyForcesLoss
    from mace.tools import torch_geometric, utils

    start = clock()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(seed)
        numbers = sorted({int(z) for atoms in train for z in atoms.numbers})
        z_table = utils.AtomicNumberTable(numbers)
        counts = np.array(
            [[np.sum(atoms.numbers == z) for z in numbers] for atoms in train]
        )
        energies = np.array([reference_energy(atoms) for atoms in train])
        atomic_energies = np.linalg.lstsq(counts, energies, rcond=None)[0]
        r_max = MACE_SMALL["r_max"]
        train_graphs = _mace_graphs(train, z_table, r_max)
        validation_graphs = _mace_graphs(validation, z_table, r_max)
        loader = torch_geometric.dataloader.DataLoader(
            train_graphs, batch_size=batch_size, shuffle=True, drop_last=False
        )
        validation_loader = torch_geometric.dataloader.DataLoader(
            validation_graphs, batch_size=batch_size, shuffle=False
        )
        residual = (energies - counts @ atomic_energies) / counts.sum(1)
        forces = np.concatenate(
            [reference_forces(atoms).reshape(-1) for atoms in train]
        )
        neighbors = modules.compute_avg_num_neighbors(loader)
        model = modules.ScaleShiftMACE(
            r_max=r_max,
            num_bessel=MACE_SMALL["num_bessel"],
            num_polynomial_cutoff=5,
            max_ell=MACE_SMALL["max_ell"],
            interaction_cls=modules.interaction_classes[
                "RealAgnosticResidualInteractionBlock"
            ],
            interaction_cls_first=modules.interaction_classes[
                "RealAgnosticResidualInteractionBlock"
            ],
            num_interactions=MACE_SMALL["num_interactions"],
            num_elements=len(numbers),
            hidden_irreps=o3.Irreps(MACE_SMALL["hidden_irreps"]),
            MLP_irreps=o3.Irreps("16x0e"),
            atomic_energies=atomic_energies,
            avg_num_neighbors=neighbors,
            atomic_numbers=numbers,
            correlation=MACE_SMALL["correlation"],
            gate=torch.nn.functional.silu,
            radial_MLP=MACE_SMALL["radial_MLP"],
            atomic_inter_scale=float(np.sqrt(np.mean(forces**2))),
            atomic_inter_shift=float(np.mean(residual)),
        ).to(torch.float32)
        loss_function = WeightedEnergyForcesLoss(
            energy_weight=1.0, forces_weight=forces_weight
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, amsgrad=True)
        planned = 10**6
        best = (float("inf"), copy.deepcopy(model.state_dict()))
        history = []
        epoch = 0
        epoch_seconds: List[float] = []
        while epoch < planned:
            epoch_start = clock()
            factor = 0.01 + 0.99 * 0.5 * (
                1 + math.cos(math.pi * min(epoch / planned, 1))
            )
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * factor
            model.train()
            for batch in loader:
                optimizer.zero_grad()
                batch_dict = batch.to_dict()
                output = model(batch_dict, training=True, compute_force=True)
                loss = loss_function(pred=output, ref=batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                optimizer.step()
            model.eval()
            total = 0.0
            for batch in validation_loader:
                output = model(batch.to_dict(), training=False, compute_force=True)
                total += float(loss_function(pred=output, ref=batch).detach())
            history.append(total)
            if total < best[0]:
                best = (total, copy.deepcopy(model.state_dict()))
            epoch += 1
            epoch_seconds.append(clock() - epoch_start)
            per_epoch = float(np.median(epoch_seconds[-5:]))
            left = seconds - (clock() - start) - 10.0
            planned = max(epoch, epoch + int(left // per_epoch))
        model.load_state_dict(best[1])
        return model.eval(), {"epochs": epoch, "history": history}
    finally:
        torch.set_default_dtype(previous)


def evaluate_mace(model: torch.nn.Module, frames: List[ase.Atoms]):
    """Energies ``(n,)`` and forces ``(N, 3)`` of a MACE model on ``frames``."""
    from mace.tools import torch_geometric, utils

    numbers = [int(z) for z in model.atomic_numbers]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(next(model.parameters()).dtype)
    try:
        graphs = _mace_graphs(
            frames, utils.AtomicNumberTable(numbers), float(model.r_max)
        )
    finally:
        torch.set_default_dtype(previous)
    loader = torch_geometric.dataloader.DataLoader(graphs, batch_size=8, shuffle=False)
    energies, forces = [], []
    for batch in loader:
        output = model(batch.to_dict(), training=False, compute_force=True)
        energies.append(output["energy"].detach().numpy())
        forces.append(output["forces"].detach().numpy())
    return np.concatenate(energies), np.concatenate(forces)
