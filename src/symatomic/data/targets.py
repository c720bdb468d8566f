"""Description of learning targets, in metatrain's language.

A target section of an options file (the same layout as metatrain's ``targets:``) is
turned into a :class:`TargetSpec`: the name, unit and kind of samples of the target and
the list of spherical blocks the model predicts. Cartesian targets of rank 1–3 are
learned as their spherical blocks (:class:`symatomic.o3.CartesianDecomposition`).

Internally, the values of a target for a set of structures are one tensor per block,
``(n_samples, 2λ+1, n_properties)``; scalars are ``λ = 0`` blocks with one component.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap

from ..o3 import CartesianDecomposition

__all__ = [
    "BlockSpec",
    "GradientSpec",
    "TargetSpec",
    "check_layout_matches",
    "parse_target_options",
    "tensormap_to_blocks",
]


@dataclass
class BlockSpec:
    """One block of a target.

    :param o3_lambda: angular order (0 for scalars)
    :param o3_sigma: +1 for proper tensors, -1 for pseudotensors
    :param property_names: names of the properties dimensions
    :param property_values: one row per property
    :param atom_type: for per-atom targets split by atomic type (the ``atom_type``
        key of metatrain's atomic-basis targets), the type of the atoms in this block
    """

    o3_lambda: int
    o3_sigma: int
    property_names: List[str]
    property_values: List[List[int]]
    atom_type: Optional[int] = None

    @property
    def num_properties(self) -> int:
        return len(self.property_values)

    @property
    def num_components(self) -> int:
        return 2 * self.o3_lambda + 1


@dataclass
class GradientSpec:
    """Where to read a gradient (forces, stress or virial) of an energy target."""

    read_from: str
    key: str
    reader: Optional[str] = None


@dataclass
class TargetSpec:
    """A learning target.

    :param name: output name, ``"energy"`` or ``"<domain>::<name>"``
    :param kind: ``"scalar"``, ``"cartesian"`` or ``"spherical"``
    :param sample_kind: ``"system"`` (one value per structure) or ``"atom"``
    :param blocks: the spherical blocks the model predicts
    :param rank: rank of a Cartesian target (the blocks are its decomposition)
    :param symmetric: whether a Cartesian target is fully symmetric (only the
        symmetric blocks are learned); ``None`` until decided from the data
    :param key_names: names of the keys of the TensorMap of this target
    """

    name: str
    kind: str
    sample_kind: str
    quantity: str = ""
    unit: str = ""
    description: str = ""
    num_subtargets: int = 1
    rank: int = 0
    symmetric: Optional[bool] = None
    blocks: List[BlockSpec] = field(default_factory=list)
    key_names: List[str] = field(default_factory=list)
    # reading information (not needed by the model)
    read_from: str = ""
    reader: Optional[str] = None
    key: str = ""
    forces: Optional[GradientSpec] = None
    stress: Optional[GradientSpec] = None
    virial: Optional[GradientSpec] = None
    #: gradients enabled by default (metatrain's rule for energies): used when the
    #: file has them, skipped silently otherwise
    optional_gradients: List[str] = field(default_factory=list)

    # ------------------------------------------------------------------ properties
    @property
    def is_energy(self) -> bool:
        return self.quantity == "energy"

    @property
    def per_atom(self) -> bool:
        return self.sample_kind == "atom"

    @property
    def is_scalar(self) -> bool:
        return self.kind == "scalar"

    @property
    def has_forces(self) -> bool:
        return self.forces is not None

    @property
    def has_stress(self) -> bool:
        return self.stress is not None or self.virial is not None

    @property
    def is_invariant(self) -> bool:
        """Whether every block is a proper scalar."""
        return all(b.o3_lambda == 0 and b.o3_sigma == 1 for b in self.blocks)

    @property
    def short_name(self) -> str:
        """Name without the ``domain::`` prefix and variant, for property labels."""
        return self.name.split("/")[0].split("::")[-1]

    def decomposition(self) -> CartesianDecomposition:
        """The Cartesian ↔ spherical map of a Cartesian target."""
        if self.kind != "cartesian":
            raise ValueError(f"target '{self.name}' is not a Cartesian target")
        return CartesianDecomposition(self.rank, bool(self.symmetric))

    def set_cartesian_blocks(self, symmetric: bool) -> None:
        """Choose the blocks of a Cartesian target (all of them or the symmetric ones)."""
        if self.kind != "cartesian":
            raise ValueError(f"target '{self.name}' is not a Cartesian target")
        self.symmetric = bool(symmetric) and self.rank > 1
        self.blocks = []
        decomposition = self.decomposition().blocks
        # all blocks of a TensorMap need the same property names: "copy" for all
        # as soon as one irrep appears several times (rank 3, not symmetric)
        with_copies = any(block.multiplicity > 1 for block in decomposition)
        for block in decomposition:
            if not with_copies:
                names = ["n"]
                values = [[i] for i in range(self.num_subtargets)]
            else:
                names = ["n", "copy"]
                values = [
                    [i, k]
                    for k in range(block.multiplicity)
                    for i in range(self.num_subtargets)
                ]
            self.blocks.append(
                BlockSpec(block.o3_lambda, block.o3_sigma, names, values)
            )

    # ----------------------------------------------------------------- metadata
    def keys(self) -> Labels:
        """Keys of the TensorMap of this target."""
        if self.is_scalar:
            return Labels.single()
        values = []
        for block in self.blocks:
            row = [block.o3_lambda, block.o3_sigma]
            if "atom_type" in self.key_names:
                row.append(int(block.atom_type if block.atom_type is not None else -1))
            values.append(row)
        return Labels(self.key_names, torch.tensor(values, dtype=torch.int32))

    def layout(self) -> TensorMap:
        """An empty TensorMap with the metadata of this target (float64)."""
        sample_names = ["system", "atom"] if self.per_atom else ["system"]
        blocks = []
        for block in self.blocks:
            if self.is_scalar:
                components: List[Labels] = []
                shape = [0, block.num_properties]
            else:
                components = [_o3_mu_labels(block.o3_lambda)]
                shape = [0, block.num_components, block.num_properties]
            blocks.append(
                TensorBlock(
                    values=torch.zeros(shape, dtype=torch.float64),
                    samples=Labels(
                        sample_names,
                        torch.zeros((0, len(sample_names)), dtype=torch.int32),
                    ),
                    components=components,
                    properties=Labels(
                        block.property_names,
                        torch.tensor(block.property_values, dtype=torch.int32).reshape(
                            -1, len(block.property_names)
                        ),
                    ),
                )
            )
        return TensorMap(self.keys(), blocks)

    # ------------------------------------------------------------ serialization
    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: Dict[str, Any]) -> "TargetSpec":
        data = dict(data)
        data["blocks"] = [BlockSpec(**b) for b in data.get("blocks", [])]
        for gradient in ("forces", "stress", "virial"):
            if data.get(gradient) is not None:
                data[gradient] = GradientSpec(**data[gradient])
        return TargetSpec(**data)


def _o3_mu_labels(o3_lambda: int) -> Labels:
    return Labels(
        "o3_mu",
        torch.arange(-o3_lambda, o3_lambda + 1, dtype=torch.int32).reshape(-1, 1),
    )


# ---------------------------------------------------------------------------------
# parsing of metatrain-style target sections
# ---------------------------------------------------------------------------------

_TARGET_FIELDS = {
    "quantity",
    "read_from",
    "reader",
    "key",
    "unit",
    "sample_kind",
    "per_atom",
    "type",
    "num_subtargets",
    "description",
    "forces",
    "stress",
    "virial",
    "symmetric",
}


def parse_target_options(
    name: str, options: Any, default_read_from: str, where: str = "targets"
) -> TargetSpec:
    """Turn one entry of a metatrain ``targets:`` section into a :class:`TargetSpec`.

    Follows metatrain's rules: a string is a shorthand for ``key``; ``energy`` (or
    ``quantity: energy``) targets read ``forces`` and ``stress`` by default (and skip
    them silently if the file has none); ``per_atom`` is the old spelling of
    ``sample_kind``. ``symmetric: true/false`` (our extension) forces the choice of the
    blocks of a Cartesian target; by default it is decided from the training data.

    :param name: target name (the key in the ``targets:`` section)
    :param options: the section's value
    :param default_read_from: the ``systems.read_from`` file
    :param where: location of this section in the options file, for error messages
    """
    if name != "energy" and "::" not in name:
        raise ValueError(
            f"{where}: target name '{name}' must be 'energy' or '<domain>::<name>' "
            f"(e.g. 'mtt::{name}'), following metatomic's naming of outputs"
        )
    if options is None:
        options = {}
    if isinstance(options, str):
        options = {"key": options}
    if not isinstance(options, dict):
        raise ValueError(f"{where}.{name}: expected a mapping, got {options!r}")
    unknown = set(options) - _TARGET_FIELDS
    if unknown:
        raise ValueError(
            f"{where}.{name}: unknown option(s) {sorted(unknown)}; "
            f"known options are {sorted(_TARGET_FIELDS)}"
        )

    quantity = str(options.get("quantity", "energy" if name == "energy" else ""))
    is_energy = quantity == "energy"

    sample_kind = options.get("sample_kind")
    if "per_atom" in options:
        from_per_atom = "atom" if options["per_atom"] else "system"
        if sample_kind is not None and sample_kind != from_per_atom:
            raise ValueError(
                f"{where}.{name}: 'per_atom: {options['per_atom']}' contradicts "
                f"'sample_kind: {sample_kind}'"
            )
        sample_kind = from_per_atom
    sample_kind = sample_kind or "system"
    if sample_kind not in ("system", "atom"):
        raise ValueError(
            f"{where}.{name}: sample_kind must be 'system' or 'atom', got "
            f"'{sample_kind}' (atom-pair targets are not supported)"
        )

    num_subtargets = options.get("num_subtargets", 1)
    if not isinstance(num_subtargets, int) or num_subtargets < 1:
        raise ValueError(
            f"{where}.{name}: num_subtargets must be a positive integer, got "
            f"{num_subtargets!r}"
        )

    read_from = str(options.get("read_from", default_read_from))
    unit = str(options.get("unit", ""))
    _check_unit(unit, f"{where}.{name}.unit", "eV" if is_energy else None)
    spec = TargetSpec(
        name=name,
        kind="scalar",
        sample_kind=sample_kind,
        quantity=quantity,
        unit=unit,
        description=str(options.get("description", "")),
        num_subtargets=num_subtargets,
        read_from=read_from,
        reader=options.get("reader"),
        key=str(options.get("key", name)),
    )

    target_type = options.get("type", "scalar")
    if target_type == "scalar":
        spec.kind = "scalar"
        spec.key_names = ["_"]
        spec.blocks = [
            BlockSpec(0, 1, [spec.short_name], [[i] for i in range(num_subtargets)])
        ]
    elif isinstance(target_type, dict) and list(target_type) == ["cartesian"]:
        cartesian = target_type["cartesian"] or {}
        rank = cartesian.get("rank") if isinstance(cartesian, dict) else None
        if rank not in (1, 2, 3):
            raise ValueError(
                f"{where}.{name}.type.cartesian.rank must be 1, 2 or 3, got {rank!r}"
            )
        spec.kind = "cartesian"
        spec.rank = rank
        spec.key_names = ["o3_lambda", "o3_sigma"]
        symmetric = options.get("symmetric")
        if symmetric is not None and not isinstance(symmetric, bool):
            raise ValueError(f"{where}.{name}.symmetric must be true or false")
        if rank == 1:
            symmetric = False
        spec.set_cartesian_blocks(bool(symmetric))
        spec.symmetric = symmetric  # None: decided from the data
    elif isinstance(target_type, dict) and list(target_type) == ["spherical"]:
        spherical = target_type["spherical"] or {}
        if spherical.get("product") not in (None,):
            raise ValueError(
                f"{where}.{name}.type.spherical.product is not supported "
                f"(got {spherical.get('product')!r})"
            )
        spec.kind = "spherical"
        irreps = spherical.get("irreps")
        if isinstance(irreps, dict):
            if sample_kind != "atom":
                raise ValueError(
                    f"{where}.{name}: irreps given per atomic type need "
                    "'sample_kind: atom'"
                )
            spec.key_names = ["o3_lambda", "o3_sigma", "atom_type"]
            for atom_type, type_irreps in irreps.items():
                for o3_lambda, o3_sigma, num in _parse_irreps(
                    type_irreps, f"{where}.{name}.type.spherical.irreps.{atom_type}"
                ):
                    spec.blocks.append(
                        BlockSpec(
                            o3_lambda,
                            o3_sigma,
                            ["n"],
                            [[i] for i in range(num * num_subtargets)],
                            atom_type=int(atom_type),
                        )
                    )
        else:
            spec.key_names = ["o3_lambda", "o3_sigma"]
            for o3_lambda, o3_sigma, num in _parse_irreps(
                irreps, f"{where}.{name}.type.spherical.irreps"
            ):
                spec.blocks.append(
                    BlockSpec(
                        o3_lambda,
                        o3_sigma,
                        ["n"],
                        [[i] for i in range(num * num_subtargets)],
                    )
                )
        seen = set()
        for block in spec.blocks:
            key = (block.o3_lambda, block.o3_sigma, block.atom_type)
            if key in seen:
                raise ValueError(
                    f"{where}.{name}: irrep (o3_lambda={block.o3_lambda}, "
                    f"o3_sigma={block.o3_sigma}) is listed twice; use 'num' instead"
                )
            seen.add(key)
    else:
        raise ValueError(
            f"{where}.{name}.type must be 'scalar', {{cartesian: {{rank: N}}}} or "
            f"{{spherical: {{irreps: [...]}}}}, got {target_type!r}"
        )

    # gradients of energies
    for gradient in ("forces", "stress", "virial"):
        value = options.get(gradient, None)
        explicit = gradient in options
        if not is_energy:
            if value:
                raise ValueError(
                    f"{where}.{name}: '{gradient}' is only allowed for energy targets "
                    "(name 'energy' or 'quantity: energy')"
                )
            continue
        if value is None and not explicit:
            # metatrain reads forces and stress by default when present
            value = gradient in ("forces", "stress")
            required = False
        else:
            required = True
        if value is False or value is None:
            continue
        if value is True:
            value = {}
        if isinstance(value, str):
            value = {"key": value}
        if not isinstance(value, dict):
            raise ValueError(
                f"{where}.{name}.{gradient}: expected a mapping, got {value!r}"
            )
        unknown = set(value) - {"read_from", "key", "reader"}
        if unknown:
            raise ValueError(
                f"{where}.{name}.{gradient}: unknown option(s) {sorted(unknown)}"
            )
        gradient_spec = GradientSpec(
            read_from=str(value.get("read_from", read_from)),
            key=str(value.get("key", gradient)),
            reader=value.get("reader"),
        )
        setattr(spec, gradient, gradient_spec)
        if not required:
            spec.optional_gradients.append(gradient)
    if spec.stress is not None and spec.virial is not None:
        if "stress" in spec.optional_gradients:
            spec.stress = None
            spec.optional_gradients.remove("stress")
        else:
            raise ValueError(
                f"{where}.{name}: cannot train on both 'stress' and 'virial'; "
                "set one of them to false"
            )
    if is_energy and (spec.kind != "scalar" or num_subtargets != 1):
        raise ValueError(f"{where}.{name}: energy targets must be single scalars")
    return spec


def _check_unit(unit: str, where: str, dimension_of: Optional[str] = None) -> None:
    """Reject units metatomic does not know now, not at export after training.

    :param dimension_of: a unit of the dimension ``unit`` must have (``"eV"`` for
        energies, which metatomic checks at export)
    """
    if not unit:
        return
    from metatomic.torch import unit_conversion_factor

    try:
        unit_conversion_factor(unit, unit)
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else repr(error)
        raise ValueError(
            f"{where}: '{unit}' is not a unit metatomic knows ({message})"
        ) from None
    if dimension_of is not None:
        try:
            unit_conversion_factor(unit, dimension_of)
        except Exception:
            raise ValueError(
                f"{where}: '{unit}' is not an energy unit (e.g. eV, kcal/mol, Hartree)"
            ) from None


def _parse_irreps(irreps: Any, where: str) -> List[Tuple[int, int, int]]:
    if not isinstance(irreps, list) or len(irreps) == 0:
        raise ValueError(
            f"{where}: expected a non-empty list of irreps, got {irreps!r}"
        )
    result = []
    for irrep in irreps:
        if not isinstance(irrep, dict) or set(irrep) - {"o3_lambda", "o3_sigma", "num"}:
            raise ValueError(
                f"{where}: each irrep must be {{o3_lambda: L, o3_sigma: ±1, num: N}}, "
                f"got {irrep!r}"
            )
        o3_lambda = irrep.get("o3_lambda")
        o3_sigma = irrep.get("o3_sigma")
        num = irrep.get("num", 1)
        if not isinstance(o3_lambda, int) or o3_lambda < 0:
            raise ValueError(f"{where}: o3_lambda must be a non-negative integer")
        if o3_sigma not in (-1, 1):
            raise ValueError(f"{where}: o3_sigma must be +1 or -1, got {o3_sigma!r}")
        if not isinstance(num, int) or num < 1:
            raise ValueError(f"{where}: num must be a positive integer")
        result.append((o3_lambda, o3_sigma, num))
    return result


def check_layout_matches(spec: TargetSpec, tensor: TensorMap, source: str) -> None:
    """Check that a TensorMap read from a file has the layout declared for ``spec``."""
    expected = spec.layout()
    if list(tensor.keys.names) != list(expected.keys.names):
        raise ValueError(
            f"target '{spec.name}' from {source}: keys are named "
            f"{list(tensor.keys.names)}, expected {list(expected.keys.names)}"
        )
    for key, block in expected.items():
        found = tensor.keys.position(key)
        if found is None:
            raise ValueError(
                f"target '{spec.name}' from {source}: missing block with key "
                f"{dict(zip(key.names, key.values.tolist()))}"
            )
        actual = tensor.block(found)
        if list(actual.samples.names) != list(block.samples.names):
            raise ValueError(
                f"target '{spec.name}' from {source}: samples are named "
                f"{list(actual.samples.names)}, expected {list(block.samples.names)} "
                f"(sample_kind: {spec.sample_kind})"
            )
        if [c.names for c in actual.components] != [
            c.names for c in block.components
        ] or [len(c) for c in actual.components] != [len(c) for c in block.components]:
            raise ValueError(
                f"target '{spec.name}' from {source}: block "
                f"{dict(zip(key.names, key.values.tolist()))} has components "
                f"{[(c.names, len(c)) for c in actual.components]}, expected "
                f"{[(c.names, len(c)) for c in block.components]}"
            )
        if len(actual.properties) != len(block.properties):
            raise ValueError(
                f"target '{spec.name}' from {source}: block "
                f"{dict(zip(key.names, key.values.tolist()))} has "
                f"{len(actual.properties)} properties, expected {len(block.properties)}"
            )
    if len(tensor) != len(expected):
        extra = [
            dict(zip(k.names, k.values.tolist()))
            for k in tensor.keys
            if expected.keys.position(k) is None
        ]
        raise ValueError(
            f"target '{spec.name}' from {source}: unexpected blocks {extra}"
        )


def tensormap_to_blocks(spec: TargetSpec, tensor: TensorMap) -> List[TensorBlock]:
    """Blocks of ``tensor`` in the order of ``spec.blocks``."""
    return [tensor.block(tensor.keys.position(key)) for key in spec.keys()]
