"""The allocator settings of the command line (symatomic.allocator)."""

import os
import subprocess
import sys

import pytest

from symatomic.allocator import tune_allocator

SCRIPT = "from symatomic.allocator import tune_allocator; print(tune_allocator())"


def _run(environment: dict) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("SYMATOMIC_SYSTEM_MALLOC", None)
    env.update(environment)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_applied_on_glibc_and_kept_out_when_asked() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert _run({}) == "True"
    assert _run({"SYMATOMIC_SYSTEM_MALLOC": "1"}) == "False"
    # the user's own malloc settings win
    assert _run({"MALLOC_ARENA_MAX": "2"}) == "False"


def test_never_fails() -> None:
    assert tune_allocator() in (True, False)
