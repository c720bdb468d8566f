"""Exported models in the engines: ASE (metatomic's calculator), LAMMPS-style domain
decomposition (checked in Python, and with a real LAMMPS when one is installed), and
TensorMap round trips of predictions."""

import os
import shutil
import subprocess
import sys

import ase
import ase.io
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
from conftest import SMALL_SOAP, TINY_MODEL, fresh_seed
from symatomic.data.targets import parse_target_options
from symatomic.model import SymatomicModel
from symatomic.train import export_model

ROOT = os.path.join(os.path.dirname(__file__), "..")
TYPES = [1, 6, 8]


def _specs():
    energy = parse_target_options("energy", {"unit": "eV"}, "x")
    energy.stress = energy.forces
    return {
        "energy": energy,
        "mtt::dipole": parse_target_options(
            "mtt::dipole",
            {
                "unit": "e*Bohr",
                "type": {"spherical": {"irreps": [{"o3_lambda": 1, "o3_sigma": 1}]}},
            },
            "x",
        ),
    }


def _export(tmp_path, ecse=None, name="model.pt", seed=0, **changes) -> str:
    torch.manual_seed(seed)
    hypers = dict(TINY_MODEL, **changes)
    if ecse is not None:
        hypers["ecse"] = ecse
    model = SymatomicModel(hypers, TYPES, _specs()).to(torch.float64)
    path = str(tmp_path / name)
    export_model(model, path)
    return path


def _random_crystal(rng, n_atoms=8, length=4.6) -> ase.Atoms:
    cell = np.eye(3) * length + rng.normal(scale=0.15, size=(3, 3))
    positions = []
    while len(positions) < n_atoms:
        candidate = rng.uniform(size=3) @ cell
        atoms = ase.Atoms(
            positions=np.array(positions + [candidate]), cell=cell, pbc=True
        )
        if len(positions) == 0 or all(
            atoms.get_distance(len(positions), j, mic=True) > 1.0
            for j in range(len(positions))
        ):
            positions.append(candidate)
    return ase.Atoms(
        numbers=rng.choice(TYPES, n_atoms), positions=positions, cell=cell, pbc=True
    )


def _water_trimer() -> ase.Atoms:
    from symatomic.cli import example_options_path

    path = os.path.join(os.path.dirname(example_options_path()), "water_clusters.xyz")
    return next(a for a in ase.io.read(path, ":") if len(a) == 9)


# ---------------------------------------------------------------------------- ASE
def test_per_atom_outputs_are_declared(tmp_path):
    """Engines ask for per-atom energies: every output is declared per atom."""
    model = load_atomistic_model(_export(tmp_path))
    outputs = model.capabilities().outputs
    assert outputs["energy"].sample_kind == "atom"
    assert outputs["mtt::dipole"].sample_kind == "atom"
    assert outputs["energy"].unit == "eV"
    assert model.capabilities().interaction_range == pytest.approx(
        TINY_MODEL["num_gnn_layers"] * TINY_MODEL["cutoff"]
    )


