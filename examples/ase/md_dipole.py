"""Molecular dynamics in ASE with an exported symatomic model, recording the dipole.

The model runs through metatomic's ASE calculator (``metatomic_ase``): energies and
forces drive the dynamics, and the dipole output (an ``o3_lambda=1, o3_sigma=1``
TensorMap) is requested as an *additional output* at every step, converted back to
Cartesian components and written as a time series. At the end, the infrared
spectrum (the Fourier transform of the autocorrelation of dμ/dt, Hann window) is
written too.

Train and export the bundled example first (``symatomic train --example``), then::

    python examples/ase/md_dipole.py outputs/<date-time>/model.pt --steps 2000

Outputs (in ``--output-dir``, default ``md-dipole``):

- ``dipole.csv``: step, time (fs), potential/kinetic/total energy (eV), temperature
  (K), μx, μy, μz (in the model's dipole unit, e·Bohr for the example) and, for
  models with calibrated uncertainties, the largest atomic energy uncertainty (eV;
  the calculator warns when it passes ``--uncertainty-threshold``, 0.1 eV);
- ``ir_spectrum.csv``: wavenumber (cm⁻¹) and intensity (arbitrary units);
- ``trajectory.xyz``: positions every ``--trajectory-every`` steps.
"""

import argparse
import csv
import os
from typing import List, Optional, Sequence

import ase
import ase.io
import numpy as np
import torch
from ase import units
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from ase.md.verlet import VelocityVerlet
from metatomic.torch import ModelOutput, load_atomistic_model
from metatomic_ase import MetatomicCalculator

from symatomic.cli import example_options_path
from symatomic.o3 import CartesianDecomposition

SPEED_OF_LIGHT_CM_PER_FS = 2.99792458e-5
UNCERTAINTY = "energy_uncertainty"


def default_structure() -> ase.Atoms:
    """The first water trimer of the bundled example data."""
    path = os.path.join(os.path.dirname(example_options_path()), "water_clusters.xyz")
    frames = ase.io.read(path, ":")
    return next(a for a in frames if len(a) == 9)


def dipole_output_name(model_path: str, requested: Optional[str]) -> str:
    """The model output holding the dipole: ``requested``, or ``mtt::dipole``."""
    outputs = load_atomistic_model(model_path).capabilities().outputs
    name = requested or "mtt::dipole"
    if name not in outputs:
        raise ValueError(
            f"the model has no output '{name}' (it has {list(outputs.keys())}); "
            "choose the dipole output with --dipole"
        )
    return name


def cartesian_dipole(calculator: MetatomicCalculator, name: str) -> np.ndarray:
    """The dipole of the last calculation as a Cartesian vector, shape ``(3,)``."""
    tensor = calculator.additional_outputs[name]
    if len(tensor) != 1:
        raise ValueError(f"'{name}' is not a single λ=1 block: keys {tensor.keys}")
    key = tensor.keys[0]
    if int(key["o3_lambda"]) != 1 or int(key["o3_sigma"]) != 1:
        raise ValueError(f"'{name}' is not a vector (o3_lambda=1, o3_sigma=1): {key}")
    values = tensor.block().values.detach().to(torch.float64)  # (1, 3, 1)
    cartesian = CartesianDecomposition(1).to_cartesian([values])  # (1, 3, 1)
    return cartesian.reshape(3).numpy()


def ir_spectrum(
    dipoles: np.ndarray, timestep_fs: float
) -> "tuple[np.ndarray, np.ndarray]":
    """Infrared spectrum from a dipole time series.

    :param dipoles: ``(n_steps, 3)`` dipoles at a constant time step
    :param timestep_fs: time between two rows (fs)
    :return: wavenumbers (cm⁻¹) and intensities (arbitrary units, max 1)
    """
    derivative = np.gradient(dipoles, timestep_fs, axis=0)
    derivative = derivative - derivative.mean(axis=0)
    n = derivative.shape[0]
    window = np.hanning(2 * n)[n:]
    spectrum = np.zeros(n + 1)
    for axis in range(3):
        # autocorrelation by FFT with zero padding (no wrap-around)
        transform = np.fft.rfft(derivative[:, axis], 2 * n)
        autocorrelation = np.fft.irfft(np.abs(transform) ** 2)[:n] / n
        spectrum += np.abs(np.fft.rfft(autocorrelation * window, 2 * n))
    frequencies = np.fft.rfftfreq(2 * n, timestep_fs)  # 1/fs
    wavenumbers = frequencies / SPEED_OF_LIGHT_CM_PER_FS
    peak = spectrum.max()
    return wavenumbers, spectrum / peak if peak > 0 else spectrum


