"""Reading data sets in metatrain's layout, TensorMap round trips, bad inputs."""

import ase
import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from metatensor.torch import Labels, TensorBlock, TensorMap

import symatomic.io
from conftest import make_frames, shared_data
from symatomic.data import read_dataset, read_frames
from symatomic.o3 import CartesianDecomposition
from symatomic.options import check_options

TARGETS = {
    "energy": {"key": "energy", "unit": "eV"},
    "mtt::dipole": {"key": "dipole", "type": {"cartesian": {"rank": 1}}},
    "mtt::polarizability": {
        "key": "polarizability",
        "type": {"cartesian": {"rank": 2}},
    },
    "mtt::beta": {"key": "beta", "type": {"cartesian": {"rank": 3}}},
    "mtt::charges": {"key": "charges_ref", "sample_kind": "atom"},
}


def test_read_synthetic(synthetic_file):
    frames = read_frames(synthetic_file)
    structures, specs, systems = read_dataset(
        {"systems": synthetic_file, "targets": TARGETS}, "training_set"
    )
    assert systems["length_unit"] == "angstrom"
    assert len(structures) == len(frames)
    assert specs["energy"].has_forces and not specs["energy"].has_stress
    assert specs["mtt::polarizability"].symmetric is True
    assert [(b.o3_lambda, b.o3_sigma) for b in specs["mtt::polarizability"].blocks] == [
        (0, 1),
        (2, 1),
    ]
    assert [(b.o3_lambda, b.o3_sigma) for b in specs["mtt::beta"].blocks] == [
        (1, 1),
        (3, 1),
    ]
    assert specs["mtt::charges"].per_atom
    for atoms, structure in zip(frames, structures):
        assert not bool(structure.pbc.any())
        assert structure.targets["energy"][0].item() == pytest.approx(
            atoms.info["energy"]
        )
        np.testing.assert_allclose(
            structure.forces["energy"].numpy(), atoms.arrays["forces"]
        )
        dipole = structure.targets["mtt::dipole"][0][0, :, 0].numpy()
        np.testing.assert_allclose(dipole, atoms.info["dipole"][[1, 2, 0]])
        alpha = torch.tensor(atoms.info["polarizability"]).reshape(1, 3, 3, 1)
        expected = CartesianDecomposition(2, symmetric=True).to_spherical(alpha)
        for block, value in zip(structure.targets["mtt::polarizability"], expected):
            torch.testing.assert_close(block, value)
        charges = structure.targets["mtt::charges"][0]
        assert charges.shape == (len(atoms), 1, 1)


def test_nonsymmetric_rank2_keeps_all_blocks(tmp_path):
    frames = make_frames(4)
    rng = np.random.default_rng(3)
    for atoms in frames:
        atoms.info["tensor"] = rng.normal(size=9)
    path = str(tmp_path / "t.xyz")
    ase.io.write(path, frames)
    _, specs, _ = read_dataset(
        {
            "systems": path,
            "targets": {
                "mtt::t": {"type": {"cartesian": {"rank": 2}}, "key": "tensor"}
            },
        },
        "training_set",
    )
    assert specs["mtt::t"].symmetric is False
    assert [(b.o3_lambda, b.o3_sigma) for b in specs["mtt::t"].blocks] == [
        (0, 1),
        (1, -1),
        (2, 1),
    ]


def test_tensormap_round_trip(synthetic_file, tmp_path):
    """read → TensorMap → write (.mts) → read as a metatensor target: same values."""
    structures, specs, _ = read_dataset(
        {"systems": synthetic_file, "targets": TARGETS}, "training_set"
    )
    for name in ("mtt::dipole", "mtt::charges", "energy"):
        tensor = symatomic.io.targets_to_tensormap(specs[name], structures)
        if specs[name].kind == "spherical" or specs[name].kind == "cartesian":
            assert tensor.keys.names == ["o3_lambda", "o3_sigma"]
        path = str(tmp_path / f"{name.replace('::', '_')}.mts")
        symatomic.io.save(path, tensor)
        loaded = symatomic.io.load(path)
        for key, block in tensor.items():
            assert torch.equal(loaded.block(key).values, block.values)
            assert loaded.block(key).samples == block.samples
        if name == "mtt::dipole":
            options = {
                "key": "dipole",
                "read_from": path,
                "type": {"spherical": {"irreps": [{"o3_lambda": 1, "o3_sigma": 1}]}},
            }
        elif name == "energy":
            options = {"read_from": path, "forces": False, "stress": False}
        else:
            options = {"read_from": path, "sample_kind": "atom"}
        again, _, _ = read_dataset(
            {"systems": synthetic_file, "targets": {name: options}}, "training_set"
        )
        for first, second in zip(structures, again):
            for a, b in zip(first.targets[name], second.targets[name]):
                assert torch.equal(a, b)


