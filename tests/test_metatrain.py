"""symatomic through metatrain: metatrain's architecture test suites pointed at our
architecture (``experimental.symatomic``, see :mod:`symatomic.mtt`), options
compatibility, and ``mtt eval`` on models exported by symatomic.

Two configurations run metatrain's suites: plain PET (not exactly equivariant) and PET
with ``ecse: {mode: local}`` (exactly O(3)-equivariant). Data: a few structures of
the bundled water-cluster example, rewritten with keys metatrain's ASE reader can see
(it only exposes energies, forces and stress stored by a calculator).
"""

import copy
import gzip
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

pytest.importorskip("metatrain")

import ase  # noqa: E402
import ase.io  # noqa: E402
from metatomic.torch import (  # noqa: E402
    ModelOutput,
    load_atomistic_model,
    systems_to_torch,
)
from metatomic.torch.o3 import random_transformations  # noqa: E402
from metatrain.utils.architectures import (  # noqa: E402
    get_default_hypers,
    import_architecture,
)
from metatrain.utils.data import DatasetInfo  # noqa: E402
from metatrain.utils.data.target_info import get_generic_target_info  # noqa: E402
from metatrain.utils.neighbor_lists import (  # noqa: E402
    get_system_with_neighbor_lists,
)
from metatrain.utils.testing import (  # noqa: E402
    AutogradTests,
    CheckpointTests,
    ExportedTests,
    InputTests,
    OutputTests,
    TorchscriptTests,
    TrainingTests,
)

import symatomic  # noqa: E402
import symatomic.io  # noqa: E402
import symatomic.mtt  # noqa: E402
from conftest import SMALL_SOAP  # noqa: E402
from symatomic.data.structures import read_frames  # noqa: E402

symatomic.mtt.register()

ARCHITECTURE = symatomic.mtt.ARCHITECTURE_NAME
EXAMPLE = Path(symatomic.__file__).parent / "examples" / "water_clusters.xyz"
REFERENCE_CHECKPOINTS = Path(__file__).parent / "mtt_checkpoints"
N_STRUCTURES = 6

SMALL_MODEL: Dict[str, Any] = {
    "backbone": "pet",
    "cutoff": 3.5,
    "cutoff_width": 0.5,
    "d_pet": 8,
    "d_head": 8,
    "d_node": 8,
    "d_feedforward": 8,
    "num_heads": 2,
    "num_attention_layers": 1,
    "num_gnn_layers": 1,
}


