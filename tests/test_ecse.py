"""ECSE: exact O(3) equivariance (local and global), smoothness, degenerate inputs,
locality. Everything in float64 with fresh random rotations, inversions and
permutations."""

import ase
import numpy as np
import pytest
import torch

import symatomic.io
from conftest import (
    TINY_MODEL,
    predict_structure,
    random_operation,
    relative_error,
    transform_atoms,
)
from symatomic.data import compute_neighbors, structure_from_atoms
from symatomic.data.targets import parse_target_options
from symatomic.ecse import ECSEFrames, check_ecse_options
from symatomic.model import SymatomicModel
from symatomic.symmetrize import symmetrize_model

IRREPS = [{"o3_lambda": lam, "o3_sigma": s} for lam in range(5) for s in (1, -1)]
TYPES = [1, 6, 8]


def _specs(stress=False):
    energy = parse_target_options("energy", {"unit": "eV"}, "x")
    if stress:
        energy.stress = energy.forces
    return {
        "energy": energy,
        "mtt::tensor": parse_target_options(
            "mtt::tensor", {"type": {"spherical": {"irreps": IRREPS}}}, "x"
        ),
        "mtt::atomic": parse_target_options(
            "mtt::atomic",
            {"sample_kind": "atom", "type": {"spherical": {"irreps": IRREPS}}},
            "x",
        ),
    }


def _model(ecse, stress=False, seed=0):
    torch.manual_seed(seed)
    hypers = dict(TINY_MODEL)
    hypers["ecse"] = ecse
    model = SymatomicModel(hypers, TYPES, _specs(stress)).to(torch.float64).eval()
    return model


def _random_molecule(rng, n_atoms=8):
    positions = []
    while len(positions) < n_atoms:
        candidate = rng.normal(scale=1.2, size=3)
        if all(np.linalg.norm(candidate - p) > 0.8 for p in positions):
            positions.append(candidate)
    return ase.Atoms(numbers=rng.choice(TYPES, n_atoms), positions=np.array(positions))


def _random_crystal(rng):
    cell = np.eye(3) * 3.6 + rng.normal(scale=0.2, size=(3, 3))
    return ase.Atoms(
        numbers=rng.choice(TYPES, 5),
        scaled_positions=rng.uniform(size=(5, 3)),
        cell=cell,
        pbc=True,
    )


def _check_equivariance(predict, atoms, specs, seed, improper, periodic):
    rng = np.random.default_rng(seed)
    rotation, wigner = random_operation(seed, improper)
    permutation = rng.permutation(len(atoms))
    blocks, forces, stress = predict(atoms)
    new_blocks, new_forces, new_stress = predict(
        transform_atoms(atoms, rotation.numpy(), permutation)
    )
    errors = {}
    errors["energy"] = relative_error(blocks["energy"][0], new_blocks["energy"][0])
    errors["forces"] = relative_error(
        (forces["energy"] @ rotation.T)[permutation], new_forces["energy"]
    )
    if periodic:
        errors["stress"] = relative_error(
            rotation @ stress["energy"][0] @ rotation.T, new_stress["energy"][0]
        )
    for name in ("mtt::tensor", "mtt::atomic"):
        for block, old, new in zip(specs[name].blocks, blocks[name], new_blocks[name]):
            parity = block.o3_sigma * (-1) ** block.o3_lambda if improper else 1
            expected = parity * torch.einsum(
                "mn,snp->smp", wigner[block.o3_lambda], old
            )
            if name == "mtt::atomic":
                expected = expected[permutation]
            key = f"{name} λ={block.o3_lambda} σ={block.o3_sigma}"
            errors[key] = relative_error(expected, new)
            assert float(old.abs().max()) > 1e-8, f"{key} is trivially zero"
    return errors


@pytest.mark.parametrize("frame_layers", [None, 1])
@pytest.mark.parametrize("periodic", [False, True])
def test_local_ecse_is_exactly_equivariant(frame_layers, periodic):
    specs = _specs(stress=periodic)
    model = _model({"mode": "local", "frame_layers": frame_layers}, stress=periodic)
    rng = np.random.default_rng(int(torch.randint(0, 2**30, (1,))))
    for trial in range(3):
        atoms = _random_crystal(rng) if periodic else _random_molecule(rng)
        seed = int(rng.integers(2**30))
        errors = _check_equivariance(
            lambda a: predict_structure(model, a, specs),
            atoms,
            specs,
            seed,
            trial % 2 == 1,
            periodic,
        )
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-10, (worst, errors[worst])


