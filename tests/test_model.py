"""Model: gradients, export round trip, invariances, bad inputs."""

import copy

import ase
import numpy as np
import pytest
import torch
from metatensor.torch import Labels
from metatomic.torch import (
    ModelEvaluationOptions,
    ModelOutput,
    System,
    load_atomistic_model,
)

import symatomic.io
from conftest import TINY_MODEL, make_frames
from symatomic.data import compute_neighbors, structure_from_atoms
from symatomic.data.batch import collate
from symatomic.data.targets import parse_target_options
from symatomic.model import SymatomicModel
from symatomic.train.losses import predict_batch


def _specs(path="unused.xyz"):
    targets = {
        "energy": {"key": "energy", "unit": "eV"},
        "mtt::dipole": {"key": "dipole", "type": {"cartesian": {"rank": 1}}},
        "mtt::polarizability": {
            "key": "polarizability",
            "type": {"cartesian": {"rank": 2}},
            "symmetric": True,
        },
        "mtt::charges": {"key": "charges_ref", "sample_kind": "atom"},
    }
    return {name: parse_target_options(name, o, path) for name, o in targets.items()}


def _model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = SymatomicModel(TINY_MODEL, [1, 6, 8], _specs())
    # non-trivial output transformation
    for readout in model.readouts.values():
        readout.scale.uniform_(0.5, 2.0)
        readout.baseline.normal_()
    return model.to(dtype).eval()


def _periodic_structure(seed=0):
    rng = np.random.default_rng(seed)
    cell = np.eye(3) * 3.2 + rng.normal(scale=0.2, size=(3, 3))
    atoms = ase.Atoms(
        numbers=[8, 1, 1, 6],
        scaled_positions=rng.uniform(size=(4, 3)),
        cell=cell,
        pbc=True,
    )
    return atoms


def _structure(atoms, cutoff):
    structure = structure_from_atoms(atoms, "test")
    compute_neighbors(structure, cutoff)
    return structure


def _energy(model, atoms, specs):
    batch = collate([_structure(atoms, model.cutoff)], torch.float64)
    blocks, _, _ = predict_batch(model, batch, specs, with_gradients=False)
    return float(blocks["energy"][0].sum().detach())


@pytest.mark.parametrize("periodic", [False, True])
def test_forces_and_stress_are_energy_derivatives(periodic):
    model = _model()
    specs = {"energy": copy.deepcopy(model.target_specs["energy"])}
    if periodic:
        atoms = _periodic_structure()
        specs["energy"].stress = specs["energy"].forces
    else:
        atoms = make_frames(1, seed=5)[0]
    structure = _structure(atoms, model.cutoff)
    batch = collate([structure], torch.float64)
    _, forces, stress = predict_batch(model, batch, specs)
    delta = 1e-5
    numerical = np.zeros((len(atoms), 3))
    for i in range(len(atoms)):
        for k in range(3):
            plus = atoms.copy()
            plus.positions[i, k] += delta
            minus = atoms.copy()
            minus.positions[i, k] -= delta
            numerical[i, k] = -(
                _energy(model, plus, specs) - _energy(model, minus, specs)
            ) / (2 * delta)
    np.testing.assert_allclose(
        forces["energy"].numpy(), numerical, rtol=1e-6, atol=1e-8
    )
    assert np.abs(numerical).max() > 1e-3  # not a trivial zero
    if periodic:
        numerical_stress = np.zeros((3, 3))
        volume = abs(np.linalg.det(atoms.cell.array))
        for a in range(3):
            for b in range(3):
                energies = []
                for sign in (1, -1):
                    strained = atoms.copy()
                    strain = np.eye(3)
                    strain[a, b] += sign * delta
                    strained.set_cell(atoms.cell.array @ strain, scale_atoms=False)
                    strained.positions = atoms.positions @ strain
                    energies.append(_energy(model, strained, specs))
                numerical_stress[a, b] = (
                    (energies[0] - energies[1]) / (2 * delta) / volume
                )
        np.testing.assert_allclose(
            stress["energy"][0].numpy(), numerical_stress, rtol=1e-6, atol=1e-9
        )