@pytest.fixture(scope="session")
def water_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The first structures of the bundled example, with the values in
    ``info``/``arrays`` under keys that no ASE calculator claims: ``U`` (energy, eV),
    ``f`` (forces), ``mu`` (dipole, 3), ``alpha`` (9), ``beta`` (27)."""
    frames = []
    for atoms in read_frames(str(EXAMPLE))[:N_STRUCTURES]:
        copy_ = ase.Atoms(
            numbers=atoms.numbers, positions=atoms.positions, pbc=False, cell=None
        )
        copy_.info["U"] = float(atoms.info["energy"])
        copy_.info["mu"] = np.asarray(atoms.info["dipole"], dtype=float)
        copy_.info["alpha"] = np.asarray(atoms.info["polarizability"], dtype=float)
        copy_.info["beta"] = np.asarray(atoms.info["hyperpolarizability"], dtype=float)
        copy_.arrays["f"] = np.asarray(atoms.arrays["forces"], dtype=float)
        frames.append(copy_)
    path = tmp_path_factory.mktemp("water") / "water.xyz"
    ase.io.write(str(path), frames, format="extxyz")
    return str(path)


def _energy_target(path: str) -> Dict[str, Any]:
    return {
        "quantity": "energy",
        "read_from": path,
        "reader": "ase",
        "key": "U",
        "unit": "eV",
        "type": "scalar",
        "sample_kind": "system",
        "num_subtargets": 1,
        "forces": {"read_from": path, "reader": "ase", "key": "f"},
        "stress": False,
        "virial": False,
    }


class _Symatomic:
    """Fixtures shared by every suite: our architecture, data and small models."""

    architecture = ARCHITECTURE
    ecse: Dict[str, Any] = {"mode": "none"}
    #: other model hyper-parameters of the configuration
    extra: Dict[str, Any] = {}

    @pytest.fixture
    def dataset_path(self, water_path: str) -> str:
        return water_path

    @pytest.fixture
    def dataset_targets(self, dataset_path: str) -> Dict[str, dict]:
        return {"energy": _energy_target(dataset_path)}

    @pytest.fixture
    def model_hypers(self) -> dict:
        hypers = get_default_hypers(ARCHITECTURE)["model"]
        hypers.update(copy.deepcopy(SMALL_MODEL))
        hypers["ecse"].update(self.ecse)
        hypers.update(copy.deepcopy(self.extra))
        return hypers

    @pytest.fixture
    def minimal_model_hypers(self, model_hypers: dict) -> dict:
        return model_hypers

    @pytest.fixture
    def default_hypers(self, model_hypers: dict) -> dict:
        hypers = get_default_hypers(ARCHITECTURE)
        hypers["model"] = model_hypers
        hypers["training"]["batch_size"] = 3
        return hypers


# ----------------------------------------------------------------- plain PET suites


class TestOutputPET(_Symatomic, OutputTests):
    # without ECSE, PET sees raw Cartesian coordinates: not exactly equivariant
    is_equivariant_rotations = False
    is_equivariant_reflections = False
    # metatrain's ``product: cartesian`` spherical targets (rank-2 products of
    # irreps, keys o3_lambda_1/o3_lambda_2) are not supported: symatomic learns
    # targets as lists of (o3_lambda, o3_sigma) blocks
    supports_spherical_rank2_outputs = False
    # the "feature" output: atom features and pooled pair features; no
    # last-layer-feature outputs yet
    supports_last_layer_features = False

    @pytest.fixture
    def n_features(self) -> int:
        return SMALL_MODEL["d_node"] + SMALL_MODEL["d_pet"]


class TestTorchscriptPET(_Symatomic, TorchscriptTests):
    float_hypers = ["cutoff"]


class TestExportedPET(_Symatomic, ExportedTests):
    pass


class TestAutogradPET(_Symatomic, AutogradTests):
    pass


class TestInputPET(_Symatomic, InputTests):
    pass


class TestTrainingPET(_Symatomic, TrainingTests):
    pass


class TestCheckpointPET(_Symatomic, CheckpointTests):
    @pytest.fixture
    def in_reference_folder(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """metatrain's checkpoint tests read ``checkpoints/*.ckpt.gz`` from the
        current folder: ours are in ``tests/mtt_checkpoints``."""
        monkeypatch.chdir(REFERENCE_CHECKPOINTS)

    def test_checkpoint_did_not_change(
        self, in_reference_folder: None, monkeypatch: Any, tmp_path: Any, model_trainer
    ) -> None:
        super().test_checkpoint_did_not_change(monkeypatch, tmp_path, model_trainer)

    @pytest.mark.parametrize("context", ["restart", "finetune", "export"])
    def test_loading_old_checkpoints(
        self, in_reference_folder: None, default_hypers: dict, model_trainer, context
    ) -> None:
        # metatrain's version passes the whole architecture section (name, model,
        # training) as the trainer's hyper-parameters, which our trainer rejects
        # as unknown training options; this is the same test with the training
        # section
        model, trainer = model_trainer
        paths = sorted(Path("checkpoints").glob("*.ckpt.gz"))
        assert paths, "no reference checkpoints"
        for path in paths:
            with gzip.open(path, "rb") as fd:
                checkpoint = torch.load(fd, weights_only=False)
            if checkpoint["model_ckpt_version"] != model.__checkpoint_version__:
                checkpoint = model.__class__.upgrade_checkpoint(checkpoint)
            model.load_checkpoint(checkpoint, context)
            if context == "restart":
                if checkpoint["trainer_ckpt_version"] != trainer.__checkpoint_version__:
                    checkpoint = trainer.__class__.upgrade_checkpoint(checkpoint)
                trainer.load_checkpoint(checkpoint, default_hypers["training"], context)


# ---------------------------------------------------------------- PET + ECSE suites


class TestOutputECSE(TestOutputPET):
    # ECSE in every attention layer: exactly O(3)-equivariant outputs
    ecse = {"mode": "local"}
    is_equivariant_rotations = True
    is_equivariant_reflections = True
    # metatrain evaluates these in float32: its default tolerance (1e-5) applies


class TestAutogradECSE(TestAutogradPET):
    ecse = {"mode": "local", "frame_layers": 1}
    # a 3 Å cell instead of 2 Å: fewer periodic images, same checks, faster
    cell_param = 3.0


class TestTorchscriptECSE(TestTorchscriptPET):
    ecse = {"mode": "local"}

    # scripting does not depend on the irrep: one spherical target is enough here
    # (every irrep is scripted for plain PET above), which keeps the file fast
    @pytest.fixture(params=["atom"])
    def sample_kind(self, request: pytest.FixtureRequest) -> str:
        return request.param

    @pytest.fixture(params=[3])
    def o3_lambda(self, request: pytest.FixtureRequest) -> int:
        return request.param

    @pytest.fixture(params=[-1])
    def o3_sigma(self, request: pytest.FixtureRequest) -> int:
        return request.param


# ---------------------------------------------- SOAP backbone + scalar-basis heads

SOAP_MODEL = {"backbone": "soap", "soap": SMALL_SOAP}


class TestOutputSOAP(TestOutputPET):
    # invariant SOAP coefficients times the tensor basis: exactly O(3)-equivariant
    extra = SOAP_MODEL
    is_equivariant_rotations = True
    is_equivariant_reflections = True

    @pytest.fixture
    def n_features(self) -> int:
        return SMALL_SOAP["d_out"] + SMALL_SOAP["d_pair"]


# ------------------------------------------------ the default: invariant inputs


class TestOutputInvariantPET(TestOutputPET):
    # PET with invariant edge inputs and scalar-basis heads (the default): exactly
    # O(3)-equivariant without frames
    ecse = {"mode": "auto"}
    is_equivariant_rotations = True
    is_equivariant_reflections = True


class TestTorchscriptSOAP(TestTorchscriptECSE):
    ecse = {"mode": "none"}
    extra = SOAP_MODEL


class TestTrainingECSE(_Symatomic):
    """One training run with ECSE in the loop (the whole training suite runs for
    plain PET above; the trainer is the same)."""

    ecse = {"mode": "local", "frame_layers": 1}
    architecture = ARCHITECTURE

    def test_train(
        self, monkeypatch: Any, tmp_path: Any, dataset_path: str, default_hypers: dict
    ) -> None:
        TrainingTests.test_train(
            self,  # type: ignore[arg-type]
            monkeypatch,
            tmp_path,
            dataset_path,
            {"energy": _energy_target(dataset_path)},
            default_hypers,
            default_hypers["model"],
        )

    get_dataset = TrainingTests.get_dataset

    @property
    def model_cls(self) -> Any:
        return import_architecture(ARCHITECTURE).__model__

    @property
    def trainer_cls(self) -> Any:
        return import_architecture(ARCHITECTURE).__trainer__


# ------------------------------------------------------------- our own adapter tests


def _dataset_info(targets: Dict[str, dict]) -> DatasetInfo:
    return DatasetInfo(
        length_unit="angstrom",
        atomic_types=[1, 8],
        targets={
            name: get_generic_target_info(
                name,
                {"quantity": "", "unit": "", "num_subtargets": 2, **options},
            )
            for name, options in targets.items()
        },
    )


def _small_model(ecse: Dict[str, Any], targets: Dict[str, dict]) -> Any:
    hypers = get_default_hypers(ARCHITECTURE)["model"]
    hypers.update(copy.deepcopy(SMALL_MODEL))
    hypers["ecse"].update(ecse)
    torch.manual_seed(0)
    model = symatomic.mtt.SymatomicMTT(hypers, _dataset_info(targets))
    return model.to(torch.float64).eval()


def _evaluate(model: Any, atoms: ase.Atoms, sample_kind: str) -> Dict[str, Any]:
    system = systems_to_torch(atoms, dtype=torch.float64)
    system = get_system_with_neighbor_lists(system, model.requested_neighbor_lists())
    outputs = {name: ModelOutput(sample_kind=sample_kind) for name in model.outputs}
    return model([system], outputs)


@pytest.mark.parametrize("sample_kind", ["system", "atom"])
def test_cartesian_outputs_rotate_as_tensors(water_path: str, sample_kind: str) -> None:
    """With ECSE, the Cartesian tensors rebuilt from the spherical blocks rotate
    (and invert) as Cartesian tensors of rank 1, 2 and 3."""
    model = _small_model(
        {"mode": "local"},
        {
            f"mtt::rank{rank}": {
                "type": {"cartesian": {"rank": rank}},
                "sample_kind": sample_kind,
            }
            for rank in (1, 2, 3)
        },
    )
    atoms = ase.io.read(water_path, index=N_STRUCTURES - 1)
    matrix = random_transformations(
        1,
        0,
        device=torch.device("cpu"),
        dtype=torch.float64,
        add_inversions=True,
        generator=torch.Generator().manual_seed(3),
    ).matrices[0]
    matrix = -matrix if torch.det(matrix) > 0 else matrix  # test an improper one
    transformed = atoms.copy()
    transformed.positions = atoms.positions @ matrix.numpy().T
    before = _evaluate(model, atoms, sample_kind)
    after = _evaluate(model, transformed, sample_kind)
    for rank in (1, 2, 3):
        name = f"mtt::rank{rank}"
        block = before[name].block()
        assert [c.names[0] for c in block.components] == (
            ["xyz"] if rank == 1 else [f"xyz_{i}" for i in range(1, rank + 1)]
        )
        expected = block.values.detach()
        for axis in range(1, rank + 1):
            expected = torch.movedim(
                torch.tensordot(matrix, expected, dims=([1], [axis])), 0, axis
            )
        torch.testing.assert_close(
            after[name].block().values.detach(), expected, atol=1e-9, rtol=1e-7
        )


def test_adapter_matches_inner_model(water_path: str) -> None:
    """The adapter's outputs are the inner symatomic model's, with metatrain's
    metadata; Cartesian rank-1 outputs are the λ=1 block in (x, y, z) order."""
    model = _small_model(
        {"mode": "none"},
        {
            "mtt::vector": {"type": {"cartesian": {"rank": 1}}, "sample_kind": "atom"},
            "mtt::sph": {
                "type": {"spherical": {"irreps": [{"o3_lambda": 2, "o3_sigma": -1}]}},
                "sample_kind": "system",
            },
        },
    )
    atoms = ase.io.read(water_path, index=2)
    ours = _evaluate(model, atoms, "atom")
    system = get_system_with_neighbor_lists(
        systems_to_torch(atoms, dtype=torch.float64),
        model.requested_neighbor_lists(),
    )
    inner = model.model(
        [system],
        {
            "mtt::vector": ModelOutput(sample_kind="atom"),
            "mtt::sph": ModelOutput(sample_kind="atom"),
        },
    )
    spherical = inner["mtt::vector"].block().values  # (n, 3 = y z x, 2)
    torch.testing.assert_close(
        ours["mtt::vector"].block().values, spherical[:, [2, 0, 1], :]
    )
    torch.testing.assert_close(
        ours["mtt::sph"].block().values, inner["mtt::sph"].block().values
    )
    assert ours["mtt::sph"].keys == model.dataset_info.targets["mtt::sph"].layout.keys


def test_long_range_through_the_adapter() -> None:
    """``long_range`` in metatrain's hypers: the adapter's model is non-local (an
    infinite interaction range) and evaluates a periodic box."""
    pytest.importorskip("torchpme")
    hypers = get_default_hypers(ARCHITECTURE)["model"]
    hypers.update(copy.deepcopy(SMALL_MODEL))
    hypers["long_range"] = {"enable": True}
    torch.manual_seed(0)
    model = symatomic.mtt.SymatomicMTT(
        hypers,
        _dataset_info({"mtt::scalar": {"type": "scalar", "sample_kind": "system"}}),
    ).to(torch.float64)
    assert math.isinf(model.model.interaction_range)
    atoms = ase.Atoms(
        "HOH",
        positions=[[0, 0, 0], [0.96, 0, 0], [1.2, 0.9, 0]],
        cell=[6, 6, 6],
        pbc=True,
    )
    values = _evaluate(model.eval(), atoms, "system")["mtt::scalar"].block().values
    assert values.shape == (1, 2) and torch.isfinite(values).all()


def test_register_is_idempotent_and_visible() -> None:
    from metatrain.utils.architectures import find_all_architectures
    from metatrain.utils.io import find_all_architectures as io_find

    symatomic.mtt.register()
    symatomic.mtt.register()
    assert symatomic.mtt.is_registered()
    assert find_all_architectures().count(ARCHITECTURE) == 1
    assert io_find().count(ARCHITECTURE) == 1
    module = import_architecture(ARCHITECTURE)
    assert module.__model__ is symatomic.mtt.SymatomicMTT
    defaults = get_default_hypers(ARCHITECTURE)
    assert (
        defaults["model"]["d_pet"] == 128
        and defaults["model"]["ecse"]["mode"] == "auto"
    )
    assert defaults["training"]["num_epochs"] is None  # 100, or as time allows


def test_default_hypers_equal_ours() -> None:
    """The documented defaults are symatomic's: checking them gives them back."""
    from symatomic.model import check_model_hypers
    from symatomic.options import check_training_hypers

    defaults = get_default_hypers(ARCHITECTURE)
    assert check_model_hypers(defaults["model"]) == defaults["model"]
    training = dict(defaults["training"])
    assert training.pop("finetune") == {"read_from": None}
    assert training.pop("loss") == "mse"
    checked = check_training_hypers(training)
    assert checked == {**training, "finetune": {}}


