"""Calibrated last-layer uncertainties and ensembles (symatomic.uncertainty): the
last-layer features reproduce the outputs; uncertainties are positive and exactly
invariant, ensembles exactly equivariant (float64, fresh random rotations,
inversions and permutations); the calibration of a trained model holds on its
validation set; checkpoints and engines carry them."""

import warnings

import ase
import ase.io
import numpy as np
import pytest
import torch
from metatomic.torch import ModelEvaluationOptions, ModelOutput, systems_to_torch

import symatomic.io
from conftest import (
    SMALL_SOAP,
    TINY_MODEL,
    fresh_seed,
    make_frames,
    random_operation,
    relative_error,
    tiny_options,
)
from symatomic.data import compute_neighbors, structure_from_atoms
from symatomic.data.targets import parse_target_options
from symatomic.model import SymatomicModel
from symatomic.train.calibration import last_layer_samples

TYPES = [1, 6, 8]

CONFIGS = {
    "default": dict(TINY_MODEL, ecse="auto", edge_inputs="auto"),
    "soap": dict(TINY_MODEL, backbone="soap", ecse="auto", soap=SMALL_SOAP),
    # direct heads of covariant targets, exact through ECSE frames
    "ecse-direct": dict(
        TINY_MODEL, ecse={"mode": "local", "frame_layers": 1}, tensor_heads="direct"
    ),
}


def _specs():
    return {
        "energy": parse_target_options("energy", {"unit": "eV"}, "x"),
        "mtt::dipole": parse_target_options(
            "mtt::dipole", {"unit": "", "type": {"cartesian": {"rank": 1}}}, "x"
        ),
        "mtt::polarizability": parse_target_options(
            "mtt::polarizability", {"unit": "", "type": {"cartesian": {"rank": 2}}}, "x"
        ),
    }


def _randomly_fitted(config: str, seed: int = 0) -> SymatomicModel:
    """A float64 model whose uncertainty buffers hold a random positive-definite
    covariance, calibration and ensemble (what is checked does not depend on how
    they were fitted)."""
    torch.manual_seed(seed)
    model = SymatomicModel(dict(CONFIGS[config]), TYPES, _specs()).to(torch.float64)
    for readout in model.readouts.values():
        for block in readout.uncertainty:
            size = block.n_features
            factor = torch.randn(size, size, dtype=torch.float64)
            block.covariance_root = factor / size**0.5
            block.calibration = (
                torch.rand(block.n_properties, dtype=torch.float64) + 0.5
            )
            block.ensemble_weights = torch.randn(
                size, 5, block.n_properties, dtype=torch.float64
            )
    assert model.uncertainties_fitted()
    return model


def _structure(rng: np.random.Generator, n_atoms: int = 7) -> ase.Atoms:
    positions = []
    while len(positions) < n_atoms:
        candidate = rng.normal(scale=1.1, size=3)
        if all(np.linalg.norm(candidate - p) > 0.8 for p in positions):
            positions.append(candidate)
    return ase.Atoms(numbers=rng.choice(TYPES, n_atoms), positions=np.array(positions))


def _evaluate(exported, frames, names, sample_kind):
    systems = systems_to_torch(frames, dtype=torch.float64)
    symatomic.io.add_neighbor_lists(systems, exported)
    options = ModelEvaluationOptions(
        length_unit="angstrom",
        outputs={name: ModelOutput(sample_kind=sample_kind) for name in names},
    )
    return exported(systems, options, check_consistency=True)