def test_export_load_same_predictions(tmp_path):
    model = _model(torch.float64)
    frames = make_frames(5, seed=2) + [_periodic_structure(1)]
    structures = [_structure(a, model.cutoff) for a in frames]
    batch = collate(structures, torch.float64)
    blocks, _, _ = predict_batch(model, batch, model.target_specs, with_gradients=False)

    path = str(tmp_path / "model.pt")
    model.export().save(path)
    loaded = load_atomistic_model(path)
    capabilities = loaded.capabilities()
    assert capabilities.interaction_range == pytest.approx(2 * TINY_MODEL["cutoff"])
    assert capabilities.dtype == "float64"
    assert capabilities.atomic_types == [1, 6, 8]
    predictions = symatomic.io.predict(loaded, frames, forces=False)
    for name, spec in model.target_specs.items():
        tensor = predictions[name]
        if spec.kind == "cartesian":
            assert tensor.keys.names == ["o3_lambda", "o3_sigma"]
        for index, block in enumerate(tensor.blocks()):
            expected = blocks[name][index]
            values = block.values.reshape(expected.shape)
            torch.testing.assert_close(values, expected, atol=1e-12, rtol=1e-12)

    # consistency checks of metatomic, per-atom outputs and selected atoms
    systems = [
        System(
            types=s.types,
            positions=s.positions,
            cell=s.cell,
            pbc=s.pbc,
        )
        for s in structures[:3]
    ]
    symatomic.io.add_neighbor_lists(systems, loaded)
    selected = Labels(["system", "atom"], torch.tensor([[0, 0], [0, 2], [2, 1]]))
    options = ModelEvaluationOptions(
        length_unit="angstrom",
        outputs={
            "energy": ModelOutput(sample_kind="atom"),
            "mtt::dipole": ModelOutput(sample_kind="system"),
        },
        selected_atoms=selected,
    )
    outputs = loaded(systems, options, check_consistency=True)
    per_atom = outputs["energy"].block().values
    assert outputs["energy"].block().samples == selected
    full = loaded(
        systems,
        ModelEvaluationOptions(
            length_unit="angstrom", outputs={"energy": ModelOutput(sample_kind="atom")}
        ),
        check_consistency=True,
    )["energy"].block()
    rows = [full.samples.position(s) for s in selected]
    torch.testing.assert_close(per_atom, full.values[rows])


def test_float32_export(tmp_path):
    model = _model(torch.float32)
    frames = make_frames(3, seed=4)
    path = str(tmp_path / "model32.pt")
    model.export().save(path)
    predictions = symatomic.io.predict(path, frames)
    assert predictions["energy"].block().gradient("positions").values.shape[1:] == (
        3,
        1,
    )


def test_permutation_translation_and_batch_independence():
    model = _model()
    specs = model.target_specs
    atoms = make_frames(1, seed=7)[0]
    rng = np.random.default_rng(0)
    permutation = rng.permutation(len(atoms))
    permuted = atoms[permutation]
    translated = atoms.copy()
    translated.positions += rng.normal(size=3) * 5

    def run(frames):
        batch = collate([_structure(a, model.cutoff) for a in frames], torch.float64)
        return predict_batch(model, batch, specs, with_gradients=False)[0]

    reference = run([atoms])
    for name in ("energy", "mtt::dipole", "mtt::polarizability"):
        for a, b in zip(reference[name], run([permuted])[name]):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        for a, b in zip(reference[name], run([translated])[name]):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    charges = run([permuted])["mtt::charges"][0]
    torch.testing.assert_close(
        charges, reference["mtt::charges"][0][permutation], atol=1e-12, rtol=0
    )
    # a structure's prediction does not depend on the rest of the batch (padding)
    others = make_frames(4, seed=11)
    together = run(others[:2] + [atoms] + others[2:])
    for name in ("energy", "mtt::dipole"):
        for a, b in zip(reference[name], together[name]):
            torch.testing.assert_close(a[0], b[2], atol=1e-12, rtol=1e-12)


def test_smooth_at_cutoff():
    """Energy and forces go continuously to their values without the far atom."""
    model = _model()
    specs = {"energy": model.target_specs["energy"]}
    cutoff = model.cutoff
    energies = []
    distances = np.linspace(cutoff - 0.02, cutoff + 0.02, 41)
    for d in distances:
        atoms = ase.Atoms("OH", positions=[[0, 0, 0], [d, 0, 0]])
        energies.append(_energy(model, atoms, specs))
    energies = np.array(energies)
    beyond = energies[distances >= cutoff]
    assert np.ptp(beyond) < 1e-12
    assert np.abs(np.diff(energies)).max() < 1e-8