def test_restart_adds_heads_for_new_targets() -> None:
    vector = {"type": {"cartesian": {"rank": 1}}, "sample_kind": "system"}
    model = _small_model({"mode": "none"}, {"mtt::a": vector})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.restart(_dataset_info({"mtt::a": vector, "mtt::b": vector}))
    assert set(model.outputs) == {"mtt::a", "mtt::b", "feature"}
    after = model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value)
    with pytest.raises(ValueError, match="atomic types"):
        model.restart(
            DatasetInfo(
                length_unit="angstrom",
                atomic_types=[1, 6, 8],
                targets=dict(model.dataset_info.targets),
            )
        )


def test_unsupported_targets_are_clear_errors() -> None:
    info = _dataset_info(
        {
            "mtt::pairs": {
                "type": {"spherical": {"irreps": [{"o3_lambda": 1, "o3_sigma": 1}]}},
                "sample_kind": "atom_pair",
            }
        }
    )
    with pytest.raises(ValueError, match="atom_pair"):
        symatomic.mtt.SymatomicMTT(get_default_hypers(ARCHITECTURE)["model"], info)
    with pytest.raises(RuntimeError, match="Unable to upgrade the checkpoint"):
        symatomic.mtt.SymatomicMTT.upgrade_checkpoint({"model_ckpt_version": 0})


