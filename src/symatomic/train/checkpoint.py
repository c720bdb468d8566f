"""Checkpoints: written atomically, validated when read."""

import os
import pickle
import warnings
import zipfile
from typing import Any, Dict, Optional

import torch

from .. import __version__
from ..files import atomic_write

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "torch_load_reason",
    "upgrade_model_hypers",
]

CHECKPOINT_FORMAT = "symatomic-checkpoint"
#: version of the checkpoint layout; bump it (and add an upgrade step) when it changes
#: (2: Wigner-D matrices by Clebsch-Gordan recursion, no sampled-point buffers;
#: 3: explicit ``backbone``, ``tensor_heads``, ``basis_hidden`` and ``soap`` in the
#: model hyper-parameters, whose defaults became ``auto``; 4: ``edge_inputs`` and the
#: ``density_*`` options of PET's invariant edge inputs, which became the default,
#: and ECSE's ``collinear_penalty``, null before; 5: ``pair_normalization`` of
#: every read-out, the heads' pair sums divided by the average number of
#: neighbors, 1 before; 6: the uncertainties' ``covariance_root`` ``R`` with
#: ``R Rᵀ = Σ`` instead of ``inverse_covariance`` ``Σ``, converted when loaded by
#: :class:`symatomic.uncertainty.BlockUncertainty`; 7: PET's
#: ``reverse_last_layer``, off by default, on for older models)
CHECKPOINT_VERSION = 7

_REQUIRED = ("model_data", "model_state_dict", "epoch")


def save_checkpoint(checkpoint: Dict[str, Any], path: str) -> None:
    """Write ``checkpoint`` to ``path`` atomically.

    The data goes to a temporary file in the same folder, is flushed to disk, and then
    replaces ``path`` in one step: an interrupted write never leaves a truncated file,
    and the previous checkpoint stays intact until the new one is complete.
    """
    checkpoint = dict(checkpoint)
    checkpoint["format"] = CHECKPOINT_FORMAT
    checkpoint["version"] = CHECKPOINT_VERSION
    checkpoint["symatomic_version"] = __version__
    with atomic_write(path) as temporary:
        with open(temporary, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())


def upgrade_checkpoint(checkpoint: Dict[str, Any], path: str) -> Dict[str, Any]:
    """Bring an older checkpoint to :data:`CHECKPOINT_VERSION`."""
    version = checkpoint.get("version")
    if not isinstance(version, int):
        raise ValueError(f"checkpoint '{path}' has no valid version number")
    if version > CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint '{path}' has version {version}, newer than this symatomic "
            f"({__version__}) understands (version {CHECKPOINT_VERSION}); upgrade "
            "symatomic"
        )
    if version < 2:
        # the Wigner-D module no longer stores sample points and projectors
        obsolete = ("wigner.points", "wigner.projectors")
        for key in ("model_state_dict", "best_model_state_dict"):
            state = checkpoint.get(key)
            if isinstance(state, dict):
                checkpoint[key] = {
                    name: value
                    for name, value in state.items()
                    if not name.endswith(obsolete)
                }
        checkpoint["version"] = 2
    if checkpoint["version"] < 3:
        model_data = checkpoint.get("model_data")
        if isinstance(model_data, dict) and isinstance(model_data.get("hypers"), dict):
            model_data["hypers"] = upgrade_model_hypers(model_data["hypers"])
        checkpoint["version"] = 3
    if checkpoint["version"] < 4:
        model_data = checkpoint.get("model_data")
        if isinstance(model_data, dict) and isinstance(model_data.get("hypers"), dict):
            model_data["hypers"] = upgrade_model_hypers(model_data["hypers"])
        checkpoint["version"] = 4
    if checkpoint["version"] < 5:
        for key in ("model_state_dict", "best_model_state_dict"):
            state = checkpoint.get(key)
            if isinstance(state, dict):
                checkpoint[key] = add_pair_normalization(state)
        checkpoint["version"] = 5
    if checkpoint["version"] < 6:
        # the model's load hook turns inverse_covariance into covariance_root
        checkpoint["version"] = 6
    if checkpoint["version"] < 7:
        # older PETs combined the last layer's tokens with their reverses
        model_data = checkpoint.get("model_data")
        if isinstance(model_data, dict) and isinstance(model_data.get("hypers"), dict):
            model_data["hypers"] = dict(model_data["hypers"])
            model_data["hypers"].setdefault("reverse_last_layer", True)
        checkpoint["version"] = 7
    return checkpoint


