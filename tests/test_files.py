"""Atomic writes: the old file survives a failed write, temporary files never stay."""

import os
import stat
import subprocess
import sys

import pytest
import torch

from symatomic.files import TEMPORARY_PREFIX, atomic_write, check_output_file
from symatomic.train import load_checkpoint, save_checkpoint


def temporaries(folder):
    return [name for name in os.listdir(folder) if name.startswith(TEMPORARY_PREFIX)]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "file.txt"
    path.write_text("old")
    with pytest.raises(type(error)):
        with atomic_write(str(path)) as temporary:
            with open(temporary, "w") as file:
                file.write("half")
            raise error
    assert path.read_text() == "old"
    assert temporaries(tmp_path) == []


def test_interrupted_writer_whose_clean_up_fails_is_still_an_interrupt(tmp_path):
    """torch.save's zip writer raises its own RuntimeError when Ctrl-C hits it."""
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(str(tmp_path / "x.ckpt")) as temporary:
            open(temporary, "wb").write(b"half")
            try:
                raise KeyboardInterrupt
            finally:
                raise RuntimeError("unexpected pos 899392 vs 899280")
    assert temporaries(tmp_path) == []


def test_checkpoint_write_failure_leaves_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "a.ckpt")
    save_checkpoint({"model_data": {}, "model_state_dict": {}, "epoch": 1}, path)

    def broken_save(checkpoint, file, *args, **kwargs):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model_data": {}, "model_state_dict": {}, "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert temporaries(tmp_path) == []


def test_temporaries_of_killed_processes_are_removed(tmp_path):
    """A process killed with SIGKILL can not clean up: the next write into the
    folder removes its temporary file (and leaves those of live processes)."""
    script = (
        "import os, sys\n"
        "from symatomic.files import atomic_write\n"
        "with atomic_write(sys.argv[1]) as temporary:\n"
        "    open(temporary, 'w').write('half')\n"
        "    os._exit(9)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "a.txt")], timeout=600)
    assert len(temporaries(tmp_path)) == 1
    with atomic_write(str(tmp_path / "live.txt")) as live:
        open(live, "w").write("x")
        with atomic_write(str(tmp_path / "b.txt")) as temporary:
            open(temporary, "w").write("b")
        # the dead process's file is gone, this process's own is still there
        assert temporaries(tmp_path) == [os.path.basename(live)]
    assert temporaries(tmp_path) == []
    assert (tmp_path / "b.txt").read_text() == "b"


def test_written_files_follow_the_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        save_checkpoint(
            {"model_data": {}, "model_state_dict": {}, "epoch": 1},
            str(tmp_path / "a.ckpt"),
        )
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "a.ckpt").st_mode) == 0o644


def test_check_output_file(tmp_path):
    (tmp_path / "exists.pt").write_text("")
    with pytest.raises(ValueError, match="exists; pass --force"):
        check_output_file(str(tmp_path / "exists.pt"))
    check_output_file(str(tmp_path / "exists.pt"), force=True)
    for path in (str(tmp_path), str(tmp_path / "new") + os.sep):
        for force in (False, True):
            with pytest.raises(ValueError, match="is a directory"):
                check_output_file(path, force=force)