# ----------------------------------------------------------------------- mtt eval

_MTT = [sys.executable, "-m", "metatrain"]


def _run(command: List[str], cwd: Path, timeout: float = 90) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_mtt_eval_on_symatomic_export(water_path: str, tmp_path: Path) -> None:
    """``mtt eval`` runs a model exported by symatomic (energies and forces) and
    its predictions are ours."""
    from symatomic.data.sets import load_data_sets
    from symatomic.io import predict
    from symatomic.model import SymatomicModel
    from symatomic.options import check_options
    from symatomic.train.trainer import export_model

    options = check_options(
        {
            "training_set": {
                "systems": {"read_from": water_path, "length_unit": "angstrom"},
                "targets": {"energy": {"key": "U", "unit": "eV", "forces": "f"}},
            },
            "validation_set": 0.0,
            "architecture": {"name": "pet", "model": dict(SMALL_MODEL)},
        }
    )
    data = load_data_sets(options, SMALL_MODEL["cutoff"])
    torch.manual_seed(0)
    model = SymatomicModel(
        options["architecture"]["model"], data.atomic_types, data.targets
    )
    model.fit_output_statistics(data.train)
    export_model(model, str(tmp_path / "model.pt"))

    (tmp_path / "eval.yaml").write_text(
        f"systems:\n  read_from: {water_path}\n  length_unit: angstrom\n"
        "targets:\n  energy:\n    key: U\n    unit: eV\n    forces:\n      key: f\n"
    )
    log = _run(
        _MTT + ["eval", "model.pt", "eval.yaml", "-o", "predictions.xyz"], tmp_path
    )
    assert "energy" in log

    ours = predict(str(tmp_path / "model.pt"), water_path)
    theirs = read_frames(str(tmp_path / "predictions.xyz"))
    energies = torch.tensor(
        [float(a.info["energy"]) for a in theirs], dtype=torch.float64
    )
    torch.testing.assert_close(
        energies,
        ours["energy"].block().values.reshape(-1).to(torch.float64),
        rtol=1e-5,
        atol=1e-4,
    )
    # mtt eval writes dE/dr (minus the forces)
    gradients = torch.tensor(
        np.concatenate(
            [np.asarray(a.info["energy_positions_gradients"]) for a in theirs]
        )
    )
    ours_gradients = ours["energy"].block().gradient("positions").values
    torch.testing.assert_close(
        gradients,
        ours_gradients.reshape(-1, 3).to(torch.float64),
        rtol=1e-4,
        atol=1e-5,
    )


