"""Data sets in metatrain's layout: structures, targets, batches."""

from .readers import read_dataset
from .structures import Structure, compute_neighbors, read_frames, structure_from_atoms
from .targets import BlockSpec, TargetSpec, parse_target_options

__all__ = [
    "BlockSpec",
    "Structure",
    "TargetSpec",
    "compute_neighbors",
    "parse_target_options",
    "read_dataset",
    "read_frames",
    "structure_from_atoms",
]