def add_pair_normalization(state: Dict[str, Any]) -> Dict[str, Any]:
    """A model state written before the read-outs divided their pair sums by the
    average number of neighbors: ``pair_normalization`` 1 for every read-out (the
    sums of that time), so that the model computes what it did."""
    state = dict(state)
    suffix = ".scale"
    for name, value in list(state.items()):
        if name.endswith(suffix) and ".readouts." in "." + name:
            normalization = name[: -len(suffix)] + ".pair_normalization"
            if normalization not in state:
                state[normalization] = torch.ones((), dtype=value.dtype)
    return state


def upgrade_model_hypers(hypers: Dict[str, Any]) -> Dict[str, Any]:
    """Model hyper-parameters written before the backbone, tensor-head and
    edge-input options existed (or while ``tensor_heads: null`` meant ``direct`` for
    PET): make the choices of that time explicit, so that the model is rebuilt as it
    was."""
    hypers = dict(hypers)
    hypers.setdefault("backbone", "pet")
    if hypers.get("tensor_heads") is None:
        hypers["tensor_heads"] = "basis" if hypers["backbone"] == "soap" else "direct"
    hypers.setdefault("basis_hidden", 0)
    if isinstance(hypers.get("ecse"), dict) and hypers["ecse"].get("mode") is None:
        hypers["ecse"] = dict(hypers["ecse"], mode="none")
    # before invariant edge inputs existed, PET saw Cartesian pair vectors; the
    # inner cutoff of ECSE pushed near-collinear pairs out to the outer cutoff
    hypers.setdefault("edge_inputs", "cartesian")
    if isinstance(hypers.get("ecse"), dict):
        hypers["ecse"] = dict(hypers["ecse"])
        hypers["ecse"].setdefault("collinear_penalty", None)
    return hypers


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read and validate a symatomic checkpoint, with clear errors for bad files."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        with warnings.catch_warnings():
            # torch's remarks on pickle protocols are no news to the user
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, unpickling errors of all kinds
        raise ValueError(
            f"checkpoint '{path}' is corrupt or not a symatomic checkpoint "
            f"({torch_load_reason(error)}); use another checkpoint of the run "
            "(last.ckpt, model.ckpt or checkpoints/epoch-N.ckpt)"
        ) from None
    if (
        not isinstance(checkpoint, dict)
        or checkpoint.get("format") != CHECKPOINT_FORMAT
    ):
        raise ValueError(
            f"'{path}' is not a symatomic checkpoint (a metatomic .pt model? "
            "use 'symatomic eval' on exported models)"
        )
    missing = [key for key in _REQUIRED if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint '{path}' is incomplete: missing {missing}")
    return upgrade_checkpoint(checkpoint, path)


def torch_load_reason(error: BaseException) -> str:
    """The reason why ``torch.load`` (or ``torch.jit.load``) failed, in a few words,
    without torch's advice to load untrusted files with ``weights_only=False``."""
    if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in str(
        error
    ):
        return "it holds Python objects that a checkpoint never contains"
    if isinstance(error, (EOFError, zipfile.BadZipFile, OSError)):
        return "the file is truncated or damaged"
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = text.splitlines()[0]
    if "PytorchStreamReader" in line or "central directory" in line:
        return "the file is truncated or not a PyTorch archive"
    # keep the first sentence: torch appends paragraphs of advice
    sentence = line.split(". ")[0].rstrip(".")
    return sentence[:200]


def model_from_checkpoint(
    path: str, weights: str = "best", ecse: Optional[str] = None
) -> Any:
    """The :class:`~symatomic.model.SymatomicModel` stored in a checkpoint.

    :param weights: ``"best"`` (lowest validation loss, when stored) or ``"last"``
    :param ecse: ``None`` keeps the checkpoint's ECSE settings; ``"local"`` evaluates
        the same weights with exact local ECSE in every attention layer (symmetrizes
        a PET trained without ECSE); ``"none"`` drops ECSE
    """
    from ..model import SymatomicModel

    if weights not in ("best", "last"):
        raise ValueError(f"weights must be 'best' or 'last', got {weights!r}")
    checkpoint = load_checkpoint(path)
    model_data = checkpoint["model_data"]
    if ecse is not None:
        if ecse not in ("none", "local"):
            raise ValueError(f"ecse must be 'none' or 'local', got {ecse!r}")
        hypers = dict(model_data["hypers"])
        hypers["ecse"] = {**hypers.get("ecse", {}), "mode": ecse}
        if ecse == "local":
            hypers["ecse"]["frame_layers"] = None
        model_data = {**model_data, "hypers": hypers}
    model = SymatomicModel.from_model_data(model_data)
    if weights == "best" and checkpoint.get("best_model_state_dict") is not None:
        state = checkpoint["best_model_state_dict"]
    else:
        state = checkpoint["model_state_dict"]
    dtype = next(iter(v for v in state.values() if v.is_floating_point())).dtype
    model.to(dtype)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"checkpoint '{path}' does not match its model description: {error}"
        ) from None
    return model