def test_symatomic_mtt_wrapper_trains_and_exports(
    water_path: str, tmp_path: Path
) -> None:
    """``python -m symatomic.mtt train`` (metatrain's CLI with the architecture
    registered) trains, exports, and ``mtt eval`` reads Cartesian outputs of the
    exported model."""
    (tmp_path / "options.yaml").write_text(
        f"""
seed: 1
base_precision: 64
architecture:
  name: experimental.symatomic
  model: {{cutoff: 3.5, d_pet: 8, d_head: 8, d_node: 8, d_feedforward: 8,
          num_heads: 2, num_attention_layers: 1, num_gnn_layers: 1}}
  training: {{num_epochs: 1, batch_size: 2}}
training_set:
  systems: {{read_from: {water_path}, length_unit: angstrom}}
  targets:
    energy: {{key: U, unit: eV, forces: {{key: f}}}}
    mtt::dipole: {{key: mu, unit: e*Bohr, type: {{cartesian: {{rank: 1}}}}}}
validation_set: 0.34
test_set: 0.0
"""
    )
    _run(
        [sys.executable, "-m", "symatomic.mtt", "train", "options.yaml"],
        tmp_path,
        timeout=120,
    )
    assert (tmp_path / "model.pt").exists() and (tmp_path / "model.ckpt").exists()
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=False)
    assert checkpoint["architecture_name"] == ARCHITECTURE
    assert checkpoint["trainer_ckpt_version"] == 2
    # the calibrated uncertainties and ensembles are declared and computed
    exported = load_atomistic_model(str(tmp_path / "model.pt"))
    declared = exported.capabilities().outputs
    for name in (
        "energy_uncertainty",
        "energy_ensemble",
        "mtt::aux::dipole_uncertainty",
        "mtt::aux::dipole_ensemble",
    ):
        assert name in declared, name
    atoms = ase.io.read(water_path, index=0)
    predicted = symatomic.io.predict(
        exported, [atoms], ["energy_uncertainty", "mtt::aux::dipole_uncertainty"]
    )
    for name in ("energy_uncertainty", "mtt::aux::dipole_uncertainty"):
        values = predicted[name].block().values
        assert bool(torch.all(values > 0)), name