def test_unsymmetrized_pet_is_not_equivariant():
    """The same check detects the (approximate) symmetry of plain PET."""
    specs = _specs()
    model = _model({"mode": "none"})
    atoms = _random_molecule(np.random.default_rng(0))
    errors = _check_equivariance(
        lambda a: predict_structure(model, a, specs), atoms, specs, 3, True, False
    )
    assert errors["energy"] > 1e-6 and errors["mtt::tensor λ=2 σ=1"] > 1e-3


@pytest.mark.parametrize("periodic", [False, True])
def test_global_ecse_is_exactly_equivariant(periodic):
    specs = _specs()
    model = _model({"mode": "none"})
    symmetrized = symmetrize_model(model.export(), max_lambda=4)

    def predict(atoms):
        predictions = symatomic.io.predict(symmetrized, [atoms], stress=periodic)
        energy = predictions["energy"].block()
        blocks = {"energy": [energy.values.reshape(1, 1, 1)]}
        forces = {"energy": -energy.gradient("positions").values[:, :, 0]}
        stress = {}
        if periodic:
            volume = abs(np.linalg.det(atoms.cell.array))
            stress["energy"] = energy.gradient("strain").values[:, :, :, 0] / volume
        for name in ("mtt::tensor", "mtt::atomic"):
            tensor = predictions[name]
            blocks[name] = [tensor.block(key).values for key in specs[name].keys()]
        return blocks, forces, stress

    rng = np.random.default_rng(int(torch.randint(0, 2**30, (1,))))
    for trial in range(2):
        atoms = _random_crystal(rng) if periodic else _random_molecule(rng, 6)
        seed = int(rng.integers(2**30))
        errors = _check_equivariance(predict, atoms, specs, seed, trial == 1, periodic)
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-10, (worst, errors[worst])


def _energy_and_forces(model, atoms):
    specs = {"energy": model.target_specs["energy"]}
    blocks, forces, _ = predict_structure(model, atoms, specs)
    return float(blocks["energy"][0].sum().detach()), forces["energy"].detach().numpy()


def _assert_continuous(energy_of, start, stop, label):
    """A discontinuity keeps its jump however finely the scan is refined; a steep
    but continuous variation does not. The largest jumps of a scan are refined
    three times twentyfold (a step 8000 times smaller)."""
    steps = np.linspace(start, stop, 121)
    energies = np.array([energy_of(t) for t in steps])
    assert np.all(np.isfinite(energies)), label
    jumps = np.abs(np.diff(energies))
    for index in np.argsort(jumps)[-2:]:
        if jumps[index] == 0:
            continue
        low, high, jump = steps[index], steps[index + 1], jumps[index]
        for _ in range(3):
            fine = np.linspace(low, high, 21)
            fine_jumps = np.abs(np.diff([energy_of(t) for t in fine]))
            worst = int(np.argmax(fine_jumps))
            low, high = fine[worst], fine[worst + 1]
        assert fine_jumps[worst] < 0.05 * jump, (label, steps[index])


