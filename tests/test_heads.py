"""Scalar-basis tensor heads inside the model: exact O(3) equivariance for λ = 0…6
and σ = ±1 with an exactly invariant scalar model (the SOAP backbone, or PET with
ECSE), degenerate environments, continuity through the cutoff, export. float64,
fresh random rotations, inversions and permutations."""

import ase
import numpy as np
import pytest
import torch

import symatomic.io
from conftest import (
    SMALL_SOAP,
    TINY_MODEL,
    fresh_seed,
    predict_structure,
    random_operation,
    relative_error,
    transform_atoms,
)
from symatomic.data.targets import parse_target_options
from symatomic.model import (
    SymatomicModel,
    check_model_hypers,
    is_exactly_equivariant,
    resolve_model_hypers,
    tensor_heads_of,
)
from symatomic.train import export_model

MAX_LAMBDA = 6
IRREPS = [
    {"o3_lambda": lam, "o3_sigma": s} for lam in range(MAX_LAMBDA + 1) for s in (1, -1)
]
TYPES = [1, 6, 8]

CONFIGURATIONS = {
    "soap": {"backbone": "soap", "soap": SMALL_SOAP, "basis_hidden": 8},
    # the default: PET with invariant edge inputs, no frames
    "pet-invariant": {"ecse": "auto", "edge_inputs": "auto", "basis_hidden": 8},
    "pet-ecse": {
        "tensor_heads": "basis",
        "ecse": {"mode": "local", "frame_layers": 1},
        "basis_hidden": 8,
    },
}


def _specs():
    return {
        "energy": parse_target_options("energy", {"unit": "eV"}, "x"),
        "mtt::tensor": parse_target_options(
            "mtt::tensor",
            {"type": {"spherical": {"irreps": IRREPS}}, "num_subtargets": 2},
            "x",
        ),
        "mtt::atomic": parse_target_options(
            "mtt::atomic",
            {"sample_kind": "atom", "type": {"spherical": {"irreps": IRREPS}}},
            "x",
        ),
    }


def _model(configuration: str, seed: int = 0) -> SymatomicModel:
    torch.manual_seed(seed)
    hypers = dict(TINY_MODEL, **CONFIGURATIONS[configuration])
    model = SymatomicModel(hypers, TYPES, _specs()).to(torch.float64).eval()
    # unit scales hide nothing: make the outputs of every block O(1)
    return model


def _random_molecule(rng, n_atoms=7):
    positions = []
    while len(positions) < n_atoms:
        candidate = rng.normal(scale=1.1, size=3)
        if all(np.linalg.norm(candidate - p) > 0.8 for p in positions):
            positions.append(candidate)
    return ase.Atoms(numbers=rng.choice(TYPES, n_atoms), positions=np.array(positions))


def _random_crystal(rng):
    cell = np.eye(3) * 3.4 + rng.normal(scale=0.2, size=(3, 3))
    return ase.Atoms(
        numbers=rng.choice(TYPES, 4),
        scaled_positions=rng.uniform(size=(4, 3)),
        cell=cell,
        pbc=True,
    )


@pytest.mark.parametrize("periodic", [False, True], ids=["molecule", "crystal"])
@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_basis_heads_are_exactly_equivariant(configuration, periodic):
    model = _model(configuration)
    assert model.exactly_equivariant
    specs = model.target_specs
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    atoms = _random_crystal(rng) if periodic else _random_molecule(rng)
    for improper in (False, True):
        rotation, wigner = random_operation(seed, improper, MAX_LAMBDA)
        permutation = rng.permutation(len(atoms))
        blocks, forces, _ = predict_structure(model, atoms, specs)
        moved = transform_atoms(atoms, rotation.numpy(), permutation)
        new_blocks, new_forces, _ = predict_structure(model, moved, specs)
        errors = {
            "energy": relative_error(blocks["energy"][0], new_blocks["energy"][0]),
            "forces": relative_error(
                (forces["energy"] @ rotation.T)[permutation], new_forces["energy"]
            ),
        }
        for name in ("mtt::tensor", "mtt::atomic"):
            for block, old, new in zip(
                specs[name].blocks, blocks[name], new_blocks[name]
            ):
                lam, sigma = block.o3_lambda, block.o3_sigma
                parity = sigma * (-1) ** lam if improper else 1
                expected = parity * torch.einsum("mn,snp->smp", wigner[lam], old)
                if name == "mtt::atomic":
                    expected = expected[permutation]
                key = f"{name} λ={lam} σ={sigma}"
                assert float(old.detach().abs().max()) > 1e-8, (
                    f"{key} is trivially zero"
                )
                errors[key] = relative_error(expected, new)
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-10, (seed, improper, worst, errors[worst])


