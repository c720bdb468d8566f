"""Training: loss goes down, exact resume, checkpoints, CLI, distributed."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import tiny_options
from symatomic.cli import main
from symatomic.options import check_options
from symatomic.train import Trainer, load_checkpoint, save_checkpoint

TARGETS = {
    "energy": {"key": "energy", "unit": "eV"},
    "mtt::dipole": {
        "key": "dipole",
        "type": {"cartesian": {"rank": 1}},
        "unit": "e*Angstrom",
    },
    "mtt::polarizability": {
        "key": "polarizability",
        "type": {"cartesian": {"rank": 2}},
    },
}


def _train(path, output, epochs=3, restart=None, **training):
    options = check_options(tiny_options(path, TARGETS, epochs=epochs, **training))
    return Trainer(options, str(output), restart=restart, progress=False).run()


def test_training_lowers_the_loss(synthetic_file, tmp_path):
    result = _train(synthetic_file, tmp_path / "run", epochs=20)
    train = [record["loss"] for record in result.history]
    validation = [record["val:loss"] for record in result.history]
    assert sum(train[-3:]) / 3 < 0.6 * train[0]
    assert min(validation) < 0.7 * validation[0]
    assert os.path.exists(result.exported_model)
    assert os.path.exists(result.checkpoint)
    assert "energy/forces" in result.validation_errors
    assert "mtt::polarizability/o3_lambda=2,o3_sigma=1" in result.validation_errors


def test_resume_is_exact(synthetic_file, tmp_path):
    full = _train(synthetic_file, tmp_path / "full", epochs=4, checkpoint_interval=2)
    middle = tmp_path / "full" / "checkpoints" / "epoch-2.ckpt"
    assert middle.exists()
    resumed = _train(
        synthetic_file,
        tmp_path / "resumed",
        epochs=4,
        restart=str(middle),
        checkpoint_interval=2,
    )
    a = load_checkpoint(str(tmp_path / "full" / "last.ckpt"))
    b = load_checkpoint(str(tmp_path / "resumed" / "last.ckpt"))
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key
    assert [r["loss"] for r in full.history] == [r["loss"] for r in resumed.history]


def test_corrupt_checkpoints(synthetic_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.ckpt"))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="corrupt or not a symatomic checkpoint"):
        load_checkpoint(str(garbage))
    _train(synthetic_file, tmp_path / "run", epochs=1)
    good = (tmp_path / "run" / "model.ckpt").read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(str(truncated))
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, str(other))
    with pytest.raises(ValueError, match="not a symatomic checkpoint"):
        load_checkpoint(str(other))
    # the CLI reports the problem instead of a traceback
    assert main(["export", str(truncated), "-o", str(tmp_path / "x.pt")]) == 1


def test_checkpoint_written_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / "a.ckpt")
    save_checkpoint({"model_data": {}, "model_state_dict": {}, "epoch": 1}, path)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model_data": {}, "model_state_dict": {}, "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_cli_train_export_eval(synthetic_file, tmp_path, capsys):
    options = tiny_options(synthetic_file, TARGETS, epochs=2)
    options_path = tmp_path / "options.yaml"
    options_path.write_text(yaml.safe_dump(options))
    output = tmp_path / "out"
    assert main(["train", str(options_path), "-o", str(output), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "exported model:" in printed and "validation errors" in printed
    # never overwrite an earlier result
    with pytest.raises(SystemExit, match="already exists"):
        main(["train", str(options_path), "-o", str(output)])
    exported = tmp_path / "exported.pt"
    assert main(["export", str(output / "model.ckpt"), "-o", str(exported)]) == 0
    predictions = tmp_path / "predictions.mts"
    assert main(["eval", str(exported), synthetic_file, "-o", str(predictions)]) == 0
    printed = capsys.readouterr().out
    assert "errors against the reference values" in printed
    assert "energy/forces" in printed
    files = sorted(os.listdir(tmp_path))
    assert "predictions-mtt_dipole.mts" in files
    # bad inputs give one clear line
    assert main(["eval", str(tmp_path / "nothing.pt"), synthetic_file]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_distributed_matches_single_process(synthetic_file, tmp_path):
    """2 processes under torchrun (gloo) give the same model as 1 process."""
    options = tiny_options(synthetic_file, TARGETS, epochs=2, batch_size=8)
    options_path = tmp_path / "options.yaml"
    options_path.write_text(yaml.safe_dump(options))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        "-m",
        "symatomic",
        "train",
        str(options_path),
        "-o",
        str(tmp_path / "ddp"),
        "--no-progress",
    ]
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        main(
            [
                "train",
                str(options_path),
                "-o",
                str(tmp_path / "single"),
                "--no-progress",
            ]
        )
        == 0
    )
    a = load_checkpoint(str(tmp_path / "ddp" / "last.ckpt"))["model_state_dict"]
    b = load_checkpoint(str(tmp_path / "single" / "last.ckpt"))["model_state_dict"]
    for key, value in a.items():
        if ".uncertainty." in key and not key.endswith(".calibration"):
            # (C + ς I)⁻¹ and the ensembles amplify the 1e-12 differences of the
            # weights in the directions the training set hardly spans
            continue
        tolerance = 1e-6 if ".uncertainty." in key else 1e-9
        torch.testing.assert_close(value, b[key], atol=1e-10, rtol=tolerance, msg=key)


def test_validation_file_needs_every_target(synthetic_file, tmp_path):
    options = tiny_options(synthetic_file, TARGETS, epochs=1)
    options["validation_set"] = {
        "systems": synthetic_file,
        "targets": {"energy": {"key": "energy", "unit": "eV"}},
    }
    with pytest.raises(
        ValueError, match=r"validation_set.targets lacks \['mtt::dipole'"
    ):
        Trainer(check_options(options), str(tmp_path / "run"), progress=False).run()


def test_validation_file_without_forces(synthetic_file, tmp_path):
    import ase.io

    from symatomic.data import read_frames

    frames = [atoms.copy() for atoms in read_frames(synthetic_file)[:6]]
    for atoms in frames:
        del atoms.arrays["forces"]
    other = str(tmp_path / "no-forces.xyz")
    ase.io.write(other, frames)
    targets = {"energy": {"key": "energy", "unit": "eV"}}
    options = tiny_options(synthetic_file, targets, epochs=1)
    options["validation_set"] = {"systems": other, "targets": targets}
    result = Trainer(
        check_options(options), str(tmp_path / "run"), progress=False
    ).run()
    assert "energy" in result.validation_errors
    assert "energy/forces" not in result.validation_errors


def test_finished_run_can_not_resume(synthetic_file, tmp_path):
    _train(synthetic_file, tmp_path / "run", epochs=1)
    with pytest.raises(ValueError, match="already finished .*--epochs N"):
        _train(
            synthetic_file,
            tmp_path / "again",
            epochs=1,
            restart=str(tmp_path / "run" / "last.ckpt"),
        )


def test_unknown_unit_is_rejected_before_training(synthetic_file, tmp_path):
    targets = {"energy": {"key": "energy", "unit": "electronvolts-ish"}}
    with pytest.raises(ValueError, match="not a unit metatomic knows"):
        _train_targets = tiny_options(synthetic_file, targets, epochs=1)
        Trainer(
            check_options(_train_targets), str(tmp_path / "run"), progress=False
        ).run()


def test_time_left_estimate():
    """The estimate of the whole run's time left: median of recent epochs (the
    first, warm-up epoch left out), plus the final evaluation and export."""
    from symatomic.train.trainer import _format_duration, _seconds_left, _time_left

    assert _seconds_left([], 10) == 0.0 and _time_left([], 10) == ""
    assert _seconds_left([5.0, 1.0, 1.2, 0.8], 10) == pytest.approx(12.0)
    assert _seconds_left([3.0], 0) == 0.0
    assert _format_duration(42) == "42 s"
    assert _format_duration(600) == "10 min"
    assert _format_duration(7200) == "2.0 h"
    assert "left in all" in _time_left([2.0, 2.0], 5)