@pytest.mark.parametrize("frame_layers", [None, 1])
def test_smooth_scans(frame_layers):
    """Energy continuous and forces = -dE/dx while a neighbor crosses the inner and
    outer cutoffs and three atoms become collinear."""
    model = _model({"mode": "local", "frame_layers": frame_layers})
    base = ase.Atoms(
        "CHHO", positions=[[0, 0, 0], [1.1, 0, 0], [-0.3, 1.0, 0.2], [0.2, -0.4, 1.2]]
    )
    direction = np.array([0.0, -0.3, 1.0]) / np.linalg.norm([0.0, -0.3, 1.0])

    def radial(t):
        # the O atom moves out through the adaptive inner cutoffs and the cutoff
        atoms = base.copy()
        atoms.positions[3] = t * direction
        return _energy_and_forces(model, atoms)[0]

    def bend(angle):
        # C-H-O goes to collinear (and beyond)
        theta = np.radians(angle)
        atoms = ase.Atoms(
            "CHOH",
            positions=[
                [-1.1, 0, 0],
                [0, 0, 0],
                [1.2 * np.cos(np.pi - theta), 1.2 * np.sin(np.pi - theta), 0],
                [-1.5, 1.0, 0.3],
            ],
        )
        return _energy_and_forces(model, atoms)[0]

    _assert_continuous(radial, 0.8, 3.7, "radial")
    _assert_continuous(bend, 150.0, 210.0, "collinear")

    # finite differences at points of the scans
    rng = np.random.default_rng(0)
    for t in (1.0, 2.0, 2.9, 3.3):
        atoms = base.copy()
        atoms.positions[3] = t * direction
        atoms.positions += rng.normal(scale=0.01, size=atoms.positions.shape)
        _, forces = _energy_and_forces(model, atoms)
        delta = 1e-5
        for i in range(len(atoms)):
            for k in range(3):
                plus, minus = atoms.copy(), atoms.copy()
                plus.positions[i, k] += delta
                minus.positions[i, k] -= delta
                numerical = -(
                    _energy_and_forces(model, plus)[0]
                    - _energy_and_forces(model, minus)[0]
                ) / (2 * delta)
                assert abs(numerical - forces[i, k]) < 1e-6 * max(1.0, abs(numerical))


@pytest.mark.parametrize("mode", ["local", "global"])
def test_degenerate_structures_are_finite(mode):
    structures = {
        "one atom": ase.Atoms("O", positions=[[0, 0, 0]]),
        "H2": ase.Atoms("HH", positions=[[0, 0, 0], [0.74, 0, 0]]),
        "CO2": ase.Atoms("OCO", positions=[[-1.16, 0, 0], [0, 0, 0], [1.16, 0, 0]]),
        "chain": ase.Atoms("CCCC", positions=[[1.3 * i, 0, 0] for i in range(4)]),
        "planar": ase.Atoms(
            "COHH", positions=[[0, 0, 0], [1.2, 0, 0], [-0.6, 0.9, 0], [-0.6, -0.9, 0]]
        ),
        "tetrahedral": ase.Atoms(
            "CHHHH",
            positions=[
                [0, 0, 0],
                [0.63, 0.63, 0.63],
                [-0.63, -0.63, 0.63],
                [-0.63, 0.63, -0.63],
                [0.63, -0.63, -0.63],
            ],
        ),
    }
    if mode == "local":
        model = _model({"mode": "local"})
        for name, atoms in structures.items():
            rotation, _ = random_operation(7, False)
            blocks, forces, _ = predict_structure(model, atoms, model.target_specs)
            assert all(torch.isfinite(b).all() for b in blocks["mtt::tensor"]), name
            assert torch.isfinite(forces["energy"]).all(), name
            # degenerate environments use the invariant fallback: still invariant
            rotated = predict_structure(
                model,
                transform_atoms(atoms, rotation.numpy(), np.arange(len(atoms))),
                model.target_specs,
            )
            assert (
                relative_error(blocks["energy"][0], rotated[0]["energy"][0]) < 1e-10
            ), name
    else:
        symmetrized = symmetrize_model(_model({"mode": "none"}).export(), max_lambda=4)
        for name, atoms in structures.items():
            predictions = symatomic.io.predict(symmetrized, [atoms])
            energy = predictions["energy"].block()
            assert torch.isfinite(energy.values).all(), name
            assert torch.isfinite(energy.gradient("positions").values).all(), name


def _inner_cutoff_along(module, angles):
    """Inner cutoff of a center with neighbors at 0.62 Å (along x), 1.72 Å (at
    ``angle`` from it) and 3.3 Å (well off the axis), as the second neighbor
    turns collinear with the first: the geometry where a trained ECSE model
    showed force spikes of 4e3 eV/Å² (an H atom next to a compressed O-H)."""
    values = []
    for angle in angles:
        theta = np.radians(angle)
        vectors = torch.tensor(
            [
                [0.62, 0.0, 0.0],
                [1.72 * np.cos(theta), 1.72 * np.sin(theta), 0.0],
                [0.3, 3.2, 0.8],
            ],
            dtype=torch.float64,
        )
        distances = torch.linalg.norm(vectors, dim=1)
        centers = torch.zeros(3, dtype=torch.long)
        r_in = module.inner_cutoffs(
            centers, distances, vectors / distances.unsqueeze(1), 1
        )
        values.append(float(r_in[0]))
    return np.array(values)