UNCERTAINTIES = [
    "energy_uncertainty",
    "mtt::aux::dipole_uncertainty",
    "mtt::aux::polarizability_uncertainty",
]
ENSEMBLES = [
    "energy_ensemble",
    "mtt::aux::dipole_ensemble",
    "mtt::aux::polarizability_ensemble",
]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_last_layer_features_reproduce_the_outputs(config):
    model = _randomly_fitted(config)
    rng = np.random.default_rng(fresh_seed())
    structures = []
    for atoms in (_structure(rng), _structure(rng, 5)):
        structure = structure_from_atoms(atoms, "test")
        compute_neighbors(structure, model.cutoff)
        structures.append(structure)
    names = list(_specs())
    from symatomic.data.batch import collate
    from symatomic.train.losses import predict_batch

    # the predictions that come with the last-layer features are the model's own
    plain, _, _ = predict_batch(
        model, collate(structures), _specs(), with_gradients=False
    )
    for predictions, _, features in last_layer_samples(model, structures, names, 2):
        for name in names:
            for block, reference in zip(predictions[name], plain[name]):
                assert relative_error(block, reference) < 1e-12, name
        for name in names:
            readout = model.readouts[name]
            weights = readout.block_last_layer_weights()
            scales = readout.scale.split(readout.block_sizes)
            for index, prediction in enumerate(predictions[name]):
                phi = features[name][index]
                assert phi.shape[-1] == readout.block_last_layer_sizes[index]
                n_properties = readout.block_properties[index]
                scale = scales[index].reshape(-1, n_properties)[0]
                linear = torch.matmul(phi, weights[index]) * scale
                assert relative_error(linear, prediction) < 1e-12, (name, index)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_uncertainties_are_invariant_and_ensembles_equivariant(config):
    model = _randomly_fitted(config)
    exported = model.export()
    for name in UNCERTAINTIES + ENSEMBLES:
        assert name in exported.capabilities().outputs
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    atoms = _structure(rng)
    names = UNCERTAINTIES + ENSEMBLES
    reference = {
        kind: _evaluate(exported, [atoms], names, kind) for kind in ("atom", "system")
    }
    targets = _evaluate(exported, [atoms], list(_specs()), "atom")
    for name, target in zip(UNCERTAINTIES, _specs()):
        for key, block in reference["atom"][name].items():
            assert block.values.shape[1] == 1 and len(block.components) == 0
            # positive, except where the block is zero by construction: with
            # ECSE, atoms whose environment has no frame (the invariant
            # fallback) predict no covariant parts, and are certain of it
            values = targets[target].block(key).values
            predicted_zero = values.reshape(len(values), -1).abs().amax(dim=1) == 0
            assert bool(torch.all(block.values >= 0)), name
            assert bool(torch.all((block.values[:, 0] > 0) | predicted_zero)), name
            assert int(predicted_zero.sum()) <= len(atoms) // 2, name
    for improper in (False, True):
        rotation, wigner = random_operation(seed, improper)
        permutation = rng.permutation(len(atoms))
        moved = atoms.copy()
        moved.positions = atoms.positions @ rotation.numpy().T
        moved = moved[permutation]
        for kind in ("atom", "system"):
            result = _evaluate(exported, [moved], names, kind)
            order = permutation if kind == "atom" else [0]
            for name in UNCERTAINTIES:
                for key, block in result[name].items():
                    expected = reference[kind][name].block(key).values[order]
                    error = relative_error(block.values, expected)
                    assert error < 1e-12, (config, seed, improper, name, kind, error)
            for name in ENSEMBLES:
                for key, block in result[name].items():
                    expected = reference[kind][name].block(key).values[order]
                    if name != "energy_ensemble":
                        o3_lambda = int(key["o3_lambda"])
                        parity = int(key["o3_sigma"]) * (-1) ** o3_lambda
                        sign = parity if improper else 1
                        expected = sign * torch.einsum(
                            "mn,snp->smp", wigner[o3_lambda], expected
                        )
                    error = relative_error(block.values, expected)
                    assert error < 1e-12, (config, seed, improper, name, kind, error)


def test_uncertainties_are_not_declared_before_calibration():
    torch.manual_seed(0)
    model = SymatomicModel(dict(CONFIGS["default"]), TYPES, _specs())
    outputs = model.export().capabilities().outputs
    assert "energy_uncertainty" not in outputs and "energy_ensemble" not in outputs
    assert "mtt::aux::energy_last_layer_features" in outputs
    with pytest.raises(Exception, match="energy_uncertainty"):
        _evaluate(
            model.to(torch.float64).export(),
            [_structure(np.random.default_rng(0))],
            ["energy_uncertainty"],
            "system",
        )


def test_a_checkpoint_from_before_uncertainties_loads_uncalibrated():
    model = _randomly_fitted("default")
    state = {k: v for k, v in model.state_dict().items() if ".uncertainty." not in k}
    fresh = SymatomicModel(dict(CONFIGS["default"]), TYPES, _specs()).to(torch.float64)
    fresh.load_state_dict(state)
    assert not fresh.uncertainties_fitted()
    # and a saved ensemble of another size replaces the buffer's shape
    fresh.load_state_dict(model.state_dict())
    assert fresh.uncertainties_fitted()
    block = fresh.readouts["energy"].uncertainty[0]
    assert block.ensemble_weights.shape[1] == 5


def test_a_saved_inverse_covariance_loads_as_its_factor():
    """Checkpoints from before the factor stored Σ itself: it loads as ``R`` with
    ``R Rᵀ = Σ``, and the uncertainties are the same."""
    from symatomic.uncertainty import BlockUncertainty

    torch.manual_seed(0)
    block = BlockUncertainty(6, 2).to(torch.float64)
    factor = torch.randn(6, 6, dtype=torch.float64)
    inverse = factor @ factor.T
    state = {
        "inverse_covariance": inverse,
        "calibration": torch.tensor([0.5, 2.0], dtype=torch.float64),
        "ensemble_weights": torch.zeros(6, 0, 2, dtype=torch.float64),
    }
    block.load_state_dict(state)
    root = block.covariance_root
    assert relative_error(root @ root.T, inverse) < 1e-12
    phi = torch.randn(4, 3, 6, dtype=torch.float64)
    expected = torch.sqrt(
        torch.einsum("nmi,ij,nmj->nm", phi, inverse, phi).mean(dim=1)
    ).unsqueeze(1) * torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert relative_error(block(phi), expected) < 1e-12


