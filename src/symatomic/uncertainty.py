"""Calibrated last-layer uncertainties (LLPR) and last-layer ensembles, exactly
symmetric (pure torch, scriptable; fitted by :mod:`symatomic.train.calibration`).

Every target whose read-out is linear in its last layer
(:attr:`symatomic.readout.TargetReadout.has_last_layer`) has, per block, last-layer
features ``Φ``, ``(n_samples, 2λ+1, n_last)``, such that property ``p`` of the block
is ``Φ · w_p`` (times the output scale, plus the baseline). With the covariance
``C = Σ_train Σ_μ Φ_μ Φ_μᵀ`` of the training samples, the predicted variance of a
component is ``α_p² Φ_μᵀ (C + ς I)⁻¹ Φ_μ`` (the last-layer prediction rigidity of
Bigi et al., 2024), ``ς`` and ``α_p`` calibrated on the validation set.

Spherical blocks: ``Φ_μ`` rotates like the block (``Φ → D^λ(R) Φ``), so one
component's variance is not invariant, but their mean over ``μ`` is, and so is the
uncertainty returned here: one number per sample and property,
``u = α_p sqrt(mean_μ Φ_μᵀ Σ Φ_μ)``, the root-mean-square standard deviation of a
component (``sqrt(E|δT|² / (2λ+1))``). Ensemble members perturb the last-layer
weights, ``T^(m) = T + α_p Φ · ξ^(m)`` with ``ξ ~ N(0, Σ)`` drawn once at
calibration: every member is exactly as equivariant as the model.

Round-off: the model stores a factor ``R`` of ``Σ = R Rᵀ`` (``R = U diag((λ +
ς)^(-1/2))`` from the eigendecomposition ``C = U diag(λ) Uᵀ``), and the variance is
the sum of squares ``|Φ_μ R|²``. The quadratic form ``Φᵀ Σ Φ`` with ``Σ`` itself
is a difference of large numbers when the features share a large common component
and ``C`` is ill-conditioned (per-structure energies are sums over atoms; targets
in Hartree leave tiny residuals): in float32 it changed by up to 58 % when a
molecule turned. The sum of squares is positive term by term and carries only the
round-off of the features themselves.
"""

from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = [
    "BlockUncertainty",
    "covariance_factor",
    "derived_output_names",
    "ensemble_name",
    "last_layer_features_name",
    "uncertainty_name",
]


def _base(target: str) -> str:
    return target[len("mtt::") :] if target.startswith("mtt::") else target


def uncertainty_name(target: str) -> str:
    """``energy`` → ``energy_uncertainty`` (metatomic's standard name), any other
    target → ``mtt::aux::<name>_uncertainty`` (metatrain's)."""
    if target == "energy":
        return "energy_uncertainty"
    return "mtt::aux::" + _base(target) + "_uncertainty"


def ensemble_name(target: str) -> str:
    """``energy`` → ``energy_ensemble``, else ``mtt::aux::<name>_ensemble``."""
    if target == "energy":
        return "energy_ensemble"
    return "mtt::aux::" + _base(target) + "_ensemble"


def last_layer_features_name(target: str) -> str:
    """``mtt::aux::<name>_last_layer_features`` (metatrain's name)."""
    return "mtt::aux::" + _base(target) + "_last_layer_features"


def derived_output_names(target: str) -> Tuple[str, str, str]:
    """``(uncertainty, ensemble, last-layer features)`` output names of a target."""
    return (
        uncertainty_name(target),
        ensemble_name(target),
        last_layer_features_name(target),
    )