# ------------------------------------------------------------ options compatibility

METATRAIN_OPTIONS = """
seed: 42
base_precision: 64
device: cpu
print_stats: auto
final_eval: true
wandb: {{project: water}}
architecture:
  name: experimental.symatomic
  atomic_types: [1, 8]
  model:
    cutoff: 3.5
    d_pet: 8
    d_head: 8
    d_node: 8
    d_feedforward: 8
    num_heads: 2
    ecse: {{mode: local, frame_layers: 1}}
  training:
    num_epochs: 3
    batch_size: 2
    finetune: {{read_from: null}}
    loss:
      energy: {{type: mse, weight: 2.0, reduction: mean, gradients: {{positions: {{weight: 5.0}}}}}}
      mtt::dipole: mse
training_set:
  - systems:
      read_from: {data}
      reader: ase
      length_unit: angstrom
    targets:
      energy:
        quantity: energy
        read_from: {data}
        reader: ase
        key: U
        unit: eV
        sample_kind: system
        num_subtargets: 1
        type: scalar
        description: total energy
        forces: {{read_from: {data}, reader: ase, key: f}}
        stress: false
        virial: false
      mtt::dipole:
        key: mu
        unit: e*Bohr
        per_atom: false
        type: {{cartesian: {{rank: 1}}}}
      mtt::alpha: {{key: alpha, type: {{cartesian: {{rank: 2}}}}, description: pol}}
    extra_data: {{}}
validation_set: 0.34
test_set: 0.0
"""


