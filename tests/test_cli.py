"""The command line as a user meets it: the real ``symatomic`` command in a
subprocess. Options, files that are never replaced silently, one-line errors (never a
traceback) before the work, Ctrl-C, and the parity plots of ``train`` and ``eval``.

The model is a tiny SOAP backbone (fast, exactly equivariant), trained once per module.
"""

import copy
import importlib.metadata
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import ase.io
import numpy as np
import pytest
import yaml

from conftest import SMALL_SOAP, make_frames
from symatomic.cli import main

#: generous: a loaded machine is slow, and only a real hang should reach it
TIMEOUT = 900

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


def soap_options(path: str, epochs: int = 2, **changes) -> dict:
    options = {
        "seed": 1,
        "base_precision": 64,
        "architecture": {
            "name": "pet",
            "model": {"backbone": "soap", "cutoff": 3.5, "soap": dict(SMALL_SOAP)},
            "training": {
                "num_epochs": epochs,
                "batch_size": 8,
                "learning_rate": 3e-3,
                "warmup_fraction": 0.0,
            },
        },
        "training_set": {
            "systems": {"read_from": path},
            "targets": copy.deepcopy(TARGETS),
        },
        "validation_set": 0.25,
        "test_set": 0.25,
    }
    options.update(changes)
    return options


def write_options(folder, options, name="options.yaml") -> str:
    path = os.path.join(str(folder), name)
    with open(path, "w") as file:
        yaml.safe_dump(options, file)
    return path