def test_atom_type_blocks_from_mts(synthetic_file, tmp_path):
    """metatrain's atomic-basis layout: keys (o3_lambda, o3_sigma, atom_type)."""
    frames = read_frames(synthetic_file)
    rng = np.random.default_rng(0)
    irreps = {1: [(0, 1, 2), (1, 1, 1)], 6: [(0, 1, 1)], 8: [(2, 1, 1), (0, 1, 1)]}
    keys, blocks, reference = [], [], {}
    for atom_type, type_irreps in irreps.items():
        for o3_lambda, o3_sigma, n in type_irreps:
            samples = [
                [s, a]
                for s, atoms in enumerate(frames)
                for a in range(len(atoms))
                if atoms.numbers[a] == atom_type
            ]
            values = torch.tensor(rng.normal(size=(len(samples), 2 * o3_lambda + 1, n)))
            reference[(o3_lambda, o3_sigma, atom_type)] = (samples, values)
            keys.append([o3_lambda, o3_sigma, atom_type])
            blocks.append(
                TensorBlock(
                    values=values,
                    samples=Labels(
                        ["system", "atom"], torch.tensor(samples).reshape(-1, 2)
                    ),
                    components=[
                        Labels(
                            "o3_mu",
                            torch.arange(-o3_lambda, o3_lambda + 1).reshape(-1, 1),
                        )
                    ],
                    properties=Labels.range("n", n),
                )
            )
    path = str(tmp_path / "density.mts")
    symatomic.io.save(
        path,
        TensorMap(
            Labels(["o3_lambda", "o3_sigma", "atom_type"], torch.tensor(keys)), blocks
        ),
    )
    target = {
        "read_from": path,
        "sample_kind": "atom",
        "type": {
            "spherical": {
                "irreps": {
                    t: [{"o3_lambda": lam, "o3_sigma": s, "num": n} for lam, s, n in ir]
                    for t, ir in irreps.items()
                }
            }
        },
    }
    structures, specs, _ = read_dataset(
        {"systems": synthetic_file, "targets": {"mtt::density": target}}, "training_set"
    )
    spec = specs["mtt::density"]
    assert len(spec.blocks) == 5
    rebuilt = symatomic.io.targets_to_tensormap(spec, structures)
    for key in rebuilt.keys:
        samples, values = reference[tuple(int(v) for v in key.values)]
        torch.testing.assert_close(rebuilt.block(key).values, values)


def test_water_dimer_zero_lattice_is_not_periodic():
    path = shared_data("water_dimer_1000.xyz")
    structures, specs, _ = read_dataset(
        {
            "systems": path,
            "targets": {
                "mtt::beta": {"key": "beta", "type": {"cartesian": {"rank": 3}}},
                "mtt::alpha": {"key": "alpha", "type": {"cartesian": {"rank": 2}}},
            },
        },
        "training_set",
    )
    assert not any(bool(s.pbc.any()) for s in structures)
    assert specs["mtt::beta"].symmetric is True
    assert specs["mtt::alpha"].symmetric is True


def test_energy_from_calculator(tmp_path):
    frames = make_frames(3)
    for atoms in frames:
        energy = atoms.info.pop("energy")
        forces = atoms.arrays.pop("forces")
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    path = str(tmp_path / "calc.xyz")
    ase.io.write(path, frames)
    structures, specs, _ = read_dataset(
        {"systems": path, "targets": {"energy": {"unit": "eV"}}}, "training_set"
    )
    assert specs["energy"].has_forces
    assert structures[0].forces["energy"].shape == (len(frames[0]), 3)


