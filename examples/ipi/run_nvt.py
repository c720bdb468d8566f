"""NVT molecular dynamics in i-PI with a symatomic model, through a socket.

Starts the i-PI server on ``input.xml`` (water trimer, 300 K, SVR thermostat, 0.5 fs)
and i-PI's Python driver as the client, which evaluates the exported model with
i-PI's own metatomic PES::

    i-pi input.xml
    i-pi-py_driver -u -a symatomic -m metatomic -o template=init.xyz,model=model.pt

waits for both under a time limit, removes the socket and prints where the outputs
are. Usage::

    python run_nvt.py [model.pt] [--steps 2000] [--output-dir ipi-nvt]
        [--timeout 3600] [--ensemble]

``symatomic train --example -o run`` writes an exported model to ``run/model.pt``.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from typing import List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
#: name of the socket in input.xml's <ffsocket>
ADDRESS = "symatomic"


def prepare_input(output_dir: str, steps: Optional[int], ensemble: bool = False) -> str:
    """Copy ``input.xml`` and ``init.xyz`` to ``output_dir``, optionally with another
    number of steps and an output of the energy ensemble (``simulation.committee``:
    the ``committee_pot`` extras of the metatomic PES, in Hartree); return the path
    of the copied input."""
    os.makedirs(output_dir, exist_ok=True)
    shutil.copy(os.path.join(HERE, "init.xyz"), os.path.join(output_dir, "init.xyz"))
    tree = ElementTree.parse(os.path.join(HERE, "input.xml"))
    if steps is not None:
        tree.getroot().find("total_steps").text = str(steps)
    if ensemble:
        committee = ElementTree.SubElement(
            tree.getroot().find("output"),
            "trajectory",
            {"filename": "committee", "stride": "1", "extra_type": "committee_pot"},
        )
        committee.text = " extras "
    path = os.path.join(output_dir, "input.xml")
    tree.write(path)
    return path


def _executable(name: str) -> str:
    """An i-PI command, preferably next to this Python (the same environment)."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(local):
        return local
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"error: '{name}' not found; install i-PI (pip install ipi)")
    return found