def test_plain_pet_with_basis_heads_is_approximate():
    """Unconstrained PET coefficients with the basis: selectable, not exact."""
    torch.manual_seed(0)
    hypers = dict(TINY_MODEL, tensor_heads="basis", basis_hidden=8)  # ecse: none
    model = SymatomicModel(hypers, TYPES, _specs()).to(torch.float64).eval()
    assert not model.exactly_equivariant
    atoms = _random_molecule(np.random.default_rng(3))
    rotation, wigner = random_operation(3, False, MAX_LAMBDA)
    identity = np.arange(len(atoms))
    specs = {"mtt::tensor": model.target_specs["mtt::tensor"]}
    blocks = predict_structure(model, atoms, specs)[0]["mtt::tensor"]
    moved = transform_atoms(atoms, rotation.numpy(), identity)
    new_blocks = predict_structure(model, moved, specs)[0]["mtt::tensor"]
    expected = torch.einsum("mn,snp->smp", wigner[2], blocks[4])  # λ=2, σ=+1
    assert relative_error(expected, new_blocks[4]) > 1e-6


def _degenerate_structures():
    d = 1.09 / np.sqrt(3)
    fcc = ase.Atoms(
        "C4",
        scaled_positions=[[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
        cell=np.eye(3) * 3.6,
        pbc=True,
    )
    return {
        "atom": ase.Atoms("O", positions=[[0, 0, 0]]),
        "diatomic": ase.Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]]),
        "linear CO2": ase.Atoms(
            "OCO", positions=[[0, 0, -1.16], [0, 0, 0], [0, 0, 1.16]]
        ),
        "tetrahedral CH4": ase.Atoms(
            "CH4",
            positions=[[0, 0, 0], [d, d, d], [-d, -d, d], [-d, d, -d], [d, -d, -d]],
        ),
        "fcc crystal": fcc,
    }


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_degenerate_environments_are_finite(configuration):
    model = _model(configuration)
    specs = model.target_specs
    for label, atoms in _degenerate_structures().items():
        from symatomic.data import compute_neighbors, structure_from_atoms
        from symatomic.data.batch import collate
        from symatomic.train.losses import predict_batch

        structure = structure_from_atoms(atoms, label)
        compute_neighbors(structure, model.cutoff)
        batch = collate([structure], torch.float64)
        batch.positions.requires_grad_(True)
        blocks, _, _ = predict_batch(model, batch, specs, with_gradients=False)
        total = sum(b.sum() for name in blocks for b in blocks[name])
        (gradient,) = torch.autograd.grad(total, batch.positions, allow_unused=True)
        for name in blocks:
            for values in blocks[name]:
                assert torch.isfinite(values).all(), (label, name)
        if gradient is not None:
            assert torch.isfinite(gradient).all(), label


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_continuous_as_an_atom_crosses_the_cutoff(configuration):
    """Move one atom out through the cutoff of its last neighbor: the outputs of the
    others reach the values without it continuously (steps shrink with the step
    size), and equal them once it is out."""
    model = _model(configuration)
    specs = {"mtt::atomic": model.target_specs["mtt::atomic"]}
    core = _random_molecule(np.random.default_rng(11), 4)
    core.positions -= core.positions.mean(axis=0)
    direction = np.array([0.36, 0.48, 0.8])

    def closest(t):
        return np.linalg.norm(core.positions - direction * t, axis=1).min()

    low, high = 0.0, 20.0  # the distance where the atom leaves the last cutoff
    for _ in range(60):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if closest(middle) < model.cutoff else (low, middle)

    def outputs(t):
        atoms = core + ase.Atoms("H", positions=[direction * t])
        blocks = predict_structure(model, atoms, specs)[0]["mtt::atomic"]
        return torch.cat([b[: len(core)].reshape(-1) for b in blocks])

    without = torch.cat(
        [b.reshape(-1) for b in predict_structure(model, core, specs)[0]["mtt::atomic"]]
    )
    assert relative_error(outputs(high + 0.01), without) < 1e-12

    def largest_step(n):
        values = [outputs(t) for t in np.linspace(high - 0.4, high, n)]
        return max(float((b - a).abs().max()) for a, b in zip(values[:-1], values[1:]))

    coarse, fine = largest_step(11), largest_step(21)
    assert fine < 0.7 * coarse, (coarse, fine)
    assert float((outputs(high - 1e-6) - without).abs().max()) < 1e-6 * float(
        without.abs().max()
    )


def test_export_keeps_keys_and_exactness(tmp_path):
    model = _model("soap")
    path = str(tmp_path / "model.pt")
    export_model(model, path)
    atoms = _random_molecule(np.random.default_rng(5))
    predictions = symatomic.io.predict(path, atoms, forces=False)
    tensor = predictions["mtt::tensor"]
    keys = [(int(k["o3_lambda"]), int(k["o3_sigma"])) for k in tensor.keys]
    assert keys == [(i["o3_lambda"], i["o3_sigma"]) for i in IRREPS]
    ours = predict_structure(
        model, atoms, {"mtt::tensor": model.target_specs["mtt::tensor"]}
    )
    for index, block in enumerate(tensor.blocks()):
        assert torch.allclose(block.values, ours[0]["mtt::tensor"][index], atol=1e-12)


