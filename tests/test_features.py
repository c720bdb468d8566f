"""The ``feature`` output (metatomic's standard name): per atom and per structure,
exactly invariant for exact models (float64, fresh random rotations, inversions and
permutations), consistent with metatomic's checks, and left out of the default
predictions."""

import ase
import numpy as np
import pytest
import torch
from metatomic.torch import ModelEvaluationOptions, ModelOutput, systems_to_torch

import symatomic.io
from conftest import (
    SMALL_SOAP,
    TINY_MODEL,
    fresh_seed,
    random_operation,
    relative_error,
)
from symatomic.data.targets import parse_target_options
from symatomic.model import SymatomicModel

TYPES = [1, 6, 8]

CONFIGS = {
    "default": dict(TINY_MODEL, ecse="auto", edge_inputs="auto"),
    "soap": dict(TINY_MODEL, backbone="soap", ecse="auto", soap=SMALL_SOAP),
    "ecse-local": dict(
        TINY_MODEL, ecse={"mode": "local", "frame_layers": 1}, tensor_heads="direct"
    ),
}


def _exported(config: str):
    specs = {
        "energy": parse_target_options("energy", {"unit": "eV"}, "x"),
        "mtt::dipole": parse_target_options(
            "mtt::dipole",
            {"unit": "", "type": {"cartesian": {"rank": 1}}},
            "x",
        ),
    }
    torch.manual_seed(0)
    model = SymatomicModel(dict(CONFIGS[config]), TYPES, specs).to(torch.float64)
    assert model.exactly_equivariant
    return model, model.export()


def _structure(rng: np.random.Generator) -> ase.Atoms:
    positions = []
    while len(positions) < 7:
        candidate = rng.normal(scale=1.1, size=3)
        if all(np.linalg.norm(candidate - p) > 0.8 for p in positions):
            positions.append(candidate)
    return ase.Atoms(numbers=rng.choice(TYPES, 7), positions=np.array(positions))


def _features(exported, frames, sample_kind: str, selected=None):
    systems = systems_to_torch(frames, dtype=torch.float64)
    symatomic.io.add_neighbor_lists(systems, exported)
    options = ModelEvaluationOptions(
        length_unit="angstrom",
        outputs={"feature": ModelOutput(sample_kind=sample_kind)},
        selected_atoms=selected,
    )
    # check_consistency: metatomic validates the output's metadata
    return exported(systems, options, check_consistency=True)["feature"].block()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_features_are_exactly_invariant(config):
    model, exported = _exported(config)
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    atoms = _structure(rng)
    reference = _features(exported, [atoms], "atom")
    assert reference.samples.names == ["system", "atom"]
    assert reference.properties.names == ["feature"]
    assert reference.values.shape == (len(atoms), model.feature_size)
    assert float(reference.values.abs().max()) > 1e-3
    for improper in (False, True):
        rotation, _ = random_operation(seed, improper)
        permutation = rng.permutation(len(atoms))
        moved = atoms.copy()
        moved.positions = atoms.positions @ rotation.numpy().T
        moved = moved[permutation]
        values = _features(exported, [moved], "atom").values
        error = relative_error(values, reference.values[permutation])
        assert error < 1e-12, (config, seed, improper, error)


def test_per_structure_features_are_sums_over_the_selected_atoms():
    from metatensor.torch import Labels

    _, exported = _exported("default")
    rng = np.random.default_rng(fresh_seed())
    frames = [_structure(rng), _structure(rng)]
    per_atom = _features(exported, frames, "atom")
    per_structure = _features(exported, frames, "system")
    assert per_structure.samples.names == ["system"]
    system = per_atom.samples.column("system")
    for index in range(2):
        expected = per_atom.values[system == index].sum(dim=0)
        assert relative_error(per_structure.values[index], expected) < 1e-12
    selected = Labels(
        ["system", "atom"], torch.tensor([[0, 1], [0, 4], [1, 2]], dtype=torch.int32)
    )
    chosen = _features(exported, frames, "system", selected)
    rows = per_atom.values
    assert relative_error(chosen.values[0], rows[1] + rows[4]) < 1e-12
    assert relative_error(chosen.values[1], rows[7 + 2]) < 1e-12


def test_features_are_declared_but_not_predicted_by_default():
    _, exported = _exported("default")
    capabilities = exported.capabilities()
    assert "feature" in capabilities.outputs
    assert "feature" not in symatomic.io.default_outputs(capabilities)
    atoms = _structure(np.random.default_rng(0))
    predictions = symatomic.io.predict(exported, [atoms])
    assert "energy" in predictions
    # metatomic lists the deprecated alias "features" too: neither is predicted
    assert "feature" not in predictions and "features" not in predictions
    features = symatomic.io.predict(exported, [atoms], ["feature"])["feature"]
    assert features.block().values.shape[0] == len(atoms)
