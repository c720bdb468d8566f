"""
symatomic (exactly O(3)-equivariant PET)
========================================

symatomic's PET backbone with one head per target, trained by symatomic's trainer,
exactly O(3)-equivariant by default (every output, any ``(o3_lambda, o3_sigma)``:
PET with invariant edge inputs and scalar-basis tensor heads; or ECSE frames, or the
SOAP backbone). This is symatomic's own architecture seen through
metatrain's interfaces: after :func:`symatomic.mtt.register`, metatrain knows it as
``experimental.symatomic``. The hyper-parameters are those of the ``architecture``
section of ``symatomic train`` (see symatomic's options documentation); the same
options file works with both tools.

Cartesian targets are learned as their spherical blocks and returned as Cartesian
tensors (metatrain's layout); rank-2 and rank-3 tensors keep every block, since
metatrain describes targets without data.
"""

from typing import Literal, Optional, Union

from typing_extensions import TypedDict

from ..ecse import ECSE_DEFAULTS
from ..long_range import LONG_RANGE_DEFAULTS
from ..model import SOAP_DEFAULT_HYPERS
from ..options import TRAINING_DEFAULT_HYPERS
from ..pet import PET_DEFAULT_HYPERS

__all__ = [
    "ECSEHypers",
    "FinetuneHypers",
    "ModelHypers",
    "SOAPHypers",
    "TrainerHypers",
]


class ECSEHypers(TypedDict):
    """Exact O(3) symmetrization of PET by an ensemble of local frames (ECSE)."""

    mode: Literal["auto", "none", "local"] = "auto"
    """``none``: no frames (with ``edge_inputs: cartesian``, plain PET, only
    approximately equivariant, trained with random O(3) augmentation);
    ``local``: frames per atom inside PET (Cartesian edge inputs), exactly
    O(3)-equivariant and local; ``auto``: ``none`` with invariant edge inputs
    (the default), ``local`` with ``frame_layers: 1`` for ``edge_inputs:
    cartesian``, ``none`` for SOAP."""
    inversion: bool = True
    """Also average over mirror images of the frames: O(3) rather than SO(3)."""
    frame_layers: Optional[int] = None
    """How many attention layers (counted through all GNN layers) run in every
    frame; ``None``: all of them. Fewer is cheaper and still exact."""
    beta: float = ECSE_DEFAULTS["beta"]
    """Sharpness of the smooth minimum giving the adaptive inner cutoff
    (1/length)."""
    beta_weights: float = ECSE_DEFAULTS["beta_weights"]
    """Sharpness of the smooth maximum of the frame weights."""
    delta_r: float = ECSE_DEFAULTS["delta_r"]
    """Width of the radial switching functions, added to the inner cutoff
    (length)."""
    w: float = ECSE_DEFAULTS["w"]
    """Threshold of ``|r_j x r_k|^2`` (unit vectors) below which a pair of
    neighbors counts as collinear."""
    delta_w: float = ECSE_DEFAULTS["delta_w"]
    """Width of that threshold (``0 < delta_w <= w``)."""
    max_outer_cutoff: float = ECSE_DEFAULTS["max_outer_cutoff"]
    """Upper bound of the outer cutoff of the frames, which is
    ``min(cutoff, max_outer_cutoff)`` (length)."""
    pruning_iterations: int = ECSE_DEFAULTS["pruning_iterations"]
    """How many times frames with small weights are pruned."""
    pruning_start: float = ECSE_DEFAULTS["pruning_start"]
    """Frames with weights below this fraction of the largest are switched off
    smoothly."""
    collinear_penalty: Optional[float] = ECSE_DEFAULTS["collinear_penalty"]
    """Added to the value of a near-collinear pair of neighbors in the smooth
    minimum giving the inner cutoff (length); bounded, so the inner cutoff moves
    smoothly as a short pair turns collinear. ``None``: such pairs are pushed out
    to the outer cutoff (steeper; the construction of checkpoints before version
    4)."""


class SOAPHypers(TypedDict):
    """The exactly invariant SOAP backbone (power spectrum and MLP)."""

    max_radial: int = SOAP_DEFAULT_HYPERS["max_radial"]
    """Largest radial index n (Laplacian eigenstates)."""
    max_angular: int = SOAP_DEFAULT_HYPERS["max_angular"]
    """Largest angular order l of the density expansion."""
    n_pseudo_species: int = SOAP_DEFAULT_HYPERS["n_pseudo_species"]
    """Learned species channels of the density."""
    d_hidden: int = SOAP_DEFAULT_HYPERS["d_hidden"]
    """Width of the MLP's hidden layers."""
    n_hidden_layers: int = SOAP_DEFAULT_HYPERS["n_hidden_layers"]
    """Number of hidden layers of the MLP."""
    d_out: int = SOAP_DEFAULT_HYPERS["d_out"]
    """Width of the atom features."""
    d_pair: int = SOAP_DEFAULT_HYPERS["d_pair"]
    """Width of the pair features."""