def test_float32_uncertainties_of_features_with_a_large_common_component():
    """Features that share a large common component (per-structure sums over
    atoms) and an ill-conditioned covariance: in float32 the stored factor keeps
    the uncertainty invariant to the round-off of the features themselves, where
    the quadratic form with ``Σ`` changed by more than 10 %."""
    from metatomic.torch.o3 import random_transformations

    from symatomic.uncertainty import BlockUncertainty

    seed = fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    n = 32
    common = 30.0 * torch.randn(n, dtype=torch.float64, generator=generator)
    spread = torch.logspace(0, -3, n, dtype=torch.float64)

    def features(count: int) -> torch.Tensor:
        noise = torch.randn(count, 3, n, dtype=torch.float64, generator=generator)
        return common + 0.05 * noise * spread

    flat = features(400).reshape(-1, n)
    eigenvalues, eigenvectors = torch.linalg.eigh(flat.T @ flat)
    shifted = eigenvalues + 1e-8 * eigenvalues.mean()
    block = BlockUncertainty(n, 1)
    block.covariance_root = (eigenvectors / torch.sqrt(shifted)).float()
    block.calibration = torch.ones(1)
    inverse = ((eigenvectors / shifted) @ eigenvectors.T).float()

    def quadratic_form(phi: torch.Tensor) -> torch.Tensor:
        variance = ((phi @ inverse) * phi).sum(dim=2).mean(dim=1)
        return torch.sqrt(variance.clamp(min=0.0))

    phi = features(20)
    transformation = random_transformations(
        1, 1, device=torch.device("cpu"), dtype=torch.float64, generator=generator
    )
    rotated = torch.einsum("mk,nki->nmi", transformation.wigner_D_matrices(1)[0], phi)
    reference = block.to(torch.float64)(phi).reshape(-1)
    block.float()
    change = (block(phi.float()) - block(rotated.float())).reshape(-1).double()
    assert float((change.abs() / reference).max()) < 1e-3, f"seed {seed}"
    old = (quadratic_form(phi.float()) - quadratic_form(rotated.float())).double()
    assert float((old.abs() / reference).max()) > 0.1, f"seed {seed}"


def _trained(tmp_path, **training):
    from symatomic.options import check_options
    from symatomic.train import Trainer

    path = str(tmp_path / "data.xyz")
    ase.io.write(path, make_frames(40, seed=3), format="extxyz")
    targets = {
        "energy": {"key": "energy", "unit": "eV", "forces": {"key": "forces"}},
        "mtt::dipole": {
            "key": "dipole",
            "unit": "e*A",
            "type": {"cartesian": {"rank": 1}},
        },
        "mtt::polarizability": {
            "key": "polarizability",
            "unit": "A^3",
            "type": {"cartesian": {"rank": 2}},
        },
    }
    options = check_options(tiny_options(path, targets, epochs=2, **training))
    options["architecture"]["model"] = dict(CONFIGS["default"])
    Trainer(options, str(tmp_path / "run")).run()
    return options, path


def test_training_ends_with_calibrated_uncertainties(tmp_path):
    """On the validation set, mean(error² / uncertainty²) is 1 for every block and
    property (the calibration's definition); the exported model gives the same
    uncertainties as the checkpoint."""
    from metatomic.torch import load_atomistic_model

    from symatomic.data.sets import load_data_sets
    from symatomic.train.checkpoint import model_from_checkpoint as load_model

    options, path = _trained(tmp_path, num_ensemble_members=8)
    model = load_model(str(tmp_path / "run" / "model.ckpt"))
    validation = load_data_sets(options, model.cutoff).validation
    names = list(model.target_specs)
    ratios = {}
    for predictions, references, features in last_layer_samples(
        model, validation, names, len(validation)
    ):
        for name in names:
            for index, block in enumerate(model.readouts[name].uncertainty):
                sigma = block(features[name][index])
                assert bool(torch.all(sigma > 0))
                squared = (predictions[name][index] - references[name][index]) ** 2
                ratios[(name, index)] = (squared.mean(dim=1) / sigma**2).mean(dim=0)
    assert len(ratios) == 4  # energy, dipole, two polarizability blocks
    for key, ratio in ratios.items():
        assert float((ratio - 1).abs().max()) < 1e-8, (key, ratio)

    exported = load_atomistic_model(str(tmp_path / "run" / "model.pt"))
    for name in UNCERTAINTIES + ENSEMBLES:
        assert name in exported.capabilities().outputs, name
    frames = ase.io.read(path, ":4")
    result = _evaluate(
        exported, frames, ["energy_uncertainty", "energy_ensemble"], "system"
    )
    structures = []
    for atoms in frames:
        structure = structure_from_atoms(atoms, "test")
        compute_neighbors(structure, model.cutoff)
        structures.append(structure)
    ((_, _, features),) = list(last_layer_samples(model, structures, ["energy"], 4))
    sigma = model.readouts["energy"].uncertainty[0](features["energy"][0])
    values = result["energy_uncertainty"].block().values
    assert relative_error(values, sigma) < 1e-12
    members = result["energy_ensemble"].block().values
    assert members.shape == (4, 8)
    assert float(members.std(dim=1).min()) > 0