def test_inner_cutoff_moves_smoothly_as_a_pair_turns_collinear():
    """The penalty of near-collinear pairs is bounded: the inner cutoff moves by
    at most ~collinear_penalty, at a slope of a few Å per Å of motion of the
    neighbor, where pushing such pairs out to the outer cutoff (the construction
    before checkpoint version 4) moved it by 1.5 Å at ~40 Å/Å."""
    angles = np.linspace(5.0, 60.0, 2201)
    arc = np.radians(angles[1] - angles[0]) * 1.72  # Å moved per step
    new = _inner_cutoff_along(ECSEFrames(4.5), angles)
    old = _inner_cutoff_along(ECSEFrames(4.5, collinear_penalty=None), angles)
    new_slope = np.abs(np.diff(new)).max() / arc
    old_slope = np.abs(np.diff(old)).max() / arc
    assert new.max() - new.min() < 0.7  # bounded by the penalty (0.5 Å) + smax
    assert new_slope < 6.0, new_slope
    assert old_slope > 3 * new_slope, (old_slope, new_slope)


def test_local_ecse_is_local():
    """A per-atom prediction does not change when atoms beyond the interaction range
    ((num_gnn_layers + 1) x cutoff) are added or moved."""
    model = _model({"mode": "local"})
    rng = np.random.default_rng(5)
    core = _random_molecule(rng, 5)
    far = _random_molecule(rng, 4)
    far.positions += np.array([2 * model.cutoff + 6.0, 0, 0]) + core.positions.max(0)
    specs = {"mtt::atomic": model.target_specs["mtt::atomic"]}
    alone = predict_structure(model, core, specs)[0]["mtt::atomic"]
    together = predict_structure(model, core + far, specs)[0]["mtt::atomic"]
    moved = far.copy()
    moved.positions += rng.normal(scale=0.5, size=moved.positions.shape)
    together_moved = predict_structure(model, core + moved, specs)[0]["mtt::atomic"]
    for a, b, c in zip(alone, together, together_moved):
        assert (
            torch.equal(a, b[: len(core)]) or relative_error(a, b[: len(core)]) < 1e-13
        )
        assert relative_error(b[: len(core)], c[: len(core)]) < 1e-13


