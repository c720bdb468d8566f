"""Peers timed next to symatomic: metatrain's PET and MACE (mace-torch).

mace-torch is a benchmark-only peer: install it next to symatomic in a benchmark
environment (``pip install torch==2.13.0 mace-torch``); with torch 2.13 its e3nn
needs ``torch.serialization.add_safe_globals([slice])``, done here.
"""

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