class LongRangeHypers(TypedDict):
    """Long-range electrostatics (torch-pme): learned charges, their Coulomb
    potential beyond the cutoff, added to the atom features."""

    enable: bool = LONG_RANGE_DEFAULTS["enable"]
    """Toggle the long-range part (the model is then non-local)."""
    use_ewald: Union[bool, Literal["auto"]] = LONG_RANGE_DEFAULTS["use_ewald"]
    """Ewald summation (in training and inference); ``False``: P3M; ``auto``:
    Ewald for structures of fewer than 128 atoms, P3M for the others."""
    smearing: float = LONG_RANGE_DEFAULTS["smearing"]
    """Gaussian smearing separating the short- and long-range parts (length)."""
    kspace_resolution: float = LONG_RANGE_DEFAULTS["kspace_resolution"]
    """Shortest wavelength of Ewald / mesh spacing of P3M (length)."""
    interpolation_nodes: int = LONG_RANGE_DEFAULTS["interpolation_nodes"]
    """Interpolation order of P3M (3 to 7)."""
    num_charges: int = LONG_RANGE_DEFAULTS["num_charges"]
    """Learned charge channels per atom."""


class ModelHypers(TypedDict):
    """Hyper-parameters of the symatomic PET model."""

    cutoff: float = PET_DEFAULT_HYPERS["cutoff"]
    """Cutoff radius of the neighbor list (length unit of the data)."""
    cutoff_width: float = PET_DEFAULT_HYPERS["cutoff_width"]
    """Width of the smooth switching function below the cutoff."""
    d_pet: int = PET_DEFAULT_HYPERS["d_pet"]
    """Width of the edge tokens (must be divisible by ``num_heads``)."""
    d_head: int = PET_DEFAULT_HYPERS["d_head"]
    """Width of the hidden layers of the output heads."""
    d_node: int = PET_DEFAULT_HYPERS["d_node"]
    """Width of the node features read by the heads."""
    d_feedforward: int = PET_DEFAULT_HYPERS["d_feedforward"]
    """Width of the feed-forward layers of the transformer."""
    num_heads: int = PET_DEFAULT_HYPERS["num_heads"]
    """Attention heads per attention layer."""
    num_attention_layers: int = PET_DEFAULT_HYPERS["num_attention_layers"]
    """Attention layers in every GNN layer."""
    num_gnn_layers: int = PET_DEFAULT_HYPERS["num_gnn_layers"]
    """Message-passing (GNN) layers; the interaction range is
    ``num_gnn_layers * cutoff`` (one cutoff more with ``reverse_last_layer``)."""
    normalization: Literal["RMSNorm", "LayerNorm"] = PET_DEFAULT_HYPERS["normalization"]
    """Normalization of the (pre-layer-norm) transformer."""
    activation: Literal["SwiGLU", "SiLU"] = PET_DEFAULT_HYPERS["activation"]
    """Activation of the feed-forward layers."""
    edge_inputs: Literal["auto", "invariant", "cartesian"] = "auto"
    """What PET's edge tokens see: ``invariant``: the distance and the projections
    of the neighbor density on the pair direction (PET is then exactly
    O(3)-invariant, without frames, at the cost of plain PET); ``cartesian``:
    PET's original pair vectors (exact only with ``ecse: {mode: local}``);
    ``auto``: ``invariant`` unless an ``ecse`` mode is given."""
    density_max_angular: int = PET_DEFAULT_HYPERS["density_max_angular"]
    """Largest angular order l of the density projections
    (``edge_inputs: invariant``)."""
    density_max_radial: int = PET_DEFAULT_HYPERS["density_max_radial"]
    """``density_max_radial + 1`` radial functions of the density projections."""
    density_channels: int = PET_DEFAULT_HYPERS["density_channels"]
    """Learned channels of the messages that weight the density."""
    density_features: int = PET_DEFAULT_HYPERS["density_features"]
    """Density projections per angular order (per pair and GNN layer)."""
    reverse_last_layer: bool = PET_DEFAULT_HYPERS["reverse_last_layer"]
    """Combine the last layer's edge tokens with their reverses before the heads,
    as every other layer does: one cutoff more of interaction range (models written
    before this option existed did; their checkpoints keep it)."""
    ecse: ECSEHypers = {
        "mode": "auto",
        "inversion": True,
        "frame_layers": None,
        **ECSE_DEFAULTS,
    }
    """Exact O(3) symmetrization (ECSE); ``{mode: local}`` makes every output
    exactly O(3)-equivariant."""
    backbone: Literal["auto", "pet", "soap"] = "auto"
    """``pet``: the Point Edge Transformer; ``soap``: an exactly invariant SOAP
    power spectrum with an MLP (its tensor outputs use ``tensor_heads: basis``;
    the model is then exactly O(3)-equivariant without ECSE); ``auto``:
    ``pet`` here (``symatomic train``, which sees the data first, takes ``soap``
    for fewer than 200 training structures without energies)."""
    tensor_heads: Optional[Literal["direct", "basis"]] = None
    """How tensor (non-invariant) outputs are predicted: ``direct`` (components
    from the backbone's heads), ``basis`` (invariant coefficients times a basis
    of (λ, σ) tensors built from the environment); ``None``: ``basis``."""
    basis_hidden: int = 0
    """Hidden size of the MLPs giving the weights of the learned vectors and
    densities from the pair features (0: linear maps)."""
    soap: SOAPHypers = dict(SOAP_DEFAULT_HYPERS)
    """Options of the SOAP backbone."""
    long_range: LongRangeHypers = dict(LONG_RANGE_DEFAULTS)
    """Long-range electrostatics (needs torch-pme)."""


