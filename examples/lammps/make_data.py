"""Write a LAMMPS data file (``atom_style atomic``, metal units) for
``examples/lammps/in.lammps``.

LAMMPS numbers atom types 1, 2, …; ``pair_coeff * * Z1 Z2 …`` tells the metatomic
pair style which atomic number each type is. This script orders the types by
increasing atomic number and prints the matching ``types`` variable::

    python examples/lammps/make_data.py                  # a water trimer, 20 Å box
    python examples/lammps/make_data.py my.xyz --box 0   # keep the file's own cell
"""

import argparse
import os
from typing import List, Optional, Sequence

import ase
import ase.io
import numpy as np


def boxed(atoms: ase.Atoms, box: float) -> ase.Atoms:
    """``atoms`` centred in a periodic cubic box of side ``box`` (Å), or unchanged
    when ``box`` is 0 (the structure must then be periodic already)."""
    atoms = atoms.copy()
    if box > 0:
        extent = np.ptp(atoms.positions, axis=0).max() if len(atoms) else 0.0
        if extent >= box:
            raise ValueError(
                f"the structure ({extent:.1f} Å) does not fit a {box} Å box"
            )
        atoms.set_cell(np.eye(3) * box)
        atoms.center()
    elif not atoms.pbc.all():
        raise ValueError("a box size is needed for a structure that is not periodic")
    atoms.pbc = True
    return atoms


def write_data(atoms: ase.Atoms, path: str, box: float = 20.0) -> List[int]:
    """Write ``atoms`` (placed in a box, see :func:`boxed`) as a LAMMPS data file.

    :return: the atomic number of each LAMMPS type, in type order (``pair_coeff``)
    """
    atoms = boxed(atoms, box)
    numbers = sorted(set(int(z) for z in atoms.numbers))
    symbols = [ase.data.chemical_symbols[z] for z in numbers]
    temporary = path + ".tmp"
    ase.io.write(
        temporary,
        atoms,
        format="lammps-data",
        specorder=symbols,
        masses=True,
        units="metal",
        atom_style="atomic",
    )
    os.replace(temporary, path)
    return numbers


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "structure", nargs="?", help="default: a water trimer of the example"
    )
    parser.add_argument("--index", type=int, default=0, help="frame of the file")
    parser.add_argument("--box", type=float, default=20.0, help="Å; 0 keeps the cell")
    parser.add_argument("-o", "--output", default="water.data")
    args = parser.parse_args(argv)
    if args.structure is None:
        from symatomic.cli import example_options_path

        folder = os.path.dirname(example_options_path())
        frames = ase.io.read(os.path.join(folder, "water_clusters.xyz"), ":")
        atoms = next(a for a in frames if len(a) == 9)
    else:
        atoms = ase.io.read(args.structure, index=args.index)
    numbers = write_data(atoms, args.output, args.box)
    print(f'wrote {args.output}; use -var types "{" ".join(map(str, numbers))}"')


if __name__ == "__main__":
    main()
