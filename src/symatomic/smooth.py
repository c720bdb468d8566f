"""Smooth switching functions shared by PET and ECSE (pure torch, scriptable)."""

import torch

__all__ = ["cutoff_function", "switch_off", "switch_on", "switch_on_linear"]


def switch_off(
    r: torch.Tensor, cutoff: torch.Tensor, width: torch.Tensor
) -> torch.Tensor:
    """C∞ switching function: 1 below ``cutoff - width``, 0 above ``cutoff``.

    ``fc = ½ + ½ tanh(1/(x+1) + 1/(x-1))`` with ``x = 2 (r - cutoff + width/2) /
    width`` in the switching region (the function of the ECSE paper). ``cutoff`` and
    ``width`` broadcast against ``r``; ``width`` must be positive.
    """
    x = 2.0 * (r - cutoff + 0.5 * width) / width
    # keep both branches finite so that gradients through torch.where are finite
    x_inside = x.clamp(-1.0 + 1e-6, 1.0 - 1e-6)
    inside = 0.5 + 0.5 * torch.tanh(1.0 / (x_inside + 1.0) + 1.0 / (x_inside - 1.0))
    ones = torch.ones_like(inside)
    return torch.where(
        x <= -1.0, ones, torch.where(x >= 1.0, torch.zeros_like(inside), inside)
    )


def cutoff_function(r: torch.Tensor, cutoff: float, width: float) -> torch.Tensor:
    """:func:`switch_off` with scalar ``cutoff`` and ``width``.

    :param r: distances, any shape
    :return: tensor like ``r``, values in [0, 1]
    """
    return switch_off(
        r,
        torch.tensor(cutoff, dtype=r.dtype, device=r.device),
        torch.tensor(width, dtype=r.dtype, device=r.device),
    )


def switch_on(
    s: torch.Tensor, start: torch.Tensor, width: torch.Tensor
) -> torch.Tensor:
    """``q(s; start, width) = 1 - fc(s; start + width, width)``: 0 below ``start``,
    1 above ``start + width``."""
    return 1.0 - switch_off(s, start + width, width)


def switch_on_linear(
    s: torch.Tensor, start: torch.Tensor, width: torch.Tensor
) -> torch.Tensor:
    """``q_lin(s) = q(s; start, width) (s - start) / width``: 0 below ``start``, then a
    smooth onset of a linear ramp."""
    return switch_on(s, start, width) * (s - start) / width