def test_unknown_species_error():
    model = _model()
    frames = make_frames(1)
    frames[0].numbers[0] = 7
    with pytest.raises(ValueError, match=r"atomic type\(s\) \[7\]"):
        symatomic.io.predict(model.export(), frames)
    structure = _structure(frames[0], model.cutoff)
    batch = collate([structure], torch.float64)
    with pytest.raises(ValueError, match=r"unknown atomic type\(s\) \[7\]"):
        predict_batch(model, batch, model.target_specs)


def test_statistics_fit_baseline(synthetic_file):
    from symatomic.data import read_dataset

    structures, specs, _ = read_dataset(
        {
            "systems": synthetic_file,
            "targets": {
                "energy": {"key": "energy"},
                "mtt::charges": {"key": "charges_ref", "sample_kind": "atom"},
            },
        },
        "training_set",
    )
    model = SymatomicModel(TINY_MODEL, [1, 6, 8], specs).to(torch.float64)
    model.fit_output_statistics(structures)
    baseline = model.readouts["energy"].baseline[:, 0]
    # the synthetic energy has -Z per atom plus small pair terms
    np.testing.assert_allclose(baseline.detach().numpy(), [-1, -6, -8], atol=0.5)


@pytest.mark.parametrize("ecse", ["local", "none"])
def test_version_3_checkpoints_keep_cartesian_inputs(tmp_path, ecse):
    """Checkpoints of version 3 (before invariant edge inputs) describe PET with
    Cartesian inputs: they are rebuilt as such, with the same predictions."""
    torch.manual_seed(0)
    hypers = dict(TINY_MODEL, ecse={"mode": ecse, "frame_layers": 1})
    model = SymatomicModel(hypers, [1, 6, 8], _specs()).to(torch.float64)
    assert model.hypers["edge_inputs"] == "cartesian"
    loaded = _rebuilt_from_old_checkpoint(
        model,
        tmp_path,
        3,
        lambda key: key == "edge_inputs" or key.startswith("density_"),
    )
    assert loaded.hypers["edge_inputs"] == "cartesian"
    assert loaded.hypers["ecse"]["mode"] == ecse


def test_version_6_checkpoints_keep_the_reverse_last_layer(tmp_path):
    """Checkpoints of version 6 (before ``reverse_last_layer`` was an option, off by
    default) describe PETs that combined the last layer's tokens with their
    reverses: they are rebuilt as such, with the same predictions and range."""
    torch.manual_seed(0)
    hypers = dict(TINY_MODEL, reverse_last_layer=True)
    model = SymatomicModel(hypers, [1, 6, 8], _specs()).to(torch.float64)
    assert model.interaction_range == pytest.approx(3 * TINY_MODEL["cutoff"])
    loaded = _rebuilt_from_old_checkpoint(
        model, tmp_path, 6, lambda key: key == "reverse_last_layer"
    )
    assert loaded.hypers["reverse_last_layer"] is True
    assert loaded.interaction_range == model.interaction_range


def _rebuilt_from_old_checkpoint(model, tmp_path, version, unknown_then):
    """``model`` saved as a checkpoint of ``version`` whose hyper-parameters lack
    the keys ``unknown_then(key)`` names, loaded again; its predictions are checked
    equal (bit for bit) to those of ``model``. Returns the loaded model."""
    from symatomic.train.checkpoint import model_from_checkpoint, save_checkpoint

    data = model.model_data()
    data["hypers"] = {
        key: value for key, value in data["hypers"].items() if not unknown_then(key)
    }
    path = str(tmp_path / "old.ckpt")
    save_checkpoint(
        {"model_data": data, "model_state_dict": model.state_dict(), "epoch": 1}, path
    )
    old = torch.load(path, weights_only=True)
    old["version"] = version
    torch.save(old, path)
    loaded = model_from_checkpoint(path)
    atoms = make_frames(1, seed=3)[0]
    structure = structure_from_atoms(atoms, "x")
    compute_neighbors(structure, model.cutoff)
    batch = collate([structure], torch.float64)
    expected = predict_batch(model, batch, model.target_specs)[0]
    result = predict_batch(loaded, batch, loaded.target_specs)[0]
    for name in expected:
        for a, b in zip(expected[name], result[name]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    return loaded
