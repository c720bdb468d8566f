"""Memory allocator settings for large tensors on CPU (glibc's malloc).

PyTorch's CPU tensors of more than a few megabytes (the pair tokens of a PET are
``n_pairs × d_pet`` floats: 45 MB for a 1,536-atom water box) are allocated by
glibc's ``malloc``, which by default hands such blocks to ``mmap`` and returns them to
the kernel with ``munmap`` when they are freed. Every evaluation then maps, zeroes
(page faults) and unmaps hundreds of megabytes again: on 2 cores, energy + forces of
the default model on 1,536 water atoms took 7.8 s this way, and 4.3 s with the
settings below (648 atoms: 2.0 s → 1.8 s; training on the example: 3.8 → 3.4 s per
epoch). ``benchmarks/ecse_cost.py`` prints the system time that remains.

:func:`tune_allocator` raises the ``mmap`` threshold to 1 GiB and the trim threshold
to 2 GiB (``mallopt``): freed blocks are kept by the process and reused by the next
evaluation. The resident memory then stays at the peak of one evaluation instead of
falling back between calls; the peak itself does not change. ``symatomic train`` and
``symatomic eval`` call it; engines that load an exported model (ASE, i-PI, LAMMPS)
get the same effect from the environment variables of glibc::

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647 lmp -in in.lmp

Set ``SYMATOMIC_SYSTEM_MALLOC=1`` (or any ``MALLOC_*`` variable of your own) to keep
the allocator as it is.
"""

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_allocator"]

#: bytes: blocks below this size come from the heap and are reused
MMAP_THRESHOLD = 1 << 30
#: bytes of free memory at the top of the heap kept instead of returned to the kernel
TRIM_THRESHOLD = (1 << 31) - 1

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Keep large freed blocks for reuse (module docstring).

    :return: whether the settings were applied: ``False`` off Linux/glibc, when
        ``SYMATOMIC_SYSTEM_MALLOC`` is set, or when the environment already sets a
        ``MALLOC_*`` variable
    """
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("SYMATOMIC_SYSTEM_MALLOC", "") not in ("", "0"):
        return False
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    applied = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and applied
    return applied