class BlockUncertainty(torch.nn.Module):
    """The calibrated last-layer covariance of one block of a target.

    Unfitted (all calibration factors zero) until
    :func:`symatomic.train.calibration.fit_uncertainties` fills it; a checkpoint
    written before uncertainties existed loads into an unfitted one, and the saved
    ensemble size is adopted on loading.

    :param n_features: size ``n_last`` of the block's last-layer features
    :param n_properties: number of properties ``P`` of the block
    """

    def __init__(self, n_features: int, n_properties: int):
        super().__init__()
        self.n_features = int(n_features)
        self.n_properties = int(n_properties)
        #: ``R`` with ``R Rᵀ = Σ = (C + ς I)⁻¹``, ``(n_last, n_last)``
        self.register_buffer("covariance_root", torch.zeros(n_features, n_features))
        #: ``α_p``, ``(P,)``, in the target's unit; zero: not fitted
        self.register_buffer("calibration", torch.zeros(n_properties))
        #: ``α_p ξ^(m)``, ``(n_last, n_members, P)``
        self.register_buffer(
            "ensemble_weights", torch.zeros(n_features, 0, n_properties)
        )
        self.register_load_state_dict_pre_hook(_adopt_saved_buffers)

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        """Calibrated uncertainties ``(n_samples, P)`` of last-layer features
        ``phi``, ``(n_samples, 2λ+1, n_last)``: ``α_p sqrt(mean_μ |Φ_μ R|²)`` (``=
        α_p sqrt(mean_μ Φ_μᵀ Σ Φ_μ)``), exactly invariant for equivariant ``Φ``."""
        projected = torch.matmul(phi, self.covariance_root.to(phi.dtype))
        variance = (projected * projected).sum(dim=2).mean(dim=1)
        return torch.sqrt(variance).unsqueeze(1) * self.calibration.to(phi.dtype)

    @torch.jit.export
    def ensemble(self, phi: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """Members ``(n_samples, 2λ+1, n_members, P)``: ``prediction``
        ``(n_samples, 2λ+1, P)`` plus ``Φ · α_p ξ^(m)``."""
        weights = self.ensemble_weights.to(phi.dtype)
        n_members = weights.shape[1]
        delta = torch.matmul(phi, weights.reshape(weights.shape[0], -1))
        delta = delta.reshape(phi.shape[0], phi.shape[1], n_members, -1)
        return prediction.unsqueeze(2) + delta

    @torch.jit.export
    def is_fitted(self) -> bool:
        return bool(torch.all(self.calibration > 0))

    @torch.jit.export
    def n_members(self) -> int:
        return int(self.ensemble_weights.shape[1])


def _adopt_saved_buffers(
    module: torch.nn.Module,
    state_dict: Dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: List[str],
    unexpected_keys: List[str],
    error_msgs: List[str],
) -> None:
    """Load-state hook of :class:`BlockUncertainty`: a missing buffer (checkpoint
    from before uncertainties) keeps its unfitted value; a saved ensemble of
    another size replaces the buffer's shape; a saved ``inverse_covariance``
    (checkpoints before the factor) becomes ``covariance_root``."""
    old = prefix + "inverse_covariance"
    if old in state_dict:
        inverse = state_dict.pop(old)
        state_dict.setdefault(prefix + "covariance_root", covariance_factor(inverse))
    for name in ("covariance_root", "calibration", "ensemble_weights"):
        key = prefix + name
        current: Optional[torch.Tensor] = module._buffers.get(name)
        if current is None:
            continue
        if key not in state_dict:
            state_dict[key] = current.detach().clone()
        elif name == "ensemble_weights" and state_dict[key].shape != current.shape:
            saved = state_dict[key]
            if saved.dim() == 3 and saved.shape[0] == current.shape[0]:
                module._buffers[name] = torch.zeros(
                    saved.shape, dtype=current.dtype, device=current.device
                )


def covariance_factor(inverse_covariance: torch.Tensor) -> torch.Tensor:
    """``R`` with ``R Rᵀ = Σ`` of a symmetric positive semi-definite ``Σ``
    ``(n, n)`` (computed in float64, returned in ``Σ``'s dtype; negative
    eigenvalues of round-off count as zero)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(inverse_covariance.to(torch.float64))
    root = eigenvectors * torch.sqrt(eigenvalues.clamp(min=0.0))
    return root.to(inverse_covariance.dtype)