@pytest.mark.parametrize(
    "ecse", [None, {"mode": "local"}, "auto"], ids=["pet", "ecse", "invariant"]
)
def test_ase_calculator_matches_model(tmp_path, ecse):
    """metatomic's ASE calculator gives the model's own energy, per-atom energies,
    forces, stress and tensor outputs (as additional outputs)."""
    from metatomic_ase import MetatomicCalculator

    # "auto": the default, PET with invariant edge inputs
    path = _export(tmp_path, ecse)
    atoms = _random_crystal(np.random.default_rng(1))
    reference = symatomic.io.predict(path, atoms)

    calculator = MetatomicCalculator(
        path,
        additional_outputs={"mtt::dipole": ModelOutput(sample_kind="system")},
    )
    atoms.calc = calculator
    energy = atoms.get_potential_energy()
    block = reference["energy"].block()
    assert energy == pytest.approx(float(block.values.sum()), rel=1e-12, abs=1e-12)

    energies = atoms.get_potential_energies()
    assert energies.shape == (len(atoms),)
    assert energies.sum() == pytest.approx(energy, rel=1e-12, abs=1e-12)

    forces = -block.gradient("positions").values.reshape(-1, 3).numpy()
    np.testing.assert_allclose(atoms.get_forces(), forces, rtol=1e-10, atol=1e-12)

    strain_gradient = block.gradient("strain").values.reshape(3, 3).numpy()
    stress = strain_gradient / atoms.get_volume()
    # the calculator symmetrizes the stress; the antisymmetric part is a torque,
    # zero only for rotationally invariant energies (ECSE), not for plain PET
    antisymmetric = np.abs(stress - stress.T).max()
    if ecse is not None:
        assert antisymmetric < 1e-12 * np.abs(stress).max()
    stress = 0.5 * (stress + stress.T)
    np.testing.assert_allclose(
        atoms.get_stress(voigt=False), stress, rtol=1e-10, atol=1e-12
    )

    dipole = calculator.additional_outputs["mtt::dipole"]
    assert dipole.keys.names == ["o3_lambda", "o3_sigma"]
    np.testing.assert_allclose(
        dipole.block().values.detach().numpy(),
        reference["mtt::dipole"].block().values.numpy(),
        rtol=1e-12,
        atol=1e-14,
    )


def test_ase_md_example_writes_dipole_series(tmp_path):
    """examples/ase/md_dipole.py runs NVE with the dipole as an additional output."""
    sys.path.insert(0, os.path.join(ROOT, "examples", "ase"))
    try:
        import md_dipole
    finally:
        sys.path.pop(0)
    path = _export(tmp_path, {"mode": "local"})
    output = tmp_path / "md"
    md_dipole.main([path, "--steps", "20", "--output-dir", str(output)])
    rows = np.loadtxt(output / "dipole.csv", delimiter=",", skiprows=1)
    assert rows.shape == (21, 9)
    assert np.all(np.isfinite(rows))
    # the dipole is the model's own, rotated back to Cartesian (x, y, z) order
    first = ase.io.read(output / "trajectory.xyz", index=0)
    reference = symatomic.io.predict(path, first, forces=False)["mtt::dipole"]
    yzx = reference.block().values.reshape(3).numpy()
    np.testing.assert_allclose(rows[0, 6:9], yzx[[2, 0, 1]], rtol=1e-6, atol=1e-9)
    spectrum = np.loadtxt(output / "ir_spectrum.csv", delimiter=",", skiprows=1)
    assert spectrum.shape[1] == 2 and np.all(np.isfinite(spectrum))

    with pytest.raises(ValueError, match="no output 'mtt::charges'"):
        md_dipole.run(path, first, str(tmp_path / "x"), steps=2, dipole="mtt::charges")


# ------------------------------------------------------- LAMMPS-style decomposition
def _evaluate(
    model,
    numbers,
    positions,
    cell,
    pbc,
    selected=None,
    per_atom=False,
    gradient_of=None,
):
    """Energy (summed over ``selected`` atoms, or per selected atom) and the
    gradient of its sum (of the per-atom energies of the rows ``gradient_of`` only,
    when given) with respect to ``positions``, through the exported model as an
    engine calls it."""
    positions = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
    system = System(
        types=torch.tensor(numbers, dtype=torch.int32),
        positions=positions,
        cell=torch.tensor(cell, dtype=torch.float64),
        pbc=torch.tensor(pbc),
    )
    symatomic.io.add_neighbor_lists([system], model)
    selected_atoms = None
    if selected is not None:
        selected_atoms = Labels(
            ["system", "atom"],
            torch.tensor([[0, int(i)] for i in selected], dtype=torch.int32),
        )
    options = ModelEvaluationOptions(
        length_unit="angstrom",
        outputs={"energy": ModelOutput(sample_kind="atom" if per_atom else "system")},
        selected_atoms=selected_atoms,
    )
    result = model([system], options, check_consistency=True)["energy"].block()
    values = result.values.reshape(-1)
    if gradient_of is not None:
        values = values[torch.tensor(gradient_of)]
    (gradient,) = torch.autograd.grad(values.sum(), positions)
    return result.values.detach().reshape(-1).numpy(), gradient.numpy()