def test_head_options():
    hypers = check_model_hypers({"backbone": "soap"})
    assert tensor_heads_of(hypers) == "basis" and is_exactly_equivariant(hypers)
    # the defaults: exactly equivariant, PET with invariant edge inputs (no
    # frames) + basis heads, with or without energies
    specs = _specs()
    tensors = {"mtt::tensor": specs["mtt::tensor"]}
    for targets in (specs, tensors):
        defaults = resolve_model_hypers(check_model_hypers({}), targets)
        assert defaults["backbone"] == "pet" and defaults["tensor_heads"] == "basis"
        assert defaults["edge_inputs"] == "invariant"
        assert defaults["ecse"]["mode"] == "none"
        assert is_exactly_equivariant(defaults)
    # ECSE asked for: Cartesian inputs, frames in the first attention layer
    framed = resolve_model_hypers(check_model_hypers({"ecse": "local"}), specs)
    assert framed["edge_inputs"] == "cartesian"
    assert framed["ecse"]["frame_layers"] is None and is_exactly_equivariant(framed)
    framed = resolve_model_hypers(
        check_model_hypers({"edge_inputs": "cartesian"}), specs
    )
    assert framed["ecse"]["mode"] == "local" and framed["ecse"]["frame_layers"] == 1
    with pytest.raises(ValueError, match="edge_inputs: cartesian"):
        check_model_hypers({"edge_inputs": "invariant", "ecse": "local"})
    with pytest.raises(ValueError, match="tensor_heads: basis"):
        check_model_hypers({"edge_inputs": "invariant", "tensor_heads": "direct"})
    with pytest.raises(ValueError, match="edge_inputs must be one of"):
        check_model_hypers({"edge_inputs": "spherical"})
    # the SOAP backbone needs no ECSE
    soap = resolve_model_hypers(check_model_hypers({"backbone": "soap"}), tensors)
    assert soap["ecse"]["mode"] == "none" and is_exactly_equivariant(soap)
    # the approximately equivariant model is opted into
    plain = resolve_model_hypers(check_model_hypers({"ecse": "none"}), specs)
    assert plain["backbone"] == "pet" and not is_exactly_equivariant(plain)
    with pytest.raises(ValueError, match="tensor_heads: basis"):
        check_model_hypers({"backbone": "soap", "tensor_heads": "direct"})
    with pytest.raises(ValueError, match="backbone must be one of"):
        check_model_hypers({"backbone": "mace"})
    with pytest.raises(ValueError, match="unknown option"):
        check_model_hypers({"backbone": "soap", "soap": {"lmax": 3}})
    with pytest.raises(ValueError, match="ecse applies to the pet backbone"):
        check_model_hypers({"backbone": "soap", "ecse": {"mode": "local"}})


def test_auto_backbone_follows_the_training_set():
    """``symatomic train`` picks SOAP for small training sets without energies and
    for dense matter (measured by benchmarks/budget_accuracy.py), PET otherwise or
    when the options ask for anything of PET's."""
    from symatomic.model_options import (
        DENSE_NEIGHBORS,
        SMALL_TRAINING_SET,
        backbone_for_data,
    )

    specs = _specs()
    tensors = {"mtt::tensor": specs["mtt::tensor"]}
    small, large = SMALL_TRAINING_SET - 1, SMALL_TRAINING_SET
    assert backbone_for_data({}, tensors, small) == "soap"
    assert backbone_for_data({"cutoff": 4.0, "d_head": 32}, tensors, small) == "soap"
    assert backbone_for_data({}, tensors, large) == "pet"
    assert backbone_for_data({}, specs, small) == "pet"
    for pet_options in (
        {"d_pet": 32},
        {"num_gnn_layers": 1},
        {"ecse": "local"},
        {"ecse": "none"},
        {"edge_inputs": "invariant"},
        {"tensor_heads": "direct"},
    ):
        assert backbone_for_data(pet_options, tensors, small) == "pet", pet_options
    assert backbone_for_data({"backbone": "pet"}, tensors, small) == "pet"
    assert backbone_for_data({"backbone": "soap"}, specs, large) == "soap"
    forces = parse_target_options("mtt::e", {"quantity": "energy", "unit": "eV"}, "x")
    assert backbone_for_data({}, {"mtt::e": forces}, small) == "pet"
    # dense matter (liquids: ~40 neighbors per atom): SOAP, unless PET is asked for
    dense = DENSE_NEIGHBORS
    assert backbone_for_data({}, specs, large, neighbors=dense) == "soap"
    assert backbone_for_data({}, specs, large, neighbors=dense - 1) == "pet"
    assert backbone_for_data({"d_pet": 32}, specs, large, neighbors=dense) == "pet"
