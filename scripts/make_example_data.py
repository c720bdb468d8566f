#!/usr/bin/env python
"""Generate the bundled example data set ``src/symatomic/examples/water_clusters.xyz``.

The data set is a small but *real* quantum-chemistry data set of water monomers,
dimers and trimers computed with PySCF.  For every structure we store

========================  ========  ==========================================
key                       where     meaning (units)
========================  ========  ==========================================
``energy``                info      total electronic + nuclear energy (eV)
``forces``                arrays    analytic forces, ``-dE/dR`` (eV/Angstrom)
``dipole``                info      total dipole moment incl. nuclei, 3 numbers
                                    (atomic units, e*Bohr)
``polarizability``        info      static dipole polarizability alpha_ij,
                                    9 numbers, row-major 3x3 (a.u., Bohr^3)
``hyperpolarizability``   info      static first hyperpolarizability beta_ijk,
                                    27 numbers, index order i (slowest), j, k
                                    (atomic units)
``config_type``           info      how the geometry was generated
``structure_id``          info      running index in the generated list
========================  ========  ==========================================

Sign conventions (all in atomic units, uniform static field ``F``)::

    E(F)    = E0 - mu_i F_i - 1/2 alpha_ij F_i F_j - 1/6 beta_ijk F_i F_j F_k
    mu_i(F) = mu_i + alpha_ij F_j + 1/2 beta_ijk F_j F_k

i.e. the Taylor ("B") convention.  The field enters the electronic Hamiltonian
as ``+F.r`` (electrons carry charge -1), the dipole is
``sum_A Z_A R_A - Tr(D r)`` (it points from the negative to the positive end,
e.g. from O towards the H atoms in water) and is origin independent because
all structures are neutral.

How the properties are computed
-------------------------------
* Restricted Kohn-Sham B3LYP (PySCF's ``"b3lyp"``, the VWN-RPA variant used by
  Gaussian), neutral singlets; def2-SVP basis and PySCF grid level 3 by
  default (basis and grid are options).
* Forces: analytic nuclear gradients including the grid-weight response.
* Dipole: ``mf.dip_moment(unit="AU")``.
* Polarizability: analytic, coupled-perturbed Kohn-Sham (CPKS) with the full
  B3LYP response kernel (``mf.gen_response`` + ``pyscf.scf.cphf.solve``).
* Hyperpolarizability (``--beta-method``):

  - ``analytic`` (default): from the first-order CPKS response via the 2n+1
    rule, including the third functional derivative of the XC energy (see
    :func:`analytic_hyperpolarizability`).  Costs about one extra response
    evaluation.
  - ``fd``: central finite differences of the CPKS polarizability with respect
    to a uniform field added to the core Hamiltonian,
    ``beta_ijk = [alpha_ij(+h e_k) - alpha_ij(-h e_k)] / (2h)``, h = 1e-3 a.u.
    (6 extra SCF + CPKS runs, ~5x the cost of everything else).  As a
    by-product the field-dependent SCF runs give ``d mu / d F``, whose
    deviation from the CPKS polarizability is logged per structure.

  The static beta is a third derivative of the energy and therefore exactly
  symmetric under all index permutations; both methods return the
  permutation-symmetric tensor (for ``fd`` the asymmetry of the raw tensor, an
  O(h^2) truncation effect, is logged).  The two methods agree to ~1e-4
  relative, and the difference decreases as h^2 (``--self-check``).

Geometries
----------
Monomers have random O-H bond lengths (0.90-1.10 A) and H-O-H angles
(95-115 deg).  Clusters are grown molecule by molecule: every new (distorted)
water is attached to a randomly chosen molecule already in the cluster at an
O-O distance drawn from 2.6-3.6 A, either hydrogen-bonded (the new molecule
donates or accepts an H bond, the O-H...O direction being randomly tilted by up
to 20 deg) or with a random direction and orientation.  A placement is
rejected if any two atoms of different molecules are closer than 1.5 A or any
two O atoms closer than 2.6 A.  Finally every structure is centred at its
centre of mass and given a uniformly random global rotation, so the data set is
not aligned with the Cartesian axes.  Structure ``i`` of cluster size ``n`` uses
the random generator ``numpy.random.default_rng([seed, n, i])``, so changing the
number of structures does not change the ones that are already there.

Running
-------
Use one thread per process (the default set by this script if the
``OMP_NUM_THREADS`` environment variable is not set)::

    OMP_NUM_THREADS=1 python scripts/make_example_data.py \\
        --output src/symatomic/examples/water_clusters.xyz

The script appends every finished structure to a checkpoint file
(``<output>.partial.jsonl``), so an interrupted run can simply be restarted
with the same command; the checkpoint is removed once the final file has been
written (atomically, via a temporary file and ``os.replace``).  Structures
whose SCF does not converge even with level shift/damping and a second-order
solver are dropped and reported.  ``--self-check`` runs the numerical
verifications (sign conventions, finite differences, rotation covariance)
on a single water molecule and a dimer instead of producing the data set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# One thread per process unless the caller explicitly asked for more.  This has
# to happen before numpy / pyscf are imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from ase import Atoms
from ase.io import write
from ase.units import Bohr, Hartree

LOG = logging.getLogger("make_example_data")

DEFAULT_OUTPUT = (
    Path(__file__).resolve().parent.parent
    / "src"
    / "symatomic"
    / "examples"
    / "water_clusters.xyz"
)

# --- geometry parameters (Angstrom / degree) ---------------------------------
OH_RANGE = (0.90, 1.10)
HOH_RANGE = (95.0, 115.0)
OO_RANGE = (2.6, 3.6)
MIN_INTERMOLECULAR = 1.5  # any two atoms of different molecules
MIN_OO = 2.6  # any two oxygen atoms
HBOND_TILT_DEG = 20.0  # max. deviation of O-H...O from linearity
P_HBOND = 2.0 / 3.0  # probability that a placement is hydrogen bonded
POSITION_DECIMALS = 8  # geometries are rounded to what the extxyz file stores
STORE_SIGNIFICANT_DIGITS = 10  # precision of the stored properties

FloatArray = np.ndarray


# =============================================================================
# Geometry generation
# =============================================================================
def random_rotation(rng: np.random.Generator) -> FloatArray:
    """Return a uniformly distributed random 3x3 rotation matrix (det = +1)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def axis_angle_rotation(axis: FloatArray, angle: float) -> FloatArray:
    """Rotation matrix for a right-handed rotation by ``angle`` (rad) about ``axis``."""
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    k = np.array(
        [[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]]
    )
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def align_rotation(a: FloatArray, b: FloatArray) -> FloatArray:
    """Return a rotation matrix ``R`` with ``R @ a`` parallel to ``b``."""
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    axis = np.cross(a, b)
    s, c = np.linalg.norm(axis), float(np.dot(a, b))
    if s < 1e-12:
        if c > 0:
            return np.eye(3)
        # antiparallel: rotate by pi about any axis perpendicular to a
        perp = np.cross(a, [1.0, 0.0, 0.0])
        if np.linalg.norm(perp) < 1e-6:
            perp = np.cross(a, [0.0, 1.0, 0.0])
        return axis_angle_rotation(perp, np.pi)
    return axis_angle_rotation(axis, float(np.arctan2(s, c)))