def test_frames_rotate_with_the_structure():
    rng = np.random.default_rng(3)
    atoms = _random_molecule(rng, 10)
    frames = ECSEFrames(3.5)

    def compute(a):
        structure = structure_from_atoms(a, "x")
        compute_neighbors(structure, 3.5)
        n = len(structure)
        vectors = structure.pair_vectors()
        return frames(structure.centers, vectors, n, torch.arange(n), n)

    first = compute(atoms)
    rotation, _ = random_operation(11, False)
    second = compute(transform_atoms(atoms, rotation.numpy(), np.arange(len(atoms))))
    assert first.weights.shape == second.weights.shape
    torch.testing.assert_close(second.weights, first.weights, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(
        second.rotations, rotation @ first.rotations, atol=1e-12, rtol=0
    )
    # every weight normalisation includes the fallback and is positive
    assert bool(torch.all(first.normalization > 0))


def test_ecse_options():
    assert check_ecse_options(None)["mode"] == "auto"  # resolved with the backbone
    assert check_ecse_options("local")["inversion"] is True
    with pytest.raises(ValueError, match="unknown option 'modes'"):
        check_ecse_options({"modes": "local"})
    with pytest.raises(ValueError, match="mode must be 'none', 'local' or 'auto'"):
        check_ecse_options({"mode": "global"})
    with pytest.raises(ValueError, match="frame_layers must be between 1 and 2"):
        _model({"mode": "local", "frame_layers": 3})


def test_finetune_and_symmetrize_a_trained_pet(synthetic_file, tmp_path):
    """Train PET without ECSE, then (1) export it with ECSE (same weights) and
    (2) fine-tune it with ECSE in the loop."""
    from conftest import tiny_options
    from symatomic.cli import main
    from symatomic.options import check_options
    from symatomic.train import Trainer

    targets = {
        "energy": {"key": "energy", "unit": "eV"},
        "mtt::dipole": {"key": "dipole", "type": {"cartesian": {"rank": 1}}},
    }
    options = check_options(tiny_options(synthetic_file, targets, epochs=1))
    Trainer(options, str(tmp_path / "plain"), progress=False).run()

    exported = tmp_path / "symmetrized.pt"
    checkpoint = str(tmp_path / "plain" / "model.ckpt")
    assert main(["export", checkpoint, "-o", str(exported), "--ecse", "local"]) == 0
    atoms = _random_molecule(np.random.default_rng(1), 6)
    rotation, wigner = random_operation(5, True)
    first = symatomic.io.predict(str(exported), [atoms])
    second = symatomic.io.predict(
        str(exported), [transform_atoms(atoms, rotation.numpy(), np.arange(6))]
    )
    dipole = first["mtt::dipole"].block().values[0]
    rotated = second["mtt::dipole"].block().values[0]
    # a polar vector: parity -1 under the inversion included in the operation
    assert relative_error(-wigner[1] @ dipole, rotated) < 1e-10

    options = tiny_options(synthetic_file, targets, epochs=1)
    options["architecture"]["model"]["ecse"] = {"mode": "local"}
    options["architecture"]["training"]["finetune"] = {"read_from": checkpoint}
    result = Trainer(
        check_options(options), str(tmp_path / "tuned"), progress=False
    ).run()
    assert result.history and "val:energy" in result.history[0]

    options["architecture"]["model"]["d_pet"] = 8
    with pytest.raises(ValueError, match=r"hyper-parameters \['d_pet'\] differ"):
        Trainer(check_options(options), str(tmp_path / "bad"), progress=False).run()


def test_nve_conserves_energy(tmp_path):
    """Velocity Verlet in ASE (through metatomic's calculator) with an exported local
    ECSE model conserves the total energy, as it would not if frames or weights
    switched non-smoothly.

    The model has random weights: its forces are random and large, and with real
    masses they crush the molecule within a few femtoseconds into geometries no
    trained model would visit. Heavy masses (50 u) keep the water trimer near
    physical geometries for the 100 fs of the run."""
    import ase.io
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet
    from metatomic_ase import MetatomicCalculator

    from symatomic.cli import example_options_path
    from symatomic.train import export_model

    model = _model({"mode": "local"})
    path = tmp_path / "ecse.pt"
    export_model(model, str(path))
    example = example_options_path().replace("options.yaml", "water_clusters.xyz")
    atoms = next(a for a in ase.io.iread(example) if len(a) == 9)  # a water trimer
    atoms.set_masses(np.full(len(atoms), 50.0))
    atoms.calc = MetatomicCalculator(str(path))
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    total, potential = [], []
    for _ in range(100):
        dynamics.run(1)
        potential.append(atoms.get_potential_energy())
        total.append(potential[-1] + atoms.get_kinetic_energy())
    total, potential = np.array(total), np.array(potential)
    distances = atoms.get_all_distances()[np.triu_indices(len(atoms), 1)]
    assert distances.min() > 0.8, "the run left physical geometries"
    # the potential energy moves by ~1.2 eV; the total energy stays within ~0.5 meV
    change = potential.max() - potential.min()
    assert change > 0.5
    assert np.abs(total - total[0]).max() < 5e-3 * change
    times = np.arange(len(total)) * 1e-3  # ps
    drift = np.polyfit(times, total, 1)[0]  # eV/ps
    assert abs(drift) * times[-1] < 2e-3 * change


def test_exported_ecse_model_loads_without_extensions(tmp_path):
    """An exported ECSE model (Wigner-D matrices inside) loads in a fresh Python that
    has imported nothing but metatomic: no TorchScript extension is needed, as in
    LAMMPS or i-PI."""
    import subprocess
    import sys

    from symatomic.train import export_model

    path = tmp_path / "ecse.pt"
    export_model(_model({"mode": "local"}), str(path))
    script = (
        "import sys, metatomic.torch as mta\n"
        "model = mta.load_atomistic_model(sys.argv[1])\n"
        "print(sorted(model.capabilities().outputs))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "mtt::tensor" in result.stdout