def run(
    model: str,
    atoms: ase.Atoms,
    output_dir: str,
    steps: int = 2000,
    timestep_fs: float = 0.5,
    temperature_K: float = 300.0,
    thermostat: bool = False,
    friction_per_fs: float = 0.01,
    dipole: Optional[str] = None,
    trajectory_every: int = 10,
    seed: int = 0,
    uncertainty_threshold: float = 0.1,
) -> List[List[float]]:
    """Run the dynamics and write the files; return the rows of ``dipole.csv``."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    if timestep_fs <= 0:
        raise ValueError(f"the time step must be positive, got {timestep_fs} fs")
    name = dipole_output_name(model, dipole)
    os.makedirs(output_dir, exist_ok=True)

    atoms = atoms.copy()
    additional = {name: ModelOutput(sample_kind="system")}
    # calibrated models (symatomic train) declare per-atom energy uncertainties: the
    # calculator warns above its threshold, and the largest is recorded here
    with_uncertainty = UNCERTAINTY in load_atomistic_model(model).capabilities().outputs
    if with_uncertainty:
        additional[UNCERTAINTY] = ModelOutput(sample_kind="atom")
    atoms.calc = MetatomicCalculator(
        model,
        additional_outputs=additional,
        uncertainty_threshold=uncertainty_threshold,
    )
    thermalize_momenta(atoms, temperature_K, rng=np.random.default_rng(seed))
    Stationary(atoms)
    if thermostat:
        dynamics = Langevin(
            atoms,
            timestep=timestep_fs * units.fs,
            temperature_K=temperature_K,
            friction=friction_per_fs / units.fs,
            rng=np.random.default_rng(seed + 1),
        )
    else:
        dynamics = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)

    rows: List[List[float]] = []
    frames: List[ase.Atoms] = []

    def record() -> None:
        step = dynamics.nsteps
        potential = atoms.get_potential_energy()  # runs the model if needed
        kinetic = atoms.get_kinetic_energy()
        mu = cartesian_dipole(atoms.calc, name)
        rows.append(
            [
                step,
                step * timestep_fs,
                potential,
                kinetic,
                potential + kinetic,
                atoms.get_temperature(),
                *mu.tolist(),
            ]
        )
        if with_uncertainty:
            values = atoms.calc.additional_outputs[UNCERTAINTY].block().values
            rows[-1].append(float(values.detach().max()))
        if step % trajectory_every == 0:
            frames.append(atoms.copy())

    dynamics.attach(record, interval=1)  # also called once before the first step
    dynamics.run(steps)

    header = ["step", "time_fs", "epot_eV", "ekin_eV", "etot_eV", "T_K"]
    header += ["mu_x", "mu_y", "mu_z"]
    if with_uncertainty:
        header.append("max_energy_uncertainty_eV")
    _write_csv(os.path.join(output_dir, "dipole.csv"), header, rows)
    wavenumbers, intensity = ir_spectrum(np.array(rows)[:, 6:9], timestep_fs)
    _write_csv(
        os.path.join(output_dir, "ir_spectrum.csv"),
        ["wavenumber_cm-1", "intensity"],
        [[w, i] for w, i in zip(wavenumbers, intensity) if w <= 5000.0],
    )
    ase.io.write(os.path.join(output_dir, "trajectory.xyz"), frames)
    return rows


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[float]]):
    temporary = path + ".tmp"
    with open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(temporary, path)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="model.pt", help="exported model")
    parser.add_argument(
        "--structure",
        help="starting structure (any ASE format; default: a water "
        "trimer of the bundled example)",
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument(
        "--thermostat", action="store_true", help="Langevin (NVT) instead of NVE"
    )
    parser.add_argument("--dipole", help="name of the dipole output (mtt::dipole)")
    parser.add_argument("--output-dir", default="md-dipole")
    parser.add_argument("--trajectory-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--uncertainty-threshold",
        type=float,
        default=0.1,
        help="warn when an atomic energy uncertainty is above this (eV; 0.1)",
    )
    args = parser.parse_args(argv)

    if not os.path.exists(args.model):
        parser.error(f"model '{args.model}' does not exist")
    atoms = ase.io.read(args.structure) if args.structure else default_structure()
    rows = run(
        args.model,
        atoms,
        args.output_dir,
        steps=args.steps,
        timestep_fs=args.timestep,
        temperature_K=args.temperature,
        thermostat=args.thermostat,
        dipole=args.dipole,
        trajectory_every=args.trajectory_every,
        seed=args.seed,
        uncertainty_threshold=args.uncertainty_threshold,
    )
    total = np.array([row[4] for row in rows])
    print(
        f"{len(rows) - 1} steps of {args.timestep} fs; total energy varied by "
        f"{total.max() - total.min():.4g} eV; results in {args.output_dir}/"
    )


if __name__ == "__main__":
    main()
