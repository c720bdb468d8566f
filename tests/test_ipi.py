"""i-PI runs exported symatomic models through its own metatomic PES: in-process
(``<ffdirect>``, driven from Python with ``InteractiveSimulation``) and through a
socket with i-PI's Python driver (``examples/ipi/run_nvt.py``).

i-PI works in atomic units (Hartree, Bohr) and converts with its own constants, whose
eV/Hartree factor (0.036749326) is rounded to 8 digits: it differs from CODATA (and
ASE) by 1e-7 relative. Energies and forces are therefore compared in i-PI's units,
converting the model's eV and eV/Å with i-PI's factors; the positions go through the
same (Å → Bohr → Å) factor twice and reach the model unchanged to the last digit or
so."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from typing import Iterator, Tuple

import ase
import ase.io
import numpy as np
import pytest
import torch

pytest.importorskip("ipi", reason="i-PI is not installed (pip install ipi)")
pytest.importorskip("ipi.pes.metatomic", reason="this i-PI has no metatomic PES")
pytest.importorskip("vesin.metatomic", reason="i-PI's metatomic PES needs vesin")

from ipi.scripting import InteractiveSimulation  # noqa: E402
from ipi.utils.depend import dstrip  # noqa: E402
from ipi.utils.softexit import softexit  # noqa: E402
from ipi.utils.units import unit_to_internal, unit_to_user  # noqa: E402

import symatomic.io  # noqa: E402
from conftest import TINY_MODEL  # noqa: E402
from symatomic.cli import example_options_path  # noqa: E402
from symatomic.data.targets import parse_target_options  # noqa: E402
from symatomic.model import SymatomicModel  # noqa: E402
from symatomic.train import export_model  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "ipi")
BOX = 30.0  # Å: wider than the trimer plus the cutoff, so no atom sees an image

#: limit (s) of one i-PI run: these take a few seconds on an idle machine; the limit
#: only has to catch a real hang, also on a loaded machine (it is multiplied by
#: SYMATOMIC_TEST_TIME_SCALE when set)
TIME_LIMIT = 600.0 * float(os.environ.get("SYMATOMIC_TEST_TIME_SCALE", "1"))


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds`` (an in-process i-PI run
    has no timeout of its own)."""

    def _expire(signum, frame):
        raise TimeoutError(f"i-PI ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_time_limit_stops_a_hang():
    """The limit of the in-process runs still ends a run that hangs."""
    import time

    start = time.monotonic()
    with pytest.raises(TimeoutError, match="more than 0.1 s"):
        with _time_limit(0.1):
            time.sleep(60)
    assert time.monotonic() - start < 30


@pytest.fixture(autouse=True)
def _restore_ipi_state() -> Iterator[None]:
    """An i-PI simulation intercepts SIGINT and SIGTERM and registers itself for its
    exit procedure; give them back after each test."""
    yield
    if hasattr(softexit, "reset"):
        softexit.reset()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    """A tiny exported float64 PET with local ECSE, an energy and a dipole (i-PI
    uses the energy only). Its weights are random; with a reduced energy scale and
    heavy atoms (50 u, see ``_input``) its dynamics stays smooth, as in test_ecse.py."""
    torch.manual_seed(3)
    hypers = dict(TINY_MODEL)
    hypers["ecse"] = {"mode": "local"}
    specs = {
        "energy": parse_target_options("energy", {"unit": "eV"}, "x"),
        "mtt::dipole": parse_target_options(
            "mtt::dipole", {"unit": "e*Bohr", "type": {"cartesian": {"rank": 1}}}, "x"
        ),
    }
    model = SymatomicModel(hypers, [1, 8], specs).to(torch.float64).eval()
    model.readouts["energy"].scale.mul_(0.3)
    path = str(tmp_path_factory.mktemp("ipi-model") / "model.pt")
    export_model(model, path)
    return path


def _water_trimer() -> ase.Atoms:
    example = example_options_path().replace("options.yaml", "water_clusters.xyz")
    atoms = next(a for a in ase.io.iread(example) if len(a) == 9)
    return ase.Atoms(numbers=atoms.numbers, positions=atoms.positions)


@pytest.fixture
def trimer(tmp_path) -> Tuple[str, str]:
    """The first water trimer of the bundled example in a periodic box (i-PI needs
    a cell, and its metatomic PES makes any non-zero cell periodic), as an extended
    XYZ file (the PES's template, read by ASE) and as an i-PI XYZ file in Å (i-PI's
    starting configuration: i-PI reads ``mode='ase'`` files with ASE's Bohr, which
    differs from the Bohr of its metatomic PES by 1.4e-8 relative)."""
    atoms = _water_trimer()
    atoms.positions = np.round(atoms.positions + BOX / 2 - atoms.positions.mean(0), 8)
    atoms.cell = np.eye(3) * BOX
    atoms.pbc = True
    template = str(tmp_path / "trimer.xyz")
    ase.io.write(template, atoms, format="extxyz")
    lines = [
        str(len(atoms)),
        f"# CELL(abcABC): {BOX} {BOX} {BOX} 90 90 90 cell{{angstrom}} "
        "positions{angstrom}",
    ]
    for symbol, position in zip(atoms.get_chemical_symbols(), atoms.positions):
        lines.append(f"{symbol} {position[0]:.8f} {position[1]:.8f} {position[2]:.8f}")
    start = str(tmp_path / "trimer-ipi.xyz")
    with open(start, "w") as file:
        file.write("\n".join(lines) + "\n")
    return template, start


def _input(model: str, trimer: Tuple[str, str], steps: int, timestep_fs: float) -> str:
    """i-PI input: NVE with the model in-process (ffdirect + i-PI's metatomic PES),
    with 50 u atoms."""
    template, start = trimer
    masses = ", ".join(["50"] * 9)
    return f"""
<simulation verbosity='quiet'>
  <ffdirect name='symatomic'>
    <pes>metatomic</pes>
    <parameters>{{template: {template}, model: {model}}}</parameters>
  </ffdirect>
  <output prefix='nve'>
    <properties stride='1' filename='out'>
      [ step, time{{picosecond}}, conserved{{electronvolt}}, potential{{electronvolt}},
        kinetic_md{{electronvolt}} ]
    </properties>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>7</seed></prng>
  <system>
    <initialize nbeads='1'>
      <file mode='xyz' units='angstrom' cell_units='angstrom'>{start}</file>
      <masses mode='manual' units='dalton'>[{masses}]</masses>
      <velocities mode='thermal' units='kelvin'>300</velocities>
    </initialize>
    <forces><force forcefield='symatomic'/></forces>
    <motion mode='dynamics'>
      <dynamics mode='nve'>
        <timestep units='femtosecond'>{timestep_fs}</timestep>
      </dynamics>
    </motion>
  </system>
</simulation>
"""


def test_ffdirect_energy_and_forces_are_the_model(
    model_path, trimer, tmp_path, monkeypatch
):
    """At the starting configuration, i-PI's potential energy (Hartree) and forces
    (Hartree/Bohr) are the model's (eV, eV/Å) on the isolated trimer, converted with
    i-PI's factors, to float64 round-off."""
    monkeypatch.chdir(tmp_path)
    with _time_limit(TIME_LIMIT):
        simulation = InteractiveSimulation(_input(model_path, trimer, 1, 0.5))
        system = simulation.syslist[0]
        energy = float(dstrip(system.forces.pot))
        forces = dstrip(system.forces.f).reshape(-1, 3).copy()

    isolated = ase.io.read(trimer[0])
    isolated.pbc = False
    reference = symatomic.io.predict(model_path, isolated, outputs=["energy"])
    block = reference["energy"].block()
    expected_energy = unit_to_internal("energy", "electronvolt", block.values.item())
    gradient = block.gradient("positions").values.reshape(-1, 3).numpy()
    expected_forces = unit_to_internal("force", "ev/ang", -gradient)

    assert np.isfinite(energy) and np.abs(forces).max() > 0
    # float64 throughout; the positions differ from the file's by a few ulps after
    # i-PI's Å → Bohr → Å, and the neighbours are summed in another order
    assert abs(energy - expected_energy) <= 1e-10 * abs(expected_energy)
    scale = np.abs(expected_forces).max()
    assert np.abs(forces - expected_forces).max() <= 1e-9 * scale
    # with the ASE/CODATA eV the energies would differ by 1e-7 relative
    in_ev = unit_to_user("energy", "electronvolt", energy)
    assert abs(in_ev - block.values.item()) <= 1e-12 * abs(in_ev)


def test_ffdirect_nve_conserves_energy(model_path, trimer, tmp_path, monkeypatch):
    """Velocity Verlet in i-PI (200 steps of 1 fs from 300 K) conserves i-PI's
    conserved quantity while the potential energy moves by more than an eV.

    The random model pulls some O-H bonds to ~0.65 Å within the run (real bonds:
    0.97 Å), but no atoms collapse onto each other."""
    monkeypatch.chdir(tmp_path)
    steps, chunk = 200, 10
    shortest = np.inf
    with _time_limit(TIME_LIMIT):
        simulation = InteractiveSimulation(_input(model_path, trimer, steps, 1.0))
        for _ in range(steps // chunk):
            simulation.run(chunk)
            atoms = simulation.get_structures()
            distances = atoms.get_all_distances()[np.triu_indices(len(atoms), 1)]
            shortest = min(shortest, distances.min())

    data = np.loadtxt(tmp_path / "nve.out")
    assert data.shape == (steps + 1, 5)
    times, conserved, potential = data[:, 1], data[:, 2], data[:, 3]  # ps, eV, eV
    assert shortest > 0.5, "atoms collapsed onto each other"
    change = potential.max() - potential.min()
    assert change > 0.5
    # the conserved quantity stays within 1e-4 of the potential energy's range (the
    # ASE test in test_ecse.py allows 5e-3), with a drift below 1e-4 of it
    assert np.abs(conserved - conserved[0]).max() < 5e-4 * change
    drift = np.polyfit(times, conserved, 1)[0]  # eV/ps
    assert abs(drift) * times[-1] < 2e-4 * change


def test_socket_example(model_path, tmp_path):
    """examples/ipi/run_nvt.py: i-PI (NVT, SVR) and i-PI's Python driver with the
    metatomic PES talk through a UNIX socket for a few steps; the driver's energy at
    step 0 is the model's."""
    bin_dir = os.path.dirname(sys.executable)
    for command in ("i-pi", "i-pi-py_driver"):
        if not (
            os.path.exists(os.path.join(bin_dir, command)) or shutil.which(command)
        ):
            pytest.skip(f"i-PI's '{command}' command is not installed")
    output = tmp_path / "nvt"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(EXAMPLE, "run_nvt.py"),
            model_path,
            *("--steps", "4", "--output-dir", str(output)),
            *("--timeout", str(TIME_LIMIT)),
        ],
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT + 60,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    logs = ""
    for name in ("i-pi.log", "driver.log"):
        if (output / name).exists():
            logs += f"\n--- {name}\n" + (output / name).read_text()[-3000:]
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert str(output / "simulation.out") in result.stdout

    data = np.loadtxt(output / "simulation.out")
    assert data.shape == (5, 6)
    assert np.all(np.isfinite(data))
    assert (output / "simulation.pos_0.xyz").exists()
    # i-PI prints 9 significant digits
    atoms = ase.io.read(output / "init.xyz")
    atoms.pbc = False
    reference = symatomic.io.predict(model_path, atoms, outputs=["energy"])
    expected = reference["energy"].block().values.item()
    assert abs(data[0, 5] - expected) <= 1e-7 * abs(expected)


def test_socket_example_prints_the_spread_of_the_energy_ensemble(tmp_path):
    """examples/ipi/run_nvt.py --ensemble: the metatomic PES evaluates the model's
    last-layer energy ensemble (symatomic.uncertainty), i-PI writes the members
    (committee_pot extras) and the script prints their spread."""
    bin_dir = os.path.dirname(sys.executable)
    for command in ("i-pi", "i-pi-py_driver"):
        if not (
            os.path.exists(os.path.join(bin_dir, command)) or shutil.which(command)
        ):
            pytest.skip(f"i-PI's '{command}' command is not installed")
    torch.manual_seed(3)
    specs = {"energy": parse_target_options("energy", {"unit": "eV"}, "x")}
    model = SymatomicModel(dict(TINY_MODEL), [1, 8], specs).to(torch.float64).eval()
    model.readouts["energy"].scale.mul_(0.3)
    block = model.readouts["energy"].uncertainty[0]
    size = block.n_features
    block.covariance_root = torch.eye(size, dtype=torch.float64) * 1e-2
    block.calibration = torch.ones(1, dtype=torch.float64)
    block.ensemble_weights = 1e-3 * torch.randn(size, 5, 1, dtype=torch.float64)
    path = str(tmp_path / "model.pt")
    export_model(model, path)
    output = tmp_path / "nvt"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(EXAMPLE, "run_nvt.py"),
            path,
            *("--steps", "3", "--output-dir", str(output), "--ensemble"),
            *("--timeout", str(TIME_LIMIT)),
        ],
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT + 60,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    logs = ""
    for name in ("i-pi.log", "driver.log"):
        if (output / name).exists():
            logs += f"\n--- {name}\n" + (output / name).read_text()[-3000:]
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert "ensemble:    5 members" in result.stdout, result.stdout + logs
    sys.path.insert(0, EXAMPLE)
    try:
        import run_nvt
    finally:
        sys.path.pop(0)
    members = run_nvt.ensemble_members(str(output))
    assert members.shape[1] == 5 and members.shape[0] >= 3
    assert float(members.std(axis=1).min()) > 0
