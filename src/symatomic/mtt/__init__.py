"""symatomic as a metatrain architecture.

metatrain finds architectures only as modules inside its own package
(``metatrain.<name>``) and lists them by scanning its installation folder, so an
architecture living in another package is invisible to it until it is registered.
:func:`register` does that explicitly::

    import symatomic.mtt

    symatomic.mtt.register()  # now metatrain knows "experimental.symatomic"

    from metatrain.utils.architectures import get_default_hypers

    get_default_hypers("experimental.symatomic")

Registration lasts for the running Python process only. The ``mtt`` command cannot
register anything itself; ``python -m symatomic.mtt ...`` registers and then runs
metatrain's command-line interface with the same arguments (``train``, ``eval``,
``export``).

This module follows metatrain's layout of an architecture: ``__model__``,
``__trainer__``, ``__capabilities__``, ``__authors__``, ``__maintainers__`` and a
``documentation`` submodule with the hyper-parameters.
"""

import functools
import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Callable, List

from . import documentation
from .model import ARCHITECTURE_NAME, SymatomicMTT
from .trainer import SymatomicMTTTrainer

__all__ = [
    "ARCHITECTURE_NAME",
    "SymatomicMTT",
    "SymatomicMTTTrainer",
    "documentation",
    "is_registered",
    "register",
]

__model__ = SymatomicMTT
__trainer__ = SymatomicMTTTrainer
__capabilities__ = {
    "supported_devices": __model__.__supported_devices__,
    "supported_dtypes": __model__.__supported_dtypes__,
}
__authors__ = [("The symatomic developers", "@symatomic")]
__maintainers__ = [("The symatomic developers", "@symatomic")]


def _with_registered(original: Callable[[], List[str]]) -> Callable[[], List[str]]:
    """``find_all_architectures`` of metatrain, also listing our architecture."""

    @functools.wraps(original)
    def find_all_architectures() -> List[str]:
        names = list(original())
        if ARCHITECTURE_NAME not in names:
            names.append(ARCHITECTURE_NAME)
        return names

    find_all_architectures.__symatomic_original__ = original  # type: ignore[attr-defined]
    return find_all_architectures


def is_registered() -> bool:
    """Whether :func:`register` has made this architecture known to metatrain."""
    return sys.modules.get(f"metatrain.{ARCHITECTURE_NAME}") is sys.modules[__name__]


def register() -> None:
    """Make this package metatrain's architecture ``experimental.symatomic``.

    It puts this module in :data:`sys.modules` as
    ``metatrain.experimental.symatomic`` (and ``documentation`` as its
    ``.documentation``), which is where metatrain's
    :func:`~metatrain.utils.architectures.import_architecture`,
    :func:`~metatrain.utils.architectures.get_default_hypers` and option checks look.
    metatrain's ``find_all_architectures`` only scans its installation folder, and
    loading a checkpoint (``model_from_checkpoint``, ``mtt export``, the end of
    ``mtt train``) refuses names it does not list; so the function is wrapped, in
    ``metatrain.utils.architectures`` and in ``metatrain.utils.io``, to also list
    ``experimental.symatomic``. Calling this again does nothing.

    :raises RuntimeError: if metatrain already has an architecture of that name
    """
    if is_registered():
        return
    parent_name, _, child = f"metatrain.{ARCHITECTURE_NAME}".rpartition(".")
    parent: ModuleType = importlib.import_module(parent_name)
    full_name = f"metatrain.{ARCHITECTURE_NAME}"
    if (
        full_name in sys.modules
        or hasattr(parent, child)
        or importlib.util.find_spec(full_name) is not None
    ):
        raise RuntimeError(
            f"metatrain already has an architecture '{ARCHITECTURE_NAME}'; cannot "
            "register symatomic under this name"
        )
    module = sys.modules[__name__]
    sys.modules[full_name] = module
    sys.modules[f"{full_name}.documentation"] = documentation
    setattr(parent, child, module)

    import metatrain.utils.architectures as architectures
    import metatrain.utils.io as io

    for namespace in (architectures, io):
        current = namespace.find_all_architectures
        if not hasattr(current, "__symatomic_original__"):
            namespace.find_all_architectures = _with_registered(current)
