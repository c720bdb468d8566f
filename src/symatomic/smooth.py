"""Smooth switching functions shared by PET and ECSE (pure torch, scriptable)."""

import torch

__all__ = ["cutoff_function"]


def cutoff_function(r: torch.Tensor, cutoff: float, width: float) -> torch.Tensor:
    """C∞ switching function, 1 below ``cutoff - width`` and 0 above ``cutoff``.

    ``fc = ½ + ½ tanh(1/(x+1) + 1/(x-1))`` with ``x = 2 (r - cutoff + width/2) / width``
    in the switching region (the function of the ECSE paper).

    :param r: distances, any shape
    :param cutoff: where the function reaches 0
    :param width: width of the switching region
    :return: tensor like ``r``, values in [0, 1]
    """
    x = 2.0 * (r - cutoff + 0.5 * width) / width
    # keep both branches finite so that gradients through torch.where are finite
    x_inside = x.clamp(-1.0 + 1e-6, 1.0 - 1e-6)
    inside = 0.5 + 0.5 * torch.tanh(1.0 / (x_inside + 1.0) + 1.0 / (x_inside - 1.0))
    ones = torch.ones_like(r)
    return torch.where(
        x <= -1.0, ones, torch.where(x >= 1.0, torch.zeros_like(r), inside)
    )