def symatomic(*args, cwd=None, module=("-m", "symatomic")):
    """Run ``symatomic ARGS`` (``python -m symatomic``), return the completed
    process (text)."""
    return subprocess.run(
        [sys.executable, *module, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def assert_one_line_error(result, *expected):
    """Exit status 1, no traceback, one line on stderr that starts with 'error:'
    and contains every ``expected`` text."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def no_temporaries(folder) -> bool:
    return not any(
        name.startswith(".tmp-")
        for _, _, names in os.walk(str(folder))
        for name in names
    )


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("data") / "data.xyz")
    ase.io.write(path, make_frames(16, seed=4), format="extxyz")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_file):
    """A finished tiny training run: ``(folder, options file, completed process)``."""
    folder = tmp_path_factory.mktemp("run")
    options = write_options(folder, soap_options(data_file))
    result = symatomic("train", options, "-o", folder / "run", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    return folder / "run", options, result


# ----------------------------------------------------------------- the options


def test_version_and_bare_command():
    result = symatomic("--version")
    assert result.returncode == 0
    assert (
        result.stdout.strip() == f"symatomic {importlib.metadata.version('symatomic')}"
    )
    result = symatomic()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: symatomic")
    for command in ("train", "export", "eval", "symmetrize"):
        assert command in result.stdout


def test_every_option_states_its_default():
    import argparse

    from symatomic.cli import build_parser

    parser = build_parser()
    commands = next(
        action
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    checked = 0
    for name, command in commands.choices.items():
        for action in command._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help and "default" in action.help, (name, action.dest)
            checked += 1
    assert checked >= 15
    # what the defaults are, in the real help texts
    help_text = " ".join(symatomic("eval", "--help").stdout.split())
    assert "predictions-energy.mts" in help_text and "(default: 16)" in help_text
    assert "(default: model.pt)" in " ".join(
        symatomic("export", "--help").stdout.split()
    )
    assert "(default: model-ecse.pt)" in " ".join(
        symatomic("symmetrize", "--help").stdout.split()
    )


# ------------------------------------------------------------- train and files


def test_auto_backbone_is_soap_for_a_small_tensor_set(tmp_path, data_file):
    """``backbone: auto`` on a small training set without energies takes SOAP
    (docs/heads.rst, "Accuracy at equal budget") and says so in the log."""
    options = soap_options(data_file, epochs=1)
    del options["architecture"]["model"]["backbone"]
    del options["training_set"]["targets"]["energy"]
    del options["training_set"]["targets"]["mtt::polarizability"]
    path = write_options(tmp_path, options)
    result = symatomic("train", path, "-o", tmp_path / "run", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    assert "backbone: auto -> soap" in log and "model: SOAP backbone" in log


def test_train_summary_and_parity_plots(run):
    folder, _, result = run
    log = (folder / "train.log").read_text()
    assert "model: SOAP backbone" in log and "model: PET" not in log
    for split in ("validation", "test"):
        for target in ("energy", "mtt_dipole", "mtt_polarizability"):
            path = folder / f"parity-{split}-{target}.png"
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert "parity plots:" in result.stdout
    assert no_temporaries(folder)


def test_eval_writes_parity_plots_and_never_replaces_silently(
    run, data_file, tmp_path, capsys
):
    folder, _, _ = run
    model = folder / "model.pt"
    output = tmp_path / "eval" / "predictions.mts"
    result = symatomic("eval", model, data_file, "-o", output)
    assert result.returncode == 0, result.stdout + result.stderr
    written = sorted(os.listdir(output.parent))
    assert written == [
        "predictions-energy.mts",
        "predictions-mtt_dipole.mts",
        "predictions-mtt_polarizability.mts",
        "predictions-parity-energy.png",
        "predictions-parity-mtt_dipole.png",
        "predictions-parity-mtt_polarizability.png",
    ]
    first = (output.parent / "predictions-energy.mts").stat().st_mtime_ns
    # like export: refuse, and say how to replace
    result = symatomic("eval", model, data_file, "-o", output)
    assert_one_line_error(result, "predictions-energy.mts", "exists", "--force")
    assert (output.parent / "predictions-energy.mts").stat().st_mtime_ns == first
    assert main(["eval", str(model), data_file, "-o", str(output), "--force"]) == 0
    assert "parity plot of 'mtt::polarizability' written" in capsys.readouterr().out
    assert no_temporaries(output.parent)
    # a directory is not a file name
    assert main(["eval", str(model), data_file, "-o", str(tmp_path) + os.sep]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_export_to_a_directory(run, tmp_path, capsys):
    folder, _, _ = run
    (tmp_path / "somewhere").mkdir()
    result = symatomic("export", folder / "model.ckpt", "-o", tmp_path / "somewhere")
    assert_one_line_error(result, "is a directory", "model.pt")
    result = symatomic(
        "export", folder / "model.ckpt", "-o", tmp_path / "somewhere", "--force"
    )
    assert_one_line_error(result, "is a directory", "model.pt")
    for arguments in (
        ["export", str(folder / "model.ckpt"), "-o", str(tmp_path / "new") + os.sep],
        ["symmetrize", str(folder / "model.pt"), "-o", str(tmp_path), "--force"],
    ):
        assert main(arguments) == 1
        assert "is a directory" in capsys.readouterr().err
    assert os.listdir(tmp_path / "somewhere") == []
    assert not (tmp_path / "new").exists()


def test_restart_with_more_epochs_does_not_warn(run, tmp_path, capsys):
    folder, options, _ = run
    result = symatomic(
        "train",
        options,
        "--restart",
        folder / "last.ckpt",
        "--epochs",
        3,
        "-o",
        tmp_path / "more",
        "--no-progress",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "differ" not in result.stdout + result.stderr
    assert "num_epochs changed from 2 to 3" in result.stdout
    assert "resuming from epoch 2" in result.stdout
    # a changed model option is still reported (and the checkpoint's model kept)
    changed = yaml.safe_load(open(options))
    changed["architecture"]["model"]["cutoff"] = 3.0
    changed_path = write_options(tmp_path, changed, "changed.yaml")
    arguments = ["train", changed_path, "--restart", str(folder / "last.ckpt")]
    arguments += ["--epochs", "3", "-o", str(tmp_path / "changed"), "--no-progress"]
    assert main(arguments) == 0
    assert "the architecture options ['model.cutoff'] differ" in capsys.readouterr().out


# ---------------------------------------------------------- errors: one line


def test_missing_target_key_in_one_structure(data_file, tmp_path):
    frames = ase.io.read(data_file, ":")
    frames[5].info.pop("dipole", None)
    if frames[5].calc is not None:
        frames[5].calc.results.pop("dipole", None)
    path = str(tmp_path / "missing.xyz")
    ase.io.write(path, frames)
    options = write_options(tmp_path, soap_options(path, epochs=1))
    result = symatomic("train", options, "-o", tmp_path / "run", "--no-progress")
    assert_one_line_error(result, "'dipole'", "mtt::dipole", "missing.xyz[5]")


def test_corrupt_exported_models(run, data_file, tmp_path, capsys):
    folder, _, _ = run
    good = (folder / "model.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 3])
    random = tmp_path / "random.pt"
    random.write_bytes(np.random.default_rng(0).bytes(50_000))
    result = symatomic("eval", truncated, data_file)
    assert_one_line_error(result, str(truncated), "not a readable metatomic model")
    assert "PytorchStreamReader" not in result.stderr
    for arguments, expected in (
        (["eval", str(random), data_file], "not a readable metatomic model"),
        (["eval", str(folder / "model.ckpt"), data_file], "symatomic export"),
        (["symmetrize", str(truncated), "-o", str(tmp_path / "s.pt")], "not a"),
    ):
        assert main(arguments) == 1
        error = capsys.readouterr().err
        assert error.startswith("error: ") and expected in error, error
        assert "PytorchStreamReader" not in error


def test_corrupt_checkpoints_do_not_quote_torch(run, tmp_path, capsys):
    import torch

    folder, _, _ = run
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": np.zeros(3)}, str(foreign))  # needs weights_only=False
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((folder / "model.ckpt").read_bytes()[:5000])
    result = symatomic("export", foreign, "-o", tmp_path / "x.pt")
    line = assert_one_line_error(result, "corrupt or not a symatomic checkpoint")
    assert "weights_only" not in line and "will likely succeed" not in line
    assert main(["export", str(truncated), "-o", str(tmp_path / "x.pt")]) == 1
    line = capsys.readouterr().err
    assert (
        "corrupt or not a symatomic checkpoint" in line and "weights_only" not in line
    )
    assert not (tmp_path / "x.pt").exists()


def test_units_are_checked_before_training(data_file, tmp_path):
    options = soap_options(data_file, epochs=1)
    options["training_set"]["systems"]["length_unit"] = "angstromm"
    result = symatomic(
        "train", write_options(tmp_path, options), "-o", tmp_path / "a", "--no-progress"
    )
    assert_one_line_error(result, "length_unit", "angstromm")
    assert "epoch" not in result.stdout
    assert not os.path.exists(tmp_path / "a")  # before the output folder, even

    options = soap_options(data_file, epochs=1)
    options["training_set"]["targets"]["energy"]["unit"] = "e*Bohr"
    result = symatomic(
        "train", write_options(tmp_path, options), "-o", tmp_path / "b", "--no-progress"
    )
    assert_one_line_error(result, "energy.unit", "not an energy unit")
    assert not os.path.exists(tmp_path / "b")


def test_out_of_memory_is_one_line(run, data_file, tmp_path, monkeypatch, capsys):
    """The allocator's message, as TorchScript wraps it (tens of lines), becomes one
    line with the size asked for and what to reduce. The failure is injected: a
    real one would depend on the machine."""
    folder, options, _ = run
    message = (
        "The following operation failed in the TorchScript interpreter.\n"
        + "Traceback of TorchScript (most recent call last):\n" * 40
        + "RuntimeError: [enforce fail at alloc_cpu.cpp:118] data. "
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate "
        "137438953472 bytes. Error code 12 (Cannot allocate memory)"
    )
    wrapper = tmp_path / "out_of_memory.py"
    wrapper.write_text(
        "import sys\n"
        "import symatomic.io, symatomic.train\n"
        "def fail(*args, **kwargs):\n"
        f"    raise RuntimeError({message!r})\n"
        "symatomic.io.predict = fail\n"
        "from symatomic.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = symatomic(
        "eval", folder / "model.pt", data_file, "--batch-size", 4, module=[wrapper]
    )
    assert_one_line_error(result, "out of memory", "128.0 GiB", "--batch-size (now 4")
    # the same in the training (in this process: the command line is the same)
    from symatomic.train import Trainer

    def fail(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(Trainer, "run", fail)
    assert main(["train", options, "-o", str(tmp_path / "oom"), "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    assert error.startswith("error: out of memory: an allocation of 128.0 GiB failed")
    assert "batch_size (now 8)" in error


def test_out_of_memory_messages():
    import torch

    from symatomic.cli import out_of_memory_message

    cuda = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity "
        "of 79.15 GiB of which 1.2 GiB is free."
    )
    assert out_of_memory_message(cuda, "reduce x") == (
        "error: out of memory: an allocation of 2.50 GiB failed; reduce x"
    )
    assert out_of_memory_message(MemoryError(), "") == "error: out of memory"
    assert out_of_memory_message(RuntimeError("shape mismatch"), "") is None


# ------------------------------------------------------- overlapping atoms


def test_overlapping_atoms_are_reported(run, data_file, tmp_path, capsys):
    from symatomic.data.structures import OverlappingAtomsWarning
    from symatomic.io import predict

    folder, _, _ = run
    frames = ase.io.read(data_file, ":")
    frames[3].positions[2] = frames[3].positions[0] + [0.0, 0.0, 0.02]
    path = str(tmp_path / "overlap.xyz")
    ase.io.write(path, frames)
    expected = re.compile(r"overlap\.xyz\[3\]: atoms 0 and 2 \(0\.02 angstrom\)")
    # at inference, from Python and from the command line
    with pytest.warns(OverlappingAtomsWarning, match=r"structure #3: atoms 0 and 2"):
        predict(str(folder / "model.pt"), frames)
    result = symatomic("eval", folder / "model.pt", path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and expected.search(warnings[0]), result.stdout
    assert warnings[0].startswith("warning: structure")
    # at training (no epoch needed: the data are checked when read)
    options = write_options(tmp_path, soap_options(path, epochs=0))
    assert main(["train", options, "-o", str(tmp_path / "run"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and expected.search(warnings[0]), printed


# ------------------------------------------------------------- interruptions


def test_ctrl_c_says_how_to_resume(data_file, tmp_path):
    """A real SIGINT once the first checkpoint exists: one line with the last
    checkpoint and the commands that resume or export it; no temporary files; the
    resume command works."""
    options = write_options(tmp_path, soap_options(data_file, epochs=100_000))
    output = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "symatomic", "train", options, "-o", str(output)]
        + ["--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        # a shell may start background jobs with SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (output / "last.ckpt").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    match = re.search(
        r"the last checkpoint is (\S+) \(epoch (\d+) of 100000\)", lines[0]
    )
    assert match, lines[0]
    assert match.group(1) == str(output / "last.ckpt")
    assert "symatomic export" in lines[0] and "--restart" in lines[0]
    assert no_temporaries(output)
    # the checkpoint is complete: resume it for one more epoch
    epoch = int(match.group(2))
    result = symatomic(
        "train",
        options,
        "--restart",
        match.group(1),
        "--epochs",
        epoch + 1,
        "-o",
        tmp_path / "resumed",
        "--no-progress",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "resumed" / "model.pt").exists()


def test_run_killed_during_its_export_is_finished_by_one_command(
    data_file, tmp_path, capsys
):
    """Ctrl-C (injected) while the final model is written: the line names the export
    command; --restart says the same; that command finishes the run."""
    wrapper = tmp_path / "interrupt_export.py"
    wrapper.write_text(
        "import sys\n"
        "import symatomic.train.trainer as trainer\n"
        "original = trainer.export_model\n"
        "def interrupted(model, path):\n"
        "    def save(temporary):\n"
        "        open(temporary, 'wb').write(b'half a model')\n"
        "        raise KeyboardInterrupt\n"
        "    model = model.export()\n"
        "    model.save = save\n"
        "    original(model, path)\n"
        "trainer.export_model = interrupted\n"
        "from symatomic.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    options = write_options(tmp_path, soap_options(data_file, epochs=1))
    output = tmp_path / "run"
    result = symatomic(
        "train", options, "-o", output, "--no-progress", module=[wrapper]
    )
    assert result.returncode == 130, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (output / "model.pt").exists()
    assert no_temporaries(output)  # the half-written model is gone
    command = re.search(r"finish with '(symatomic export [^']+)'", result.stderr)
    assert command, result.stderr
    # --restart does not train again, and names the export
    arguments = ["train", options, "--restart", str(output / "last.ckpt")]
    assert main(arguments + ["-o", str(tmp_path / "again")]) == 1
    error = capsys.readouterr().err
    assert "already finished" in error and "symatomic export" in error, error
    arguments = shlex.split(command.group(1))[1:]
    result = symatomic(*arguments)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (output / "model.pt").exists()
