"""Sphinx configuration of the symatomic documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html``.
"""

import importlib
import importlib.util
import os
import re
import sys

# the package is normally installed (``pip install -e .``); fall back to the source
# tree so that the documentation also builds from a plain checkout
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if importlib.util.find_spec("symatomic") is None:
    sys.path.insert(0, os.path.join(ROOT, "src"))

import symatomic  # noqa: E402

project = "symatomic"
author = "symatomic developers"
copyright = "symatomic developers"
version = symatomic.__version__
release = symatomic.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
default_role = "literal"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

# the documented build needs only the ``docs`` extra: the metatrain interface
# (``symatomic.mtt``) is documented from mocks of the packages it is built on when
# they are not installed
autodoc_mock_imports = [
    name
    for name in ("metatrain", "omegaconf", "sphericart")
    if importlib.util.find_spec(name) is None
]

# TorchScript classes of metatensor/metatomic show up in signatures as
# "<torch.ScriptClass object at 0x…>": replace them by their names
_SCRIPT_CLASS = re.compile(r"<torch\.ScriptClass object at (0x[0-9a-fA-F]+)>")


def _script_class_names():
    names = {}
    for module_name, class_names in (
        ("metatensor.torch", ["TensorMap", "TensorBlock", "Labels", "LabelsEntry"]),
        (
            "metatomic.torch",
            [
                "System",
                "ModelOutput",
                "ModelCapabilities",
                "ModelMetadata",
                "ModelEvaluationOptions",
                "NeighborListOptions",
            ],
        ),
    ):
        module = importlib.import_module(module_name)
        for class_name in class_names:
            if hasattr(module, class_name):
                obj = getattr(module, class_name)
                names[hex(id(obj))] = f"{module_name}.{class_name}"
    return names


def _clean_signature(app, what, name, obj, options, signature, return_annotation):
    names = _script_class_names()

    def replace(text):
        if text is None:
            return None
        text = _SCRIPT_CLASS.sub(
            lambda match: names.get(match.group(1), "ScriptClass"), text
        )
        # dataclass fields with a default factory
        return text.replace("<factory>", "...")

    return replace(signature), replace(return_annotation)


def setup(app):
    app.connect("autodoc-process-signature", _clean_signature)


try:
    import furo  # noqa: F401

    html_theme = "furo"
except ImportError:  # pragma: no cover - depends on the environment
    html_theme = "alabaster"

html_title = f"symatomic {release}"
html_static_path = []