def test_metatrain_options_file(water_path: str, tmp_path: Path) -> None:
    """A realistic metatrain options file (validated by metatrain itself) loads with
    symatomic's loader and reads the data."""
    from metatrain.utils.pydantic import validate_base_options
    from omegaconf import OmegaConf

    from symatomic.data.sets import load_data_sets
    from symatomic.options import load_options

    path = tmp_path / "options.yaml"
    path.write_text(METATRAIN_OPTIONS.format(data=water_path))
    validate_base_options(OmegaConf.to_container(OmegaConf.load(path)))

    options = load_options(str(path))
    assert options["architecture"]["name"] == "pet"
    assert options["architecture"]["model"]["ecse"]["mode"] == "local"
    training = options["architecture"]["training"]
    assert training["finetune"] == {}
    assert training["loss_weights"] == {"energy": 2.0}
    assert training["forces_weight"] == 5.0
    assert options["seed"] == 42 and options["base_precision"] == 64
    assert isinstance(options["training_set"], dict)

    data = load_data_sets(options, 3.5, atomic_types=[1, 8])
    assert set(data.targets) == {"energy", "mtt::dipole", "mtt::alpha"}
    assert data.targets["energy"].has_forces
    assert data.targets["energy"].description == "total energy"
    assert len(data.train) + len(data.validation) == N_STRUCTURES


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"base_precision": 16}, "base_precision"),
        ({"device": "multi-gpu"}, "device"),
        ({"validation_set": [{"systems": "a.xyz"}, {"systems": "b.xyz"}]}, "lists"),
        ({"print_stats": "sometimes"}, "print_stats"),
    ],
)
def test_metatrain_options_we_cannot_honour(
    change: Dict[str, Any], message: str
) -> None:
    from symatomic.options import check_options

    options = {"training_set": "data.xyz", "validation_set": 0.1, **change}
    with pytest.raises(ValueError, match=message):
        check_options(options)


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        ("huber", "huber"),
        ({"energy": {"type": "mse", "reduction": "sum"}}, "reduction"),
        (
            {
                "energy": {"gradients": {"positions": {"weight": 2.0}}},
                "mtt::e2": {"gradients": {"positions": {"weight": 3.0}}},
            },
            "forces weights",
        ),
    ],
)
def test_unsupported_losses(loss: Any, message: str) -> None:
    from symatomic.options import check_training_hypers

    with pytest.raises(ValueError, match=message):
        check_training_hypers({"loss": loss})


def test_plain_pet_is_not_exactly_invariant(water_path: str) -> None:
    """Why the plain-PET suites declare no equivariance: a rotation changes the
    energy of a randomly initialised PET without ECSE."""
    model = _small_model({"mode": "none"}, {})
    model = symatomic.mtt.SymatomicMTT(
        model.hypers,
        DatasetInfo(
            length_unit="angstrom",
            atomic_types=[1, 8],
            targets={
                "energy": get_generic_target_info(
                    "energy",
                    {
                        "quantity": "energy",
                        "unit": "eV",
                        "type": "scalar",
                        "num_subtargets": 1,
                        "sample_kind": "system",
                    },
                )
            },
        ),
    ).to(torch.float64)
    atoms = ase.io.read(water_path, index=0)
    rotated = atoms.copy()
    rotated.rotate(48, "y")
    before = _evaluate(model, atoms, "system")["energy"].block().values
    after = _evaluate(model, rotated, "system")["energy"].block().values
    assert float(torch.abs(before - after).max()) > 1e-6


def test_symatomic_train_zero_epochs(water_path: str, tmp_path: Path) -> None:
    """``num_epochs: 0`` (allowed for metatrain's sake) fits the baselines and
    exports the model."""
    from symatomic.options import check_options
    from symatomic.train import Trainer

    options = check_options(
        {
            "training_set": {
                "systems": water_path,
                "targets": {"energy": {"key": "U", "unit": "eV", "forces": "f"}},
            },
            "validation_set": 0.34,
            "architecture": {
                "name": ARCHITECTURE,
                "model": dict(SMALL_MODEL),
                "training": {"num_epochs": 0},
            },
        }
    )
    result = Trainer(options, str(tmp_path / "run"), progress=False).run()
    assert result.history == [] and os.path.exists(result.exported_model)
    assert os.path.exists(result.checkpoint)
