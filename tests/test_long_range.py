"""Long range (``architecture.model.long_range``): exact symmetry, forces, export."""

import math

import ase
import numpy as np
import pytest
import torch
from metatomic.torch import (
    ModelEvaluationOptions,
    ModelOutput,
    System,
    systems_to_torch,
)

import symatomic.io
from conftest import (
    SMALL_SOAP,
    TINY_MODEL,
    fresh_seed,
    random_operation,
    relative_error,
)
from symatomic.data.targets import parse_target_options
from symatomic.long_range import EWALD_AUTO_ATOMS, check_long_range_options
from symatomic.model import SymatomicModel
from symatomic.model_options import check_model_hypers

pytest.importorskip("torchpme")

TYPES = [1, 8]

CONFIGS = {
    "default": dict(TINY_MODEL, ecse="auto", edge_inputs="auto"),
    "soap": dict(TINY_MODEL, backbone="soap", ecse="auto", soap=SMALL_SOAP),
    "ecse-local": dict(TINY_MODEL, ecse={"mode": "local", "frame_layers": 1}),
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


def _model(config: str, use_ewald, seed: int = 0) -> SymatomicModel:
    torch.manual_seed(seed)
    hypers = dict(CONFIGS[config])
    hypers["long_range"] = {"enable": True, "use_ewald": use_ewald, "num_charges": 3}
    model = SymatomicModel(hypers, TYPES, _specs()).to(torch.float64)
    # non-trivial charges and outputs (untrained projections are small)
    with torch.no_grad():
        for parameter in model.long_range.parameters():
            parameter.mul_(3.0)
    return model


def _random_cell(rng: np.random.Generator, n_atoms: int) -> ase.Atoms:
    """A random triclinic box with atoms no closer than 0.9 Å."""
    cell = np.diag(rng.uniform(5.5, 6.5, 3)) + rng.uniform(-0.8, 0.8, (3, 3))
    positions = []
    while len(positions) < n_atoms:
        candidate = rng.uniform(0, 1, 3) @ cell
        atoms = ase.Atoms(
            "H" * (len(positions) + 1),
            positions=positions + [candidate],
            cell=cell,
            pbc=True,
        )
        if (
            len(positions) == 0
            or atoms.get_distances(
                len(positions), list(range(len(positions))), mic=True
            ).min()
            > 0.9
        ):
            positions.append(candidate)
    return ase.Atoms(
        numbers=rng.choice(TYPES, n_atoms), positions=positions, cell=cell, pbc=True
    )


def _molecule(rng: np.random.Generator, n_atoms: int) -> ase.Atoms:
    positions = []
    while len(positions) < n_atoms:
        candidate = rng.normal(scale=2.5, size=3)
        if all(np.linalg.norm(candidate - p) > 0.9 for p in positions):
            positions.append(candidate)
    return ase.Atoms(numbers=rng.choice(TYPES, n_atoms), positions=positions)


def _evaluate(exported, frames, names, sample_kind, forces=False):
    systems = systems_to_torch(frames, dtype=torch.float64)
    if forces:
        for system in systems:
            system.positions.requires_grad_(True)
    symatomic.io.add_neighbor_lists(systems, exported)
    options = ModelEvaluationOptions(
        length_unit="angstrom",
        outputs={name: ModelOutput(sample_kind=sample_kind) for name in names},
    )
    return exported(systems, options, check_consistency=True), systems


def test_options_are_checked():
    checked = check_model_hypers({})["long_range"]
    assert checked["enable"] is False
    assert check_model_hypers({"long_range": True})["long_range"]["enable"] is True
    with pytest.raises(ValueError, match="long_range: unknown option.*cutof"):
        check_long_range_options({"cutof": 3.0}, "architecture.model.long_range")
    with pytest.raises(ValueError, match="long_range.smearing must be positive"):
        check_model_hypers({"long_range": {"enable": True, "smearing": 0}})
    with pytest.raises(ValueError, match="interpolation_nodes must be between"):
        check_model_hypers({"long_range": {"interpolation_nodes": 9}})
    with pytest.raises(ValueError, match="use_ewald must be true, false or auto"):
        check_model_hypers({"long_range": {"use_ewald": "yes"}})
    assert checked["use_ewald"] == "auto"


def test_auto_takes_ewald_for_small_structures_and_p3m_for_large_ones():
    rng = np.random.default_rng(9)
    frames = [_random_cell(rng, 10)]
    energies = {}
    for use_ewald in (True, False, "auto"):
        model = _model("default", use_ewald)
        energies[use_ewald] = (
            symatomic.io.predict(model.export(), frames, ["energy"], forces=False)[
                "energy"
            ]
            .block()
            .values
        )
    assert relative_error(energies["auto"], energies[True]) < 1e-12
    # P3M and Ewald agree closely, not exactly
    assert 0 < relative_error(energies[False], energies[True]) < 1e-2
    assert _model("default", "auto").long_range.ewald_below == EWALD_AUTO_ATOMS


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("use_ewald", [True, False], ids=["ewald", "p3m"])
def test_long_range_models_are_exactly_equivariant(config, use_ewald):
    """Random rotations, inversions and permutations of a periodic box (cell
    rotated with the atoms) and of a molecule, in one batch: invariant energies,
    equivariant dipoles and polarizabilities, to 1e-12."""
    exported = _model(config, use_ewald).export()
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    frames = [_random_cell(rng, 10), _molecule(rng, 6)]
    names = list(_specs())
    reference = {
        kind: _evaluate(exported, frames, names, kind)[0] for kind in ("atom", "system")
    }
    assert float(reference["system"]["energy"].block().values.abs().max()) > 0
    for improper in (False, True):
        rotation, wigner = random_operation(seed, improper)
        moved = []
        permutations = []
        for atoms in frames:
            permutation = rng.permutation(len(atoms))
            copy = atoms.copy()
            copy.positions = atoms.positions @ rotation.numpy().T
            if atoms.pbc.any():
                copy.cell = atoms.cell.array @ rotation.numpy().T
            moved.append(copy[permutation])
            permutations.append(permutation)
        offsets = np.cumsum([0] + [len(atoms) for atoms in frames])
        atom_order = np.concatenate(
            [p + offset for p, offset in zip(permutations, offsets)]
        )
        for kind in ("atom", "system"):
            result = _evaluate(exported, moved, names, kind)[0]
            order = atom_order if kind == "atom" else np.arange(len(frames))
            for name in names:
                for key, block in result[name].items():
                    expected = reference[kind][name].block(key).values[order]
                    o3_lambda = int(key["o3_lambda"]) if "o3_lambda" in key.names else 0
                    if o3_lambda > 0 or name != "energy":
                        parity = int(key["o3_sigma"]) * (-1) ** o3_lambda
                        sign = parity if improper else 1
                        expected = sign * torch.einsum(
                            "mn,snp->smp", wigner[o3_lambda], expected
                        )
                    error = relative_error(block.values, expected)
                    assert error < 1e-12, (config, seed, improper, name, kind, error)


@pytest.mark.parametrize("use_ewald", [True, False], ids=["ewald", "p3m"])
def test_forces_and_stress_are_derivatives_of_the_energy(use_ewald):
    """Forces -dE/dx (autograd, as engines compute them) against central finite
    differences, for a periodic box and a molecule; the stress against a finite
    strain of the box."""
    exported = _model("default", use_ewald, seed=1).export()
    rng = np.random.default_rng(3)
    for atoms in (_random_cell(rng, 8), _molecule(rng, 5)):
        result, systems = _evaluate(exported, [atoms], ["energy"], "system", True)
        value = result["energy"].block().values.sum()
        forces = -torch.autograd.grad(value, systems[0].positions)[0]
        step = 1e-5
        for atom, axis in ((0, 0), (2, 1), (len(atoms) - 1, 2)):
            shifted = atoms.positions.copy()
            shifted[atom, axis] += step
            plus = _energy(exported, atoms, shifted)
            shifted[atom, axis] -= 2 * step
            minus = _energy(exported, atoms, shifted)
            numerical = -(plus - minus) / (2 * step)
            assert abs(float(forces[atom, axis]) - numerical) < 1e-6 * max(
                1.0, float(forces.abs().max())
            ), (atom, axis)

    # the strain derivative dE/dε (engines' stress, times the volume)
    atoms = _random_cell(np.random.default_rng(4), 8)
    system = systems_to_torch([atoms], dtype=torch.float64)[0]
    strain = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    deformation = torch.eye(3, dtype=torch.float64) + strain
    strained = System(
        types=system.types,
        positions=system.positions @ deformation,
        cell=system.cell @ deformation,
        pbc=system.pbc,
    )
    symatomic.io.add_neighbor_lists([strained], exported)
    options = ModelEvaluationOptions(
        length_unit="angstrom", outputs={"energy": ModelOutput(sample_kind="system")}
    )
    value = exported([strained], options, check_consistency=True)["energy"]
    derivative = torch.autograd.grad(value.block().values.sum(), strain)[0]
    step = np.zeros((3, 3))
    step[0, 1] = 1e-5
    energies = [
        _energy(
            exported,
            atoms,
            atoms.positions @ (np.eye(3) + sign * step),
            np.eye(3) + sign * step,
        )
        for sign in (1, -1)
    ]
    numerical = (energies[0] - energies[1]) / 2e-5
    assert abs(float(derivative[0, 1]) - numerical) < 1e-6 * max(
        1.0, float(derivative.abs().max())
    )


def _energy(exported, atoms, positions, deformation=None):
    """The energy of ``atoms`` moved to ``positions`` (and its cell deformed)."""
    moved = atoms.copy()
    moved.positions = positions
    if deformation is not None:
        moved.cell = atoms.cell.array @ deformation
    result, _ = _evaluate(exported, [moved], ["energy"], "system")
    return float(result["energy"].block().values[0, 0])


def test_exported_models_declare_a_non_local_range_and_strict_lists(tmp_path):
    model = _model("default", False)
    capabilities = model.export().capabilities()
    assert math.isinf(capabilities.interaction_range)
    assert all(options.strict for options in model.requested_neighbor_lists())
    path = str(tmp_path / "model.pt")
    model.export().save(path)
    rng = np.random.default_rng(5)
    frames = [_random_cell(rng, 6), _molecule(rng, 4)]
    saved = symatomic.io.predict(path, frames, ["energy"])["energy"].block()
    direct = symatomic.io.predict(model.export(), frames, ["energy"])["energy"].block()
    assert relative_error(saved.values, direct.values) < 1e-12
    # the local model is unchanged: short range
    local = SymatomicModel(dict(CONFIGS["default"]), TYPES, _specs())
    assert math.isfinite(local.export().capabilities().interaction_range)


def test_the_long_range_part_reaches_beyond_the_interaction_range():
    """Two fragments 40 Å apart: the per-atom energies of one depend on the other
    with long range, and not without."""
    rng = np.random.default_rng(6)
    first = _molecule(rng, 4)
    second = _molecule(rng, 4)
    second.positions += [40.0, 0.0, 0.0]
    for long_range in (True, False):
        model = _model("default", False)
        if not long_range:
            torch.manual_seed(0)
            model = SymatomicModel(dict(CONFIGS["default"]), TYPES, _specs()).to(
                torch.float64
            )
        exported = model.export()
        alone = _evaluate(exported, [first], ["energy"], "atom")[0]
        together = _evaluate(exported, [first + second], ["energy"], "atom")[0]
        change = relative_error(
            together["energy"].block().values[:4], alone["energy"].block().values
        )
        if long_range:
            assert change > 1e-6
        else:
            assert change < 1e-12


def test_one_dimensional_periodicity_is_refused():
    exported = _model("default", False).export()
    atoms = _random_cell(np.random.default_rng(7), 6)
    atoms.pbc = [True, False, False]
    with pytest.raises(Exception, match="periodic in one direction only"):
        _evaluate(exported, [atoms], ["energy"], "system")


def test_ase_calculator_runs_long_range_models(tmp_path):
    """metatomic's ASE calculator gives the model's energy and forces."""
    from metatomic_ase import MetatomicCalculator

    path = str(tmp_path / "model.pt")
    _model("default", False).export().save(path)
    atoms = _random_cell(np.random.default_rng(8), 8)
    reference = symatomic.io.predict(path, [atoms], ["energy"])["energy"].block()
    atoms.calc = MetatomicCalculator(path)
    assert atoms.get_potential_energy() == pytest.approx(
        float(reference.values.sum()), rel=1e-12, abs=1e-12
    )
    forces = -reference.gradient("positions").values.reshape(-1, 3).numpy()
    np.testing.assert_allclose(atoms.get_forces(), forces, rtol=1e-10, atol=1e-12)


def test_the_benchmark_reference_is_ewald_exact():
    """The point-charge data set of benchmarks/long_range.py: its Coulomb energy
    gives rock salt's Madelung constant (1.747565), its forces are -dE/dx."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import point_charges
    from ase.build import bulk

    spacing = 5.64
    salt = bulk("NaCl", "rocksalt", a=spacing, cubic=True)
    charges = torch.tensor([1.0 if z == 11 else -1.0 for z in salt.numbers])
    energy = point_charges.coulomb_energy(
        torch.tensor(salt.positions), torch.tensor(salt.cell.array), charges.double()
    )
    madelung = -float(energy) / 4 * (spacing / 2) / point_charges.COULOMB
    assert madelung == pytest.approx(1.7475645946, rel=1e-9)

    frame = point_charges.point_charge_frames(1, seed=3)[0]
    forces = frame.arrays["forces"]
    step = 1e-5

    def energy_at(positions):
        moved = frame.copy()
        moved.positions = positions
        return point_charges.label(moved).info["energy"]

    shifted = frame.positions.copy()
    shifted[5, 2] += step
    plus = energy_at(shifted)
    shifted[5, 2] -= 2 * step
    minus = energy_at(shifted)
    assert -(plus - minus) / (2 * step) == pytest.approx(forces[5, 2], rel=1e-6)
