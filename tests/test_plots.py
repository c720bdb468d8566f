"""Parity plots: one figure per target, a panel per block, RMSE in the titles."""

import os

import numpy as np
import pytest

from symatomic.data.targets import parse_target_options
from symatomic.plots import MAX_POINTS, ParityData, block_label, parity_figure


def test_one_panel_per_block_with_its_rmse(tmp_path):
    spec = parse_target_options(
        "mtt::alpha",
        {
            "key": "alpha",
            "type": {
                "spherical": {
                    "irreps": [
                        {"o3_lambda": 0, "o3_sigma": 1},
                        {"o3_lambda": 2, "o3_sigma": 1},
                        {"o3_lambda": 1, "o3_sigma": -1},
                    ]
                }
            },
        },
        "data.xyz",
    )
    rng = np.random.default_rng(0)
    parity = ParityData()
    for block, error in zip(spec.blocks, (0.1, 0.2, 0.3)):
        reference = rng.normal(size=(10, block.num_components, 1))
        parity.add("mtt::alpha", block_label(spec, block), reference, reference + error)
    panels = list(parity.targets["mtt::alpha"].values())
    figure = parity_figure("mtt::alpha", panels)
    titles = [axes.get_title() for axes in figure.axes]
    assert titles == [
        "o3_lambda=0, o3_sigma=1\nRMSE 0.1",
        "o3_lambda=2, o3_sigma=1\nRMSE 0.2",
        "o3_lambda=1, o3_sigma=-1\nRMSE 0.3",
    ]
    written = parity.write(str(tmp_path / "parity-{target}.png"))
    assert written == [str(tmp_path / "parity-mtt_alpha.png")]
    assert (tmp_path / "parity-mtt_alpha.png").read_bytes()[:4] == b"\x89PNG"


def test_energy_and_forces_panels_and_large_sets():
    parity = ParityData()
    rng = np.random.default_rng(1)
    energies = rng.normal(size=5)
    forces = rng.normal(size=(3 * MAX_POINTS, 3))
    parity.add("energy", "energy", energies, energies, "eV")
    parity.add("energy", "forces", forces, forces + 1.0, "eV/angstrom")
    figure = parity_figure("energy", list(parity.targets["energy"].values()))
    assert [axes.get_title() for axes in figure.axes] == [
        "energy\nRMSE 0 eV",
        "forces\nRMSE 1 eV/angstrom",
    ]
    # a subset is drawn, the RMSE is of every value
    assert len(figure.axes[1].collections[0].get_offsets()) == MAX_POINTS


def test_mismatched_values_are_refused():
    with pytest.raises(ValueError, match="shape"):
        ParityData().add("energy", "energy", np.zeros(3), np.zeros(4))


def test_trainer_can_leave_the_plots_out(tmp_path):
    import ase.io

    from conftest import make_frames
    from symatomic.options import check_options
    from symatomic.train import Trainer
    from test_cli import soap_options

    path = str(tmp_path / "data.xyz")
    ase.io.write(path, make_frames(8), format="extxyz")
    options = check_options(soap_options(path, epochs=1))
    result = Trainer(
        options, str(tmp_path / "run"), progress=False, parity_plots=False
    ).run()
    assert result.plots == []
    assert not [name for name in os.listdir(tmp_path / "run") if name.endswith(".png")]