def _domain_with_ghosts(atoms: ase.Atoms, local: np.ndarray, skin: float):
    """A non-periodic sub-system, the way LAMMPS builds one per MPI rank: the
    ``local`` atoms of the cell, then every periodic image of any atom (ghost) within
    ``skin`` of a local atom. Returns numbers, positions and the index in ``atoms`` of
    every atom of the sub-system."""
    cell = atoms.cell.array
    heights = atoms.cell.volume / np.linalg.norm(
        np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1
    )
    reach = np.ceil(skin / heights).astype(int) + 1
    local_positions = atoms.positions[local]
    numbers = list(atoms.numbers[local])
    positions = list(local_positions)
    origin = list(local)
    ranges = [range(-r, r + 1) for r in reach]
    for a in ranges[0]:
        for b in ranges[1]:
            for c in ranges[2]:
                shift = np.array([a, b, c]) @ cell
                for j in range(len(atoms)):
                    if a == b == c == 0 and j in local:
                        continue
                    image = atoms.positions[j] + shift
                    distances = np.linalg.norm(local_positions - image, axis=1)
                    if distances.min() <= skin:
                        numbers.append(atoms.numbers[j])
                        positions.append(image)
                        origin.append(j)
    return np.array(numbers), np.array(positions), np.array(origin)