def _stop(process: subprocess.Popen) -> None:
    """Terminate ``process`` (then kill it) if it is still running."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(
    model: str,
    output_dir: str,
    steps: Optional[int] = None,
    timeout: float = 3600.0,
    ensemble: bool = False,
) -> int:
    """Run i-PI and its metatomic driver until the simulation ends; return 0 when
    both processes finished cleanly. ``ensemble``: the PES also evaluates the
    model's energy ensemble, and the spread of its members along the trajectory is
    printed at the end."""
    model = os.path.abspath(model)
    if not os.path.exists(model):
        raise SystemExit(
            f"error: model '{model}' does not exist (symatomic train --example -o run "
            "writes run/model.pt)"
        )
    output_dir = os.path.abspath(output_dir)
    input_path = prepare_input(output_dir, steps, ensemble)
    template = os.path.join(output_dir, "init.xyz")
    if "," in model or "," in template:
        raise SystemExit("error: i-PI's driver options cannot hold paths with commas")

    # a private folder for the socket, so that simultaneous runs do not collide
    socket_dir = tempfile.mkdtemp(prefix="ipi-")
    if len(socket_dir) > 80 and os.path.isdir("/tmp"):
        # UNIX socket paths are limited to ~100 characters
        os.rmdir(socket_dir)
        socket_dir = tempfile.mkdtemp(prefix="ipi-", dir="/tmp")
    prefix = socket_dir + os.sep
    socket_path = prefix + ADDRESS
    server_cmd: List[str] = [_executable("i-pi"), "-S", prefix, input_path]
    client_cmd: List[str] = [
        _executable("i-pi-py_driver"),
        *("-u", "-a", ADDRESS, "-S", prefix),
        *("-m", "metatomic", "-o", f"template={template},model={model}"),
    ]
    if ensemble:
        client_cmd[-1] += ",energy_ensemble=true"
    deadline = time.monotonic() + timeout
    server_log = open(os.path.join(output_dir, "i-pi.log"), "w")
    client_log = open(os.path.join(output_dir, "driver.log"), "w")
    server = subprocess.Popen(
        server_cmd, cwd=output_dir, stdout=server_log, stderr=subprocess.STDOUT
    )
    client: Optional[subprocess.Popen] = None
    status = 1
    try:
        # the client can only connect once the server has created the socket
        while not os.path.exists(socket_path):
            if server.poll() is not None:
                raise RuntimeError("i-PI stopped before opening its socket")
            if time.monotonic() > deadline:
                raise TimeoutError("i-PI did not open its socket in time")
            time.sleep(0.1)
        client = subprocess.Popen(
            client_cmd, cwd=output_dir, stdout=client_log, stderr=subprocess.STDOUT
        )
        while server.poll() is None:
            if client.poll() is not None and client.returncode != 0:
                raise RuntimeError(f"the driver failed (exit code {client.returncode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the simulation took more than {timeout:.0f} s")
            time.sleep(0.2)
        # at the end i-PI tells the driver to exit
        client.wait(timeout=max(1.0, min(30.0, deadline - time.monotonic())))
        status = server.returncode or client.returncode
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as error:
        print(f"error: {error}", file=sys.stderr)
    finally:
        if client is not None:
            _stop(client)
        _stop(server)
        server_log.close()
        client_log.close()
        shutil.rmtree(socket_dir, ignore_errors=True)

    print(f"i-PI log:    {server_log.name}")
    print(f"driver log:  {client_log.name}")
    if status == 0:
        print(f"properties:  {os.path.join(output_dir, 'simulation.out')}")
        print(f"trajectory:  {os.path.join(output_dir, 'simulation.pos_0.xyz')}")
        if ensemble:
            members = ensemble_members(output_dir)
            spread = members.std(axis=1)
            print(
                f"ensemble:    {members.shape[1]} members; spread (standard "
                f"deviation) of the energy along {members.shape[0]} steps: median "
                f"{1e3 * float(np.median(spread)):.3f} meV, max "
                f"{1e3 * float(spread.max()):.3f} meV"
            )
    else:
        print("the run failed; see the logs above", file=sys.stderr)
    return status


def ensemble_members(output_dir: str) -> "np.ndarray":
    """The energies of the ensemble members, ``(n_steps, n_members)`` in eV, read
    from the ``committee`` extras that i-PI wrote (one block of member energies, in
    Hartree, per step)."""
    paths = [
        os.path.join(output_dir, name)
        for name in sorted(os.listdir(output_dir))
        if name.startswith("simulation.committee")
    ]
    if not paths:
        raise RuntimeError("i-PI wrote no committee extras (simulation.committee*)")
    steps: List[List[float]] = []
    with open(paths[0]) as file:
        for line in file:
            line = line.strip().strip("[]")
            if not line:
                continue
            if line.startswith("#"):
                steps.append([])
                continue
            if not steps:
                steps.append([])
            steps[-1].extend(float(v) for v in line.replace(",", " ").split())
    hartree = 27.211386245988  # eV, CODATA 2018 (i-PI's factor to 8 digits)
    return np.array([s for s in steps if s]) * hartree


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="model.pt", help="exported model")
    parser.add_argument("--steps", type=int, help="override total_steps of input.xml")
    parser.add_argument("--output-dir", default="ipi-nvt", help="folder of the outputs")
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="limit in seconds for the run"
    )
    parser.add_argument(
        "--ensemble",
        action="store_true",
        help="also evaluate the energy ensemble (models with calibrated "
        "uncertainties) and print its spread",
    )
    args = parser.parse_args(argv)
    return run(args.model, args.output_dir, args.steps, args.timeout, args.ensemble)


if __name__ == "__main__":
    sys.exit(main())