class FinetuneHypers(TypedDict):
    """Fine-tuning: start from the weights of a checkpoint."""

    read_from: Optional[str] = None
    """Checkpoint to start from (with ``mtt train``, a checkpoint of this
    architecture written by metatrain; with ``symatomic train``, a symatomic
    checkpoint); ``None``: no fine-tuning."""


class TrainerHypers(TypedDict):
    """Hyper-parameters of symatomic's trainer (AdamW, warm-up and cosine decay)."""

    num_epochs: Optional[int] = TRAINING_DEFAULT_HYPERS["num_epochs"]
    """Number of epochs; 0 only fits the baselines and scales; ``None``: 100, or
    as many as fit in ``time_limit``, which makes this number a cap."""
    time_limit: Optional[Union[str, float]] = TRAINING_DEFAULT_HYPERS["time_limit"]
    """Wall-clock limit of the whole run (``"10m"``, ``"1.5h"``, ``"90s"`` or
    seconds): the epochs and the learning-rate schedule are planned to end within
    it, calibration included; ``None``: no limit."""
    batch_size: int = TRAINING_DEFAULT_HYPERS["batch_size"]
    """Structures per optimizer step."""
    learning_rate: float = TRAINING_DEFAULT_HYPERS["learning_rate"]
    """Peak learning rate of AdamW."""
    weight_decay: float = TRAINING_DEFAULT_HYPERS["weight_decay"]
    """AdamW's weight decay."""
    warmup_fraction: float = TRAINING_DEFAULT_HYPERS["warmup_fraction"]
    """Fraction of all optimizer steps spent in linear warm-up, in [0, 1)."""
    scheduler: Literal["cosine", "constant"] = TRAINING_DEFAULT_HYPERS["scheduler"]
    """Learning-rate schedule after the warm-up."""
    min_learning_rate_ratio: float = TRAINING_DEFAULT_HYPERS["min_learning_rate_ratio"]
    """Final learning rate of the cosine schedule, relative to ``learning_rate``."""
    grad_clip_norm: float = TRAINING_DEFAULT_HYPERS["grad_clip_norm"]
    """Clips the total gradient norm to this value; 0 disables clipping."""
    augmentation: Union[bool, Literal["auto"]] = TRAINING_DEFAULT_HYPERS["augmentation"]
    """Random O(3) operation for every training structure at every step;
    ``auto``: on without ECSE, off with it."""
    loss_weights: dict[str, float] = {}
    """Target name to weight of its loss term (default 1)."""
    forces_weight: float = TRAINING_DEFAULT_HYPERS["forces_weight"]
    """Weight of the force term of every energy trained with forces."""
    stress_weight: float = TRAINING_DEFAULT_HYPERS["stress_weight"]
    """Weight of the stress (or virial) term."""
    checkpoint_interval: int = TRAINING_DEFAULT_HYPERS["checkpoint_interval"]
    """Writes a checkpoint every this many epochs."""
    log_interval: int = TRAINING_DEFAULT_HYPERS["log_interval"]
    """Logs a line every this many epochs."""
    validation_interval: int = TRAINING_DEFAULT_HYPERS["validation_interval"]
    """Evaluates the validation set every this many epochs; only these epochs
    can become the best epoch (lowest validation loss)."""
    uncertainty: bool = TRAINING_DEFAULT_HYPERS["uncertainty"]
    """Fit the calibrated last-layer uncertainties after training (symatomic's
    docs, uncertainty.rst); models exported through metatrain do not declare them
    yet (metatrain's ``llpr`` architecture wraps them instead)."""
    num_ensemble_members: int = TRAINING_DEFAULT_HYPERS["num_ensemble_members"]
    """Members of the last-layer ensembles; 0: none."""
    finetune: FinetuneHypers = {"read_from": None}
    """Fine-tuning from a checkpoint (full fine-tuning only)."""
    loss: Union[str, dict[str, Union[str, dict]]] = "mse"
    """metatrain's loss section. Only ``mse`` with ``reduction: mean`` is
    supported: the weights of a target and of its gradients multiply
    ``loss_weights``, ``forces_weight`` and ``stress_weight``."""