def random_unit_vector(rng: np.random.Generator) -> FloatArray:
    """Uniformly distributed unit vector."""
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def random_direction_in_cone(
    axis: FloatArray, max_angle_deg: float, rng: np.random.Generator
) -> FloatArray:
    """Unit vector uniformly distributed on the spherical cap around ``axis``."""
    axis = axis / np.linalg.norm(axis)
    cos_theta = rng.uniform(np.cos(np.radians(max_angle_deg)), 1.0)
    sin_theta = np.sqrt(1.0 - cos_theta**2)
    phi = rng.uniform(0.0, 2.0 * np.pi)
    helper = (
        np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    )
    e1 = np.cross(axis, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    return cos_theta * axis + sin_theta * (np.cos(phi) * e1 + np.sin(phi) * e2)


def distorted_water(rng: np.random.Generator) -> FloatArray:
    """Water (O, H, H) with random bond lengths and angle, O at the origin, local frame."""
    r1, r2 = rng.uniform(*OH_RANGE, size=2)
    half = np.radians(rng.uniform(*HOH_RANGE)) / 2.0
    return np.array(
        [
            [0.0, 0.0, 0.0],
            [r1 * np.sin(half), 0.0, r1 * np.cos(half)],
            [-r2 * np.sin(half), 0.0, r2 * np.cos(half)],
        ]
    )


def _placement_ok(existing: Sequence[FloatArray], new: FloatArray) -> bool:
    """Check the intermolecular distance criteria for a new molecule."""
    for mol in existing:
        d = np.linalg.norm(mol[:, None, :] - new[None, :, :], axis=-1)
        if d.min() < MIN_INTERMOLECULAR or d[0, 0] < MIN_OO:
            return False
    return True


def _place_molecule(
    anchor: FloatArray, local: FloatArray, mode: str, rng: np.random.Generator
) -> FloatArray:
    """Position a new water (local frame coordinates) relative to an anchor molecule.

    ``mode`` is ``"donor"`` (the anchor donates an H bond to the new molecule),
    ``"acceptor"`` (the new molecule donates an H bond to the anchor) or
    ``"random"`` (random direction and orientation).
    """
    d_oo = rng.uniform(*OO_RANGE)
    o_anchor = anchor[0]
    if mode == "donor":
        h = anchor[1 + rng.integers(2)]
        direction = random_direction_in_cone(h - o_anchor, HBOND_TILT_DEG, rng)
        rot = random_rotation(rng)
    elif mode == "acceptor":
        # Approach roughly from the lone-pair side of the anchor (opposite to
        # the H atoms), then orient one O-H of the new molecule towards O_anchor.
        bisector = anchor[1] + anchor[2] - 2.0 * o_anchor
        direction = random_direction_in_cone(-bisector, 70.0, rng)
        target = random_direction_in_cone(-direction, HBOND_TILT_DEG, rng)
        oh = local[1 + rng.integers(2)] - local[0]
        rot = axis_angle_rotation(
            target, rng.uniform(0.0, 2.0 * np.pi)
        ) @ align_rotation(oh, target)
    elif mode == "random":
        direction = random_unit_vector(rng)
        rot = random_rotation(rng)
    else:  # pragma: no cover - programming error
        raise ValueError(f"unknown placement mode {mode!r}")
    return o_anchor + d_oo * direction + (local - local[0]) @ rot.T


def generate_structure(
    n_molecules: int, seed: int, index: int, max_tries: int = 1000
) -> tuple[Atoms, str]:
    """Generate structure ``index`` of cluster size ``n_molecules`` (reproducible).

    Returns the (centred, randomly rotated) :class:`ase.Atoms` and a
    ``config_type`` label such as ``"dimer_hbond"``.
    """
    rng = np.random.default_rng([seed, n_molecules, index])
    names = {1: "monomer", 2: "dimer", 3: "trimer", 4: "tetramer"}
    for _ in range(max_tries):
        molecules = [distorted_water(rng)]
        modes: list[str] = []
        ok = True
        for _k in range(1, n_molecules):
            hbond = rng.uniform() < P_HBOND
            for _attempt in range(100):
                mode = str(rng.choice(["donor", "acceptor"])) if hbond else "random"
                anchor = molecules[rng.integers(len(molecules))]
                new = _place_molecule(anchor, distorted_water(rng), mode, rng)
                if _placement_ok(molecules, new):
                    molecules.append(new)
                    modes.append("hbond" if hbond else "random")
                    break
            else:
                ok = False
                break
        if ok:
            break
    else:  # pragma: no cover - practically unreachable
        raise RuntimeError(
            "could not generate a cluster satisfying the distance criteria"
        )

    if n_molecules == 1:
        label = "monomer"
    else:
        kinds = set(modes)
        kind = kinds.pop() if len(kinds) == 1 else "mixed"
        label = f"{names.get(n_molecules, f'{n_molecules}mer')}_{kind}"

    atoms = Atoms("OH2" * n_molecules, positions=np.concatenate(molecules), pbc=False)
    positions = atoms.positions - atoms.get_center_of_mass()
    positions = positions @ random_rotation(rng).T
    atoms.positions = np.round(positions, POSITION_DECIMALS)
    return atoms, label


# =============================================================================
# Quantum chemistry
# =============================================================================
@dataclass(frozen=True)
class Settings:
    """Level of theory and numerical settings (stored in the checkpoint header)."""

    basis: str = "def2-svp"
    xc: str = "b3lyp"
    grid_level: int = 3
    grid_response: bool = True
    conv_tol: float = 1e-11
    cphf_tol: float = 1e-10
    field_step: float = 1e-3
    beta_method: str = "analytic"  # "analytic", "fd" or "none"

    def key(self) -> str:
        """Short hash identifying the settings."""
        return hashlib.sha1(
            json.dumps(asdict(self), sort_keys=True).encode()
        ).hexdigest()[:12]


class SCFNotConvergedError(RuntimeError):
    """Raised when no SCF strategy converges."""


def build_mol(symbols: Sequence[str], positions: FloatArray, basis: str) -> Any:
    """PySCF molecule (neutral singlet, positions in Angstrom)."""
    from pyscf import gto

    return gto.M(
        atom=[(s, tuple(p)) for s, p in zip(symbols, positions, strict=True)],
        unit="Angstrom",
        basis=basis,
        charge=0,
        spin=0,
        verbose=0,
    )


def make_rks(mol: Any, settings: Settings, grids: Any | None = None) -> Any:
    """Restricted Kohn-Sham object; reuses ``grids`` if given."""
    from pyscf import dft

    mf = dft.RKS(mol, xc=settings.xc)
    mf.conv_tol = settings.conv_tol
    mf.max_cycle = 100
    mf.verbose = 0
    if grids is None:
        mf.grids.level = settings.grid_level
    else:
        mf.grids = grids
    return mf


def run_scf(mf: Any, dm0: FloatArray | None = None, label: str = "") -> float:
    """Converge ``mf`` in place; fall back to level shift + damping, then Newton.

    Returns the total energy (Hartree) and raises :class:`SCFNotConvergedError`
    if all strategies fail.
    """
    energy = mf.kernel(dm0=dm0)
    if mf.converged:
        return float(energy)
    LOG.warning(
        "%s: SCF not converged with DIIS, retrying with level shift/damping", label
    )
    mf.level_shift, mf.damp, mf.max_cycle = 0.3, 0.5, 300
    energy = mf.kernel(dm0=mf.make_rdm1())
    mf.level_shift, mf.damp, mf.max_cycle = 0.0, 0.0, 100
    if mf.converged:
        return float(energy)
    LOG.warning(
        "%s: still not converged, trying the second-order (Newton) solver", label
    )
    newton = mf.newton()
    energy = newton.kernel(dm0=mf.make_rdm1())
    if not newton.converged:
        raise SCFNotConvergedError(f"{label}: SCF did not converge")
    for attr in ("mo_coeff", "mo_energy", "mo_occ", "e_tot", "converged"):
        setattr(mf, attr, getattr(newton, attr))
    return float(energy)


def dipole_integrals(mol: Any) -> FloatArray:
    """Electronic position integrals <mu|r|nu> (3, nao, nao), origin at the charge centre."""
    charges = mol.atom_charges()
    centre = charges @ mol.atom_coords() / charges.sum()
    with mol.with_common_orig(centre):
        return mol.intor_symmetric("int1e_r", comp=3)


def cpks_polarizability(
    mf: Any, int_r: FloatArray, tol: float
) -> tuple[FloatArray, FloatArray, FloatArray, float]:
    """Analytic static polarizability by coupled-perturbed Kohn-Sham.

    Solves ``(e_a - e_i) U_ai + [v_resp(dD)]_ai = -<a|r_x|i>`` for the three
    field directions (perturbation ``+F.r``).  Returns ``(alpha, U, dD,
    residual)``: the symmetrised 3x3 polarizability (Bohr^3), the
    virtual-occupied orbital response ``U[x]`` (MO basis), the first-order AO
    density matrices ``dD[x] = dD/dF_x`` and the max. abs. residual of the
    linear equations.
    """
    from pyscf import lib
    from pyscf.scf import cphf

    occ = mf.mo_occ > 0
    orbo, orbv = mf.mo_coeff[:, occ], mf.mo_coeff[:, ~occ]
    h1 = lib.einsum("xpq,pa,qi->xai", int_r, orbv, orbo)
    vresp = mf.gen_response(hermi=1)  # Coulomb + exact exchange + B3LYP XC kernel

    def density(u: FloatArray) -> FloatArray:
        dm = lib.einsum("xai,pa,qi->xpq", u, orbv, orbo)
        return (dm + dm.transpose(0, 2, 1)) * 2.0  # 2: doubly occupied orbitals

    def fvind(u: FloatArray) -> FloatArray:
        u = u.reshape(-1, *h1.shape[1:])
        return lib.einsum("xpq,pa,qi->xai", vresp(density(u)), orbv, orbo)

    u = cphf.solve(fvind, mf.mo_energy, mf.mo_occ, h1, max_cycle=100, tol=tol)[0]
    e_ai = mf.mo_energy[~occ][:, None] - mf.mo_energy[occ][None, :]
    residual = float(np.abs(e_ai * u + fvind(u) + h1).max())
    # mu_x = -Tr(D r_x) + nuclear term  =>  alpha_xy = d mu_x / d F_y = -4 sum_ai h1_x U_y
    alpha = -4.0 * np.einsum("xai,yai->xy", h1, u)
    return 0.5 * (alpha + alpha.T), u, density(u), residual


def analytic_hyperpolarizability(
    mf: Any, int_r: FloatArray, u: FloatArray, d_dm: FloatArray
) -> FloatArray:
    """Static beta_ijk = -d^3E/dF_i dF_j dF_k from the first-order response (2n+1 rule).

    For closed-shell Kohn-Sham with field-independent basis functions::

        E_ijk = 2 sum_P(ijk) [ sum_{m,ab} U^i_am G^j_ab U^k_bm
                               - sum_{mn,a} U^i_am G^j_nm U^k_an ]
                + int k_xc rho^i rho^j rho^k

    where the sum runs over all 6 permutations of (i, j, k), ``U`` is the CPKS
    solution (virtual a, b; occupied m, n), ``G^j = C^T (r_j + v_resp[dD_j]) C``
    is the first-order Fock matrix in the MO basis, and the last term is the
    third functional derivative of the XC energy contracted with the
    first-order densities (``rho`` and its gradient for GGAs; PySCF's
    ``eval_xc_eff``).  The exact-exchange part is quadratic in the density and
    does not contribute.  The result is fully permutation symmetric by
    construction; it agrees with central finite differences of the CPKS
    polarizability to ~1e-4 relative (see ``--self-check``).
    """
    from pyscf import lib

    mol = mf.mol
    occ = mf.mo_occ > 0
    nocc = int(occ.sum())
    c = mf.mo_coeff
    vresp = mf.gen_response(hermi=1)
    g = lib.einsum("pm,xpq,qn->xmn", c, int_r + vresp(d_dm), c)
    g_vv, g_oo = g[:, nocc:, nocc:], g[:, :nocc, :nocc]
    orbital = np.einsum("iam,jab,kbm->ijk", u, g_vv, u) - np.einsum(
        "iam,jnm,kan->ijk", u, g_oo, u
    )
    e3 = 12.0 * symmetrize_rank3(orbital)  # 2 * (sum over the 6 permutations)

    ni = mf._numint
    xctype = ni._xc_type(mf.xc)
    if xctype not in ("HF", "LDA", "GGA"):
        raise NotImplementedError(f"analytic beta not implemented for {xctype}")
    if xctype != "HF":
        dm0 = mf.make_rdm1()
        deriv = 0 if xctype == "LDA" else 1
        for ao, _mask, weight, _coords in ni.block_loop(mol, mf.grids, mol.nao, deriv):
            rho0 = ni.eval_rho(mol, ao, dm0, xctype=xctype, hermi=1)
            rho1 = np.array(
                [ni.eval_rho(mol, ao, d, xctype=xctype, hermi=1) for d in d_dm]
            )
            kxc = ni.eval_xc_eff(mf.xc, rho0, deriv=3, xctype=xctype)[3]
            if xctype == "LDA":
                rho1 = rho1.reshape(3, 1, -1)
                kxc = kxc.reshape(1, 1, 1, -1)
            e3 += np.einsum("abcg,iag,jbg,kcg,g->ijk", kxc, rho1, rho1, rho1, weight)
    return -symmetrize_rank3(e3)


def field_rks(mf: Any, int_r: FloatArray, field: FloatArray, settings: Settings) -> Any:
    """RKS object with a uniform electric field ``field`` (a.u.) in the core Hamiltonian."""
    h_field = mf.get_hcore() + np.einsum("x,xpq->pq", field, int_r)
    mf_f = make_rks(mf.mol, settings, grids=mf.grids)
    mf_f.get_hcore = lambda *args, **kwargs: h_field
    return mf_f


def symmetrize_rank3(t: FloatArray) -> FloatArray:
    """Average a rank-3 tensor over all 6 index permutations."""
    perms = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    return sum(t.transpose(p) for p in perms) / 6.0


def finite_difference_hyperpolarizability(
    mf: Any,
    int_r: FloatArray,
    alpha: FloatArray,
    d_dm: FloatArray,
    settings: Settings,
    label: str = "",
) -> tuple[FloatArray, dict[str, float]]:
    """Static beta by central differences of the CPKS polarizability.

    ``beta_ijk = [alpha_ij(+h e_k) - alpha_ij(-h e_k)] / (2h)`` with the field
    added to the core Hamiltonian (6 extra SCF + CPKS runs).  Returns the
    permutation-symmetrised tensor and diagnostics: the asymmetry of the raw
    tensor (the static beta is exactly symmetric, so this is numerical noise)
    and the deviation of the finite-difference polarizability ``d mu / d F``
    (a by-product of the field-dependent SCF runs) from the CPKS one.
    """
    h = settings.field_step
    dm0 = mf.make_rdm1()
    beta_raw = np.zeros((3, 3, 3))
    alpha_fd = np.zeros((3, 3))
    residual = 0.0
    for k in range(3):
        alphas, dipoles = [], []
        for sign in (1.0, -1.0):
            field = np.zeros(3)
            field[k] = sign * h
            mf_f = field_rks(mf, int_r, field, settings)
            # first-order density as starting guess: converges in a few cycles
            guess = dm0 + sign * h * d_dm[k]
            run_scf(mf_f, dm0=guess, label=f"{label} F{k}{sign:+.0f}")
            a_f, _, _, res_f = cpks_polarizability(mf_f, int_r, settings.cphf_tol)
            residual = max(residual, res_f)
            alphas.append(a_f)
            dipoles.append(np.asarray(mf_f.dip_moment(unit="AU", verbose=0)))
        beta_raw[:, :, k] = (alphas[0] - alphas[1]) / (2.0 * h)
        alpha_fd[:, k] = (dipoles[0] - dipoles[1]) / (2.0 * h)
    beta = symmetrize_rank3(beta_raw)
    asym = float(np.abs(beta_raw - beta).max())
    return beta, {
        "fd_cphf_residual": residual,
        "alpha_vs_fd_dipole": float(np.abs(alpha_fd - alpha).max()),
        "beta_asymmetry": asym,
        "beta_asymmetry_rel": asym / max(float(np.abs(beta).max()), 1e-12),
    }


def compute_properties(
    symbols: Sequence[str], positions: FloatArray, settings: Settings, label: str = ""
) -> dict[str, Any]:
    """Run all calculations for one structure (positions in Angstrom).

    Returns a JSON-serialisable dict with the properties (units as in the
    module docstring) and a ``diagnostics`` sub-dict.
    """
    t0 = time.perf_counter()
    mol = build_mol(symbols, positions, settings.basis)
    mf = make_rks(mol, settings)
    e_tot = run_scf(mf, label=label)

    grad = mf.nuc_grad_method()
    grad.grid_response = settings.grid_response
    grad.verbose = 0
    gradient = grad.kernel()  # Hartree/Bohr
    dipole = np.asarray(mf.dip_moment(unit="AU", verbose=0))

    int_r = dipole_integrals(mol)
    alpha, u, d_dm, residual = cpks_polarizability(mf, int_r, settings.cphf_tol)
    diagnostics: dict[str, float] = {
        "cphf_residual": residual,
        "net_force": float(np.linalg.norm(gradient.sum(axis=0)) * Hartree / Bohr),
        "alpha_min_eig": float(np.linalg.eigvalsh(alpha).min()),
    }

    result: dict[str, Any] = {
        "energy": e_tot * Hartree,
        "forces": (-gradient * Hartree / Bohr).tolist(),
        "dipole": dipole.tolist(),
        "polarizability": alpha.ravel().tolist(),
    }

    if settings.beta_method == "analytic":
        beta = analytic_hyperpolarizability(mf, int_r, u, d_dm)
        result["hyperpolarizability"] = beta.ravel().tolist()
    elif settings.beta_method == "fd":
        beta, fd_diagnostics = finite_difference_hyperpolarizability(
            mf, int_r, alpha, d_dm, settings, label
        )
        diagnostics.update(fd_diagnostics)
        result["hyperpolarizability"] = beta.ravel().tolist()
    elif settings.beta_method != "none":
        raise ValueError(f"unknown beta_method {settings.beta_method!r}")

    diagnostics["seconds"] = time.perf_counter() - t0
    result["diagnostics"] = diagnostics
    return result


# =============================================================================
# Data set assembly, checkpointing, I/O
# =============================================================================
def _round_sig(values: Any, digits: int = STORE_SIGNIFICANT_DIGITS) -> Any:
    """Round floats (scalars or nested sequences) to ``digits`` significant digits."""
    arr = np.asarray(values, dtype=float)
    out = np.array([float(f"{v:.{digits}g}") for v in arr.ravel()]).reshape(arr.shape)
    return float(out) if out.ndim == 0 else out


def geometry_hash(atoms: Atoms) -> str:
    """Hash of symbols and (rounded) positions, used to match checkpoint entries."""
    text = "".join(atoms.get_chemical_symbols()) + np.array2string(
        atoms.positions, precision=POSITION_DECIMALS, floatmode="fixed"
    )
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _worker(
    key: str, symbols: list[str], positions: list[list[float]], settings: Settings
) -> tuple[str, dict[str, Any] | None, str | None]:
    """Process-pool entry point: compute one structure, never raise."""
    try:
        return (
            key,
            compute_properties(symbols, np.asarray(positions), settings, key),
            None,
        )
    except Exception as err:  # noqa: BLE001 - log and drop the structure
        return key, None, f"{type(err).__name__}: {err}"


def load_checkpoint(path: Path, settings: Settings) -> dict[str, dict[str, Any]]:
    """Read finished structures from a checkpoint written with the same settings."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    with path.open() as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # truncated last line of a killed run
                continue
            if entry.get("settings") == settings.key():
                done[entry["key"]] = entry["result"]
    return done


def to_atoms(atoms: Atoms, label: str, index: int, result: dict[str, Any]) -> Atoms:
    """Attach the results as plain ``info`` / ``arrays`` entries (no calculator)."""
    out = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, pbc=False)
    out.info["config_type"] = label
    out.info["structure_id"] = index
    out.info["energy"] = _round_sig(result["energy"], 14)
    out.info["dipole"] = _round_sig(result["dipole"])
    out.info["polarizability"] = _round_sig(result["polarizability"])
    if "hyperpolarizability" in result:
        out.info["hyperpolarizability"] = _round_sig(result["hyperpolarizability"])
    out.arrays["forces"] = _round_sig(result["forces"])
    return out


def write_atomic(path: Path, images: list[Atoms]) -> None:
    """Write extended XYZ to ``path`` via a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            write(fh, images, format="extxyz")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def summarize(images: list[Atoms]) -> None:
    """Log mean/std of the main quantities, per cluster size and overall."""

    def stats(name: str, values: Sequence[float]) -> str:
        v = np.asarray(values, dtype=float)
        return f"{name}: mean {v.mean():.5g} std {v.std():.5g} [min {v.min():.5g}, max {v.max():.5g}]"

    groups: dict[str, list[Atoms]] = {}
    for a in images:
        groups.setdefault(f"{len(a) // 3}-mer", []).append(a)
    groups["all"] = images
    for name, group in groups.items():
        LOG.info("== %s: %d structures", name, len(group))
        LOG.info(
            "  %s",
            stats("energy/atom [eV]", [a.info["energy"] / len(a) for a in group]),
        )
        forces = np.concatenate(
            [np.linalg.norm(a.arrays["forces"], axis=1) for a in group]
        )
        LOG.info("  %s", stats("|F| [eV/A]", forces))
        LOG.info(
            "  %s",
            stats("|mu| [au]", [np.linalg.norm(a.info["dipole"]) for a in group]),
        )
        traces = [np.trace(np.reshape(a.info["polarizability"], (3, 3))) for a in group]
        LOG.info("  %s", stats("tr(alpha) [au]", traces))
        if all("hyperpolarizability" in a.info for a in group):
            norms = [np.linalg.norm(a.info["hyperpolarizability"]) for a in group]
            LOG.info("  %s", stats("|beta| (Frobenius) [au]", norms))


def build_jobs(counts: Sequence[int], seed: int) -> list[tuple[str, int, Atoms, str]]:
    """All structures to compute: ``(key, structure_id, atoms, config_type)``."""
    jobs = []
    structure_id = 0
    for n_molecules, count in enumerate(counts, start=1):
        for i in range(count):
            atoms, label = generate_structure(n_molecules, seed, i)
            key = f"n{n_molecules}-{i:04d}-{geometry_hash(atoms)}"
            jobs.append((key, structure_id, atoms, label))
            structure_id += 1
    return jobs


def generate_dataset(args: argparse.Namespace, settings: Settings) -> None:
    """Compute (or resume) the data set and write the extended XYZ file."""
    output = Path(args.output)
    checkpoint = (
        Path(args.checkpoint)
        if args.checkpoint
        else Path(str(output) + ".partial.jsonl")
    )
    jobs = build_jobs(args.n_per_size, args.seed)
    done = load_checkpoint(checkpoint, settings)
    todo = [job for job in jobs if job[0] not in done]
    LOG.info(
        "settings %s (%s); %d structures, %d from checkpoint %s, %d to compute, %d worker(s)",
        settings.key(),
        asdict(settings),
        len(jobs),
        len(jobs) - len(todo),
        checkpoint,
        len(todo),
        args.workers,
    )

    failed: dict[str, str] = {}
    t_start = time.perf_counter()
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    with checkpoint.open("a") as ckpt:

        def record(key: str, result: dict[str, Any] | None, error: str | None) -> None:
            if result is None:
                failed[key] = error or "unknown error"
                LOG.error("DROPPED %s: %s", key, error)
                return
            done[key] = result
            ckpt.write(
                json.dumps({"settings": settings.key(), "key": key, "result": result})
            )
            ckpt.write("\n")
            ckpt.flush()
            n_new = len(done) - (len(jobs) - len(todo))
            elapsed = time.perf_counter() - t_start
            diag = result["diagnostics"]
            LOG.info(
                "[%d/%d] %s  %.1fs  E=%.6f eV  diag: %s  (elapsed %.0fs, eta %.0fs)",
                len(done),
                len(jobs),
                key,
                diag["seconds"],
                result["energy"],
                " ".join(f"{k}={v:.2g}" for k, v in diag.items() if k != "seconds"),
                elapsed,
                elapsed / max(n_new, 1) * (len(todo) - n_new - len(failed)),
            )

        payloads = [
            (key, atoms.get_chemical_symbols(), atoms.positions.tolist(), settings)
            for key, _, atoms, _ in todo
        ]
        if args.workers <= 1:
            for payload in payloads:
                record(*_worker(*payload))
        else:
            with ProcessPoolExecutor(max_workers=args.workers) as pool:
                futures = [pool.submit(_worker, *payload) for payload in payloads]
                for future in as_completed(futures):
                    record(*future.result())

    images = [
        to_atoms(atoms, label, sid, done[key])
        for key, sid, atoms, label in jobs
        if key in done
    ]
    write_atomic(output, images)
    LOG.info(
        "wrote %d structures to %s (%.1f kB); compute time this run %.0f s",
        len(images),
        output,
        output.stat().st_size / 1024,
        time.perf_counter() - t_start,
    )
    seconds = [done[key]["diagnostics"]["seconds"] for key, *_ in jobs if key in done]
    LOG.info("summed per-structure compute time (all runs): %.0f s", sum(seconds))
    if failed:
        LOG.error("%d structure(s) dropped: %s", len(failed), ", ".join(sorted(failed)))
    diag_keys = sorted(
        {k for key, *_ in jobs if key in done for k in done[key]["diagnostics"]}
    )
    for k in diag_keys:
        values = [
            done[key]["diagnostics"].get(k, np.nan) for key, *_ in jobs if key in done
        ]
        LOG.info(
            "diagnostic %-20s max %.3g  median %.3g",
            k,
            np.nanmax(values),
            np.nanmedian(values),
        )
    summarize(images)
    if not args.keep_checkpoint and not failed:
        checkpoint.unlink(missing_ok=True)


# =============================================================================
# Self-check
# =============================================================================
def self_check(settings: Settings, seed: int) -> None:
    """Verify conventions and numerics on the first monomer and dimer of the data set.

    Checks: dipole vs a manual evaluation with two origins and its direction;
    polarizability symmetric positive definite and equal to ``-d2E/dF2``;
    dipole equal to ``-dE/dF``; analytic beta vs central differences of the
    CPKS polarizability (and the asymmetry of the latter); beta_izz vs second
    differences of the dipole; forces vs finite differences of the energy;
    covariance of all quantities under a random rotation of the molecule.
    """
    from pyscf import lib

    for n_molecules in (1, 2):
        atoms, label = generate_structure(n_molecules, seed, 0)
        symbols, pos = atoms.get_chemical_symbols(), atoms.positions
        LOG.info("===== self-check on %s (%d atoms)", label, len(atoms))
        res = compute_properties(symbols, pos, settings, label)
        LOG.info("diagnostics: %s", res["diagnostics"])
        mol = build_mol(symbols, pos, settings.basis)
        mf = make_rks(mol, settings)
        run_scf(mf, label=label)
        dm = mf.make_rdm1()
        int_r = dipole_integrals(mol)
        charges, coords = mol.atom_charges(), mol.atom_coords()
        centre = charges @ coords / charges.sum()
        dipole = np.asarray(res["dipole"])
        alpha = np.reshape(res["polarizability"], (3, 3))
        beta = np.reshape(res["hyperpolarizability"], (3, 3, 3))

        # 1) dipole: manual evaluation with two different origins vs dip_moment
        for origin in (np.zeros(3), np.array([1.3, -2.1, 0.7])):
            with mol.with_common_orig(origin):
                r = mol.intor_symmetric("int1e_r", comp=3)
            mu = charges @ (coords - origin) - np.einsum("xpq,qp->x", r, dm)
            LOG.info(
                "dipole: manual (origin %s) - stored: %.1e",
                origin,
                np.abs(mu - dipole).max(),
            )
        if n_molecules == 1:
            o, h1, h2 = pos
            LOG.info(
                "dipole points from O towards the H atoms: %s",
                float(np.dot(dipole, (h1 + h2) / 2 - o)) > 0,
            )

        # 2) polarizability and dipole vs finite-field energies (field along z)
        LOG.info(
            "alpha: eigenvalues %s, asymmetry %.1e",
            np.linalg.eigvalsh(alpha),
            np.abs(alpha - alpha.T).max(),
        )
        h = 2e-3
        energies = {}
        for s in (-1, 0, 1):
            mf_f = field_rks(mf, int_r, np.array([0.0, 0.0, s * h]), settings)
            energies[s] = run_scf(mf_f, dm0=dm)
        alpha_zz = -(energies[1] + energies[-1] - 2 * energies[0]) / h**2
        # -dE/dF is the electronic dipole relative to the integral origin (the
        # charge centre); the nuclei are not in the Hamiltonian
        mu_z = -(energies[1] - energies[-1]) / (2 * h) + charges @ (
            coords[:, 2] - centre[2]
        )
        LOG.info("alpha_zz: CPKS %.6f, -d2E/dF2 %.6f", alpha[2, 2], alpha_zz)
        LOG.info("mu_z: stored %.7f, -dE/dF + nuclear %.7f", dipole[2], mu_z)

        # 3) hyperpolarizability: analytic vs finite differences
        if settings.beta_method == "analytic":
            beta_fd, diag = finite_difference_hyperpolarizability(
                mf,
                int_r,
                alpha,
                cpks_polarizability(mf, int_r, settings.cphf_tol)[2],
                settings,
                label,
            )
            LOG.info("finite-difference beta diagnostics: %s", diag)
            LOG.info(
                "beta: |analytic| %.5f, max|analytic - FD(alpha)| %.2e",
                np.linalg.norm(beta),
                np.abs(beta - beta_fd).max(),
            )
        h = 5e-3
        mus = {}
        for s in (-1, 1):
            mf_f = field_rks(mf, int_r, np.array([0.0, 0.0, s * h]), settings)
            run_scf(mf_f, dm0=dm)
            mus[s] = np.asarray(mf_f.dip_moment(unit="AU", verbose=0))
        beta_izz = (mus[1] + mus[-1] - 2 * dipole) / h**2
        LOG.info("beta_izz: stored %s, FD(mu, h=5e-3) %s", beta[:, 2, 2], beta_izz)

        # 4) forces vs finite differences of the energy
        step = 1e-3  # Angstrom
        pairs = []
        for atom, axis in ((0, 0), (1, 2), (len(atoms) - 1, 1)):
            e = []
            for s in (1, -1):
                p = pos.copy()
                p[atom, axis] += s * step
                mf_d = make_rks(build_mol(symbols, p, settings.basis), settings)
                e.append(run_scf(mf_d, dm0=dm) * Hartree)
            pairs.append((-(e[0] - e[1]) / (2 * step), res["forces"][atom][axis]))
        LOG.info(
            "forces (FD, analytic) eV/A: %s",
            [(f"{a:.6f}", f"{b:.6f}") for a, b in pairs],
        )

        # 5) rotation covariance
        rot = random_rotation(np.random.default_rng(seed + 1))
        rres = compute_properties(symbols, pos @ rot.T, settings, label + "-rotated")
        checks = {
            "energy": abs(rres["energy"] - res["energy"]),
            "forces": np.abs(
                np.asarray(rres["forces"]) - np.asarray(res["forces"]) @ rot.T
            ).max(),
            "dipole": np.abs(np.asarray(rres["dipole"]) - rot @ dipole).max(),
            "alpha": np.abs(
                np.reshape(rres["polarizability"], (3, 3)) - rot @ alpha @ rot.T
            ).max(),
            "beta": np.abs(
                np.reshape(rres["hyperpolarizability"], (3, 3, 3))
                - lib.einsum("ia,jb,kc,abc->ijk", rot, rot, rot, beta)
            ).max(),
        }
        LOG.info(
            "rotation covariance, max abs deviation: %s",
            {k: f"{v:.1e}" for k, v in checks.items()},
        )


# =============================================================================
# CLI
# =============================================================================
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line interface."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "-o", "--output", default=str(DEFAULT_OUTPUT), help="output extxyz file"
    )
    parser.add_argument(
        "-n",
        "--n-per-size",
        type=int,
        nargs="+",
        default=[100, 100, 100],
        metavar="N",
        help="number of structures per cluster size: one value for all sizes "
        "(monomer, dimer, trimer) or one value per size",
    )
    parser.add_argument("--seed", type=int, default=20240611, help="random seed")
    parser.add_argument("-j", "--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--basis", default=Settings.basis, help="Gaussian basis set")
    parser.add_argument(
        "--grid-level", type=int, default=Settings.grid_level, help="DFT grid level"
    )
    parser.add_argument(
        "--beta-method",
        choices=["analytic", "fd", "none"],
        default=Settings.beta_method,
        help="hyperpolarizability: analytic (2n+1 rule), central finite differences "
        "of the CPKS polarizability (~5x more expensive), or none",
    )
    parser.add_argument(
        "--checkpoint", default=None, help="default: <output>.partial.jsonl"
    )
    parser.add_argument(
        "--keep-checkpoint", action="store_true", help="keep the checkpoint file"
    )
    parser.add_argument(
        "--self-check", action="store_true", help="run verifications and exit"
    )
    parser.add_argument(
        "--generate-only",
        action="store_true",
        help="only generate the geometries and print a summary (no quantum chemistry)",
    )
    args = parser.parse_args(argv)
    if len(args.n_per_size) == 1:
        args.n_per_size = args.n_per_size * 3
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stdout,
    )
    settings = Settings(
        basis=args.basis,
        grid_level=args.grid_level,
        beta_method=args.beta_method,
    )
    if args.self_check:
        self_check(settings, args.seed)
    elif args.generate_only:
        jobs = build_jobs(args.n_per_size, args.seed)
        labels: dict[str, int] = {}
        for _, _, _atoms, label in jobs:
            labels[label] = labels.get(label, 0) + 1
        LOG.info("%d structures: %s", len(jobs), labels)
    else:
        generate_dataset(args, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
