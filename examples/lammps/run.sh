#!/usr/bin/env bash
# Run examples/lammps/in.lammps with a model (default: model.pt in this folder).
#   bash examples/lammps/run.sh path/to/model.pt [steps]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
model="$(realpath "${1:-model.pt}")"
steps="${2:-2000}"
lmp="${LMP:-lmp}"
if ! command -v "$lmp" > /dev/null; then
    echo "no LAMMPS executable '$lmp' (set LMP=...); it must include pair_style metatomic" >&2
    exit 1
fi
mkdir -p lammps-run && cd lammps-run
types=$(python "$here/make_data.py" -o water.data | sed -n 's/.*-var types "\(.*\)"/\1/p')
"$lmp" -in "$here/in.lammps" -var model "$model" -var data water.data \
    -var types "$types" -var steps "$steps"
echo "log: lammps-run/log.lammps, trajectory: lammps-run/trajectory.lammpstrj"