def test_checkpoints_keep_the_calibration_and_the_option_turns_it_off(tmp_path):
    from symatomic.train.checkpoint import model_from_checkpoint as load_model

    _trained(tmp_path)
    for name in ("model.ckpt", "last.ckpt"):
        model = load_model(str(tmp_path / "run" / name))
        assert model.uncertainties_fitted(), name
        assert "energy_uncertainty" in model.capabilities().outputs
    off = tmp_path / "off"
    off.mkdir()
    _trained(off, uncertainty=False)
    model = load_model(str(off / "run" / "model.ckpt"))
    assert not model.uncertainties_fitted()
    assert "energy_uncertainty" not in model.capabilities().outputs


def test_ase_warns_above_the_uncertainty_threshold():
    from metatomic_ase import MetatomicCalculator

    model = _randomly_fitted("default")
    atoms = _structure(np.random.default_rng(1))
    atoms.calc = MetatomicCalculator(model.export(), uncertainty_threshold=1e-12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        atoms.get_potential_energy()
    assert any("uncertaint" in str(w.message) for w in caught)
    atoms.calc = MetatomicCalculator(model.export(), uncertainty_threshold=1e12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        atoms.get_potential_energy()
    assert not any("uncertaint" in str(w.message) for w in caught)


def test_forces_of_the_energy_ensemble_are_minus_its_gradient():
    """Member forces by autograd (what an engine does) match finite differences."""
    model = _randomly_fitted("default")
    exported = model.export()
    atoms = _structure(np.random.default_rng(2), 5)

    def members(positions):
        moved = atoms.copy()
        moved.positions = positions
        systems = systems_to_torch([moved], dtype=torch.float64)
        systems[0].positions.requires_grad_(True)
        symatomic.io.add_neighbor_lists(systems, exported)
        options = ModelEvaluationOptions(
            length_unit="angstrom",
            outputs={"energy_ensemble": ModelOutput(sample_kind="system")},
        )
        values = exported(systems, options, check_consistency=True)[
            "energy_ensemble"
        ].block()
        return values.values[0], systems[0].positions

    values, positions = members(atoms.positions)
    forces = torch.stack(
        [
            -torch.autograd.grad(values[m], positions, retain_graph=True)[0]
            for m in range(values.shape[0])
        ]
    )
    step = 1e-5
    atom, axis = 3, 1
    shifted = atoms.positions.copy()
    shifted[atom, axis] += step
    plus, _ = members(shifted)
    shifted[atom, axis] -= 2 * step
    minus, _ = members(shifted)
    numerical = -(plus - minus).detach() / (2 * step)
    assert relative_error(forces[:, atom, axis], numerical) < 1e-6
    assert float(forces.std(dim=0).max()) > 0


def test_ase_md_example_records_the_largest_atomic_uncertainty(tmp_path):
    import os
    import sys

    from symatomic.train.trainer import export_model

    root = os.path.join(os.path.dirname(__file__), "..")
    sys.path.insert(0, os.path.join(root, "examples", "ase"))
    try:
        import md_dipole
    finally:
        sys.path.pop(0)
    path = str(tmp_path / "model.pt")
    export_model(_randomly_fitted("default"), path)
    output = tmp_path / "md"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random model is far above 0.1 eV
        md_dipole.main([path, "--steps", "3", "--output-dir", str(output)])
    with open(output / "dipole.csv") as file:
        header = file.readline().strip().split(",")
    assert header[-1] == "max_energy_uncertainty_eV"
    rows = np.loadtxt(output / "dipole.csv", delimiter=",", skiprows=1)
    assert rows.shape == (4, 10)
    assert np.all(rows[:, 9] > 0)