# ------------------------------------------------------------------ bad inputs


def test_nan_positions(tmp_path):
    frames = make_frames(3)
    frames[1].positions[2, 0] = np.nan
    path = str(tmp_path / "nan.xyz")
    ase.io.write(path, frames)
    with pytest.raises(
        ValueError, match=r"nan.xyz\[1\] has non-finite .* atom\(s\) \[2\]"
    ):
        read_dataset({"systems": path, "targets": {"energy": {}}}, "training_set")


def test_wrong_target_shape(synthetic_file):
    with pytest.raises(ValueError, match="has 3 numbers, expected 1 x 9"):
        read_dataset(
            {
                "systems": synthetic_file,
                "targets": {
                    "mtt::x": {"key": "dipole", "type": {"cartesian": {"rank": 2}}}
                },
            },
            "training_set",
        )


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does-not-exist.xyz"):
        read_dataset(
            {"systems": "does-not-exist.xyz", "targets": {"energy": {}}}, "training_set"
        )


def test_missing_key(synthetic_file):
    with pytest.raises(KeyError, match="key 'nothing' for target 'mtt::x'"):
        read_dataset(
            {"systems": synthetic_file, "targets": {"mtt::x": {"key": "nothing"}}},
            "training_set",
        )


def test_per_atom_hint(synthetic_file):
    with pytest.raises(KeyError, match="set sample_kind: atom"):
        read_dataset(
            {"systems": synthetic_file, "targets": {"mtt::q": {"key": "charges_ref"}}},
            "training_set",
        )


def test_bad_target_name_and_options(synthetic_file):
    with pytest.raises(ValueError, match="must be 'energy' or '<domain>::<name>'"):
        read_dataset(
            {"systems": synthetic_file, "targets": {"dipole": {}}}, "training_set"
        )
    with pytest.raises(ValueError, match="unknown option"):
        read_dataset(
            {"systems": synthetic_file, "targets": {"mtt::x": {"kye": "dipole"}}},
            "training_set",
        )
    with pytest.raises(ValueError, match="rank must be 1, 2 or 3"):
        read_dataset(
            {
                "systems": synthetic_file,
                "targets": {"mtt::x": {"type": {"cartesian": {"rank": 4}}}},
            },
            "training_set",
        )


def test_mts_wrong_layout(synthetic_file, tmp_path):
    structures, specs, _ = read_dataset(
        {"systems": synthetic_file, "targets": {"mtt::dipole": TARGETS["mtt::dipole"]}},
        "training_set",
    )
    tensor = symatomic.io.targets_to_tensormap(specs["mtt::dipole"], structures)
    path = str(tmp_path / "d.mts")
    symatomic.io.save(path, tensor)
    target = {
        "read_from": path,
        "type": {"spherical": {"irreps": [{"o3_lambda": 2, "o3_sigma": 1}]}},
    }
    with pytest.raises(ValueError, match="missing block"):
        read_dataset(
            {"systems": synthetic_file, "targets": {"mtt::d": target}}, "training_set"
        )


def test_options_errors():
    base = {"training_set": {"systems": "x.xyz", "targets": {"energy": {}}}}
    with pytest.raises(ValueError, match="unknown top-level option"):
        check_options({**base, "trainig": {}})
    with pytest.raises(
        ValueError, match=r"architecture.model: unknown option\(s\) \['d_pett'\]"
    ) as error:
        check_options({**base, "architecture": {"name": "pet", "model": {"d_pett": 3}}})
    # every accepted key is listed, not only PET's
    for key in ("ecse", "backbone", "soap", "tensor_heads", "basis_hidden"):
        assert f"'{key}'" in str(error.value)
    assert "'edge_inputs'" in str(error.value) and "'d_pet'" in str(error.value)
    with pytest.raises(
        ValueError, match="architecture.training.batch_size must be a int"
    ):
        check_options(
            {**base, "architecture": {"name": "pet", "training": {"batch_size": "8"}}}
        )
    with pytest.raises(ValueError, match="not a symatomic architecture"):
        check_options({**base, "architecture": {"name": "soap_bpnn"}})
    options = check_options(base)
    assert options["architecture"]["model"]["d_pet"] == 128
    assert options["validation_set"] == 0.1