@pytest.mark.parametrize(
    "changes, cutoffs",
    [
        ({}, 2),  # PET, 2 GNN layers: 2 cutoffs
        # models written before reverse_last_layer was an option: one more
        ({"reverse_last_layer": True}, 3),
        ({"ecse": {"mode": "local"}, "num_gnn_layers": 1}, 1),  # fewer ghosts (time)
        ({"backbone": "soap", "soap": SMALL_SOAP}, 2),  # pair features reach 2
        # the default: invariant edge inputs (densities of i's pairs in every layer)
        ({"ecse": "auto", "edge_inputs": "invariant"}, 2),
    ],
    ids=["pet", "pet-reverse-last", "ecse", "soap", "invariant"],
)
def test_domain_decomposition_with_interaction_range(tmp_path, changes, cutoffs):
    """Split a periodic cell in two domains; each domain is a non-periodic system of
    its local atoms plus ghosts out to the declared ``interaction_range``. The sums of
    the local atoms' energies and the forces (ghost forces sent back to their owners)
    equal the whole. With ghosts one cutoff short of it they do not: the range is
    needed, and declaring it is what makes LAMMPS' decomposition valid."""
    model = load_atomistic_model(_export(tmp_path, **changes))
    interaction_range = model.capabilities().interaction_range
    assert interaction_range == pytest.approx(cutoffs * TINY_MODEL["cutoff"])
    rng = np.random.default_rng(fresh_seed())
    atoms = _random_crystal(rng)
    whole_energies, whole_gradient = _evaluate(
        model,
        atoms.numbers,
        atoms.positions,
        atoms.cell.array,
        [True] * 3,
        per_atom=True,
    )
    fractional = atoms.get_scaled_positions()[:, int(rng.integers(3))]
    # a random plane between two atoms: both domains hold atoms
    ordered = np.sort(fractional)
    split = int(rng.integers(1, len(ordered)))
    threshold = 0.5 * (ordered[split - 1] + ordered[split])
    domains = [
        np.nonzero(fractional < threshold)[0],
        np.nonzero(fractional >= threshold)[0],
    ]

    def decomposed(skin):
        total = 0.0
        gradient = np.zeros_like(atoms.positions)
        per_atom = np.zeros(len(atoms))
        for local in domains:
            numbers, positions, origin = _domain_with_ghosts(atoms, local, skin)
            values, grad = _evaluate(
                model,
                numbers,
                positions,
                np.zeros((3, 3)),
                [False] * 3,
                selected=range(len(local)),
                per_atom=True,
            )
            per_atom[local] = values
            total += values.sum()
            np.add.at(gradient, origin, grad)
        return total, per_atom, gradient

    total, per_atom, gradient = decomposed(interaction_range)
    assert total == pytest.approx(whole_energies.sum(), rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(per_atom, whole_energies, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gradient, whole_gradient, rtol=1e-9, atol=1e-11)

    # one cutoff less (what num_gnn_layers x cutoff would declare) is not enough:
    # the energies change far beyond the round-off of the full range (the change,
    # through the last hop of a small random model, is of order 1e-6 here: a fixed
    # threshold of 1e-6 failed about once in eight runs)
    _, short_per_atom, _ = decomposed(interaction_range - TINY_MODEL["cutoff"])
    round_off = (
        np.abs(per_atom - whole_energies).max() + 1e-15 * np.abs(whole_energies).max()
    )
    assert np.abs(short_per_atom - whole_energies).max() > 1e3 * round_off


@pytest.mark.parametrize(
    "changes",
    [
        {"ecse": "none"},
        {"ecse": "none", "reverse_last_layer": True},
        {"ecse": "auto", "edge_inputs": "invariant"},
    ],
    ids=["pet", "pet-reverse-last", "invariant"],
)
def test_selected_atoms_equal_the_full_evaluation(tmp_path, changes):
    """With ``selected_atoms``, PET computes in each layer only the atoms that reach
    the selected ones (here: a few atoms at one end of a long random cluster, most
    atoms out of reach). Their energies and the gradient of their sum equal those
    of the evaluation of every atom (float64)."""
    from symatomic.pet import layer_reach

    model = load_atomistic_model(_export(tmp_path, **changes))
    rng = np.random.default_rng(fresh_seed())
    # a 3 x 3 x 18 Å slab of atoms at least 1 Å apart, along z
    positions: list = []
    while len(positions) < 60:
        candidate = rng.uniform(size=3) * np.array([3.0, 3.0, 18.0])
        if all(np.linalg.norm(candidate - p) > 1.0 for p in positions):
            positions.append(candidate)
    positions = np.array(positions)
    numbers = rng.choice(TYPES, size=len(positions))
    selected = np.sort(np.argsort(positions[:, 2])[:3])
    whole, whole_gradient = _evaluate(
        model,
        numbers,
        positions,
        np.zeros((3, 3)),
        [False] * 3,
        per_atom=True,
        gradient_of=selected,
    )
    pruned, gradient = _evaluate(
        model,
        numbers,
        positions,
        np.zeros((3, 3)),
        [False] * 3,
        selected=selected,
        per_atom=True,
    )
    np.testing.assert_allclose(pruned, whole[selected], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gradient, whole_gradient, rtol=1e-10, atol=1e-13)
    # most atoms are out of reach: the first layer computes fewer than all (pairs
    # within the cutoff, sorted by center)
    distances = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    centers, neighbors = np.nonzero(
        (distances < TINY_MODEL["cutoff"]) & (distances > 0)
    )
    active = torch.zeros(len(positions), dtype=torch.bool)
    active[torch.tensor(selected)] = True
    masks = layer_reach(
        active,
        torch.tensor(centers),
        torch.tensor(neighbors),
        TINY_MODEL["num_gnn_layers"],
        changes.get("reverse_last_layer", False),
    )
    assert masks[-1].equal(active)
    assert all(bool((a >= b).all()) for a, b in zip(masks[:-1], masks[1:]))
    assert int(masks[0].sum()) < len(positions)


def test_layer_reach_grows_one_neighbor_shell_per_layer():
    """On a chain 0-1-2-…-7 (pairs between consecutive atoms, both directions),
    the atoms each layer computes for atom 0 are one more per layer (the last
    layer computes atom 0 alone, or with the reverse combination its neighbor
    too)."""
    from symatomic.pet import layer_reach

    left = torch.arange(7)
    centers = torch.cat([left, left + 1])
    neighbors = torch.cat([left + 1, left])
    order = torch.argsort(centers, stable=True)
    active = torch.zeros(8, dtype=torch.bool)
    active[0] = True
    masks = layer_reach(active, centers[order], neighbors[order], 3, True)
    assert [int(mask.sum()) for mask in masks] == [4, 3, 2, 1]
    assert masks[0].tolist() == [True] * 4 + [False] * 4
    masks = layer_reach(active, centers[order], neighbors[order], 3)
    assert [int(mask.sum()) for mask in masks] == [3, 2, 1, 1]


def _lammps_with_metatomic():
    executable = shutil.which("lmp") or shutil.which("lmp_serial")
    if executable is None:
        return None, "no LAMMPS executable (lmp) on PATH"
    try:
        help_text = subprocess.run(
            [executable, "-h"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"'{executable} -h' failed: {error}"
    if "metatomic" not in help_text:
        return None, f"{executable} was built without the metatomic pair style"
    return executable, ""


def test_lammps_example_input(tmp_path):
    """examples/lammps/in.lammps runs the exported model; LAMMPS' potential energy
    equals the model's own. Needs a LAMMPS built with pair_style metatomic (not
    installable from PyPI): skipped otherwise."""
    executable, reason = _lammps_with_metatomic()
    if executable is None:
        pytest.skip(reason)
    sys.path.insert(0, os.path.join(ROOT, "examples", "lammps"))
    try:
        import make_data
    finally:
        sys.path.pop(0)
    path = _export(tmp_path, {"mode": "local"})
    atoms = _water_trimer()
    data = str(tmp_path / "water.data")
    types = make_data.write_data(atoms, data, box=20.0)
    log = tmp_path / "log.lammps"
    subprocess.run(
        [
            executable,
            "-in",
            os.path.join(ROOT, "examples", "lammps", "in.lammps"),
            "-var",
            "model",
            path,
            "-var",
            "data",
            data,
            "-var",
            "types",
            " ".join(str(t) for t in types),
            "-var",
            "steps",
            "0",
            "-log",
            str(log),
        ],
        cwd=tmp_path,
        check=True,
        timeout=300,
        capture_output=True,
    )
    lines = log.read_text().splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.split()[:2] == ["Step", "Temp"]
    )
    potential = float(lines[header + 1].split()[2])
    reference = symatomic.io.predict(path, make_data.boxed(atoms, 20.0), forces=False)
    assert potential == pytest.approx(
        float(reference["energy"].block().values.sum()), rel=1e-6
    )


# ----------------------------------------------------------------- TensorMap I/O
def test_predictions_round_trip_bit_identical(tmp_path):
    """Predictions saved with metatensor and loaded back are bit-identical, gradients
    included; keys carry o3_lambda/o3_sigma."""
    import metatensor.torch as mts

    path = _export(tmp_path, {"mode": "local"})
    frames = [_random_crystal(np.random.default_rng(seed)) for seed in range(3)]
    predictions = symatomic.io.predict(path, frames)
    assert predictions["mtt::dipole"].keys.names == ["o3_lambda", "o3_sigma"]
    for name, tensor in predictions.items():
        file = str(tmp_path / f"{name.replace('::', '_')}.mts")
        symatomic.io.save(file, tensor)
        for loaded in (symatomic.io.load(file), mts.load(file)):
            assert mts.equal(loaded, tensor)  # exact, values and gradients
            for original, block in zip(tensor.blocks(), loaded.blocks()):
                assert torch.equal(original.values, block.values)
                for parameter, gradient in original.gradients():
                    assert torch.equal(
                        gradient.values, block.gradient(parameter).values
                    )
    assert not any(f.startswith(".tmp") for f in os.listdir(tmp_path))
