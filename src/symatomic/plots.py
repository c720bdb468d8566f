"""Parity plots: predicted against reference values, one PNG per target.

A target's figure has one panel per block (``o3_lambda``, ``o3_sigma``, and
``atom_type`` where the target has it; one panel for scalars), plus a panel for the
forces (and stress) of energies, each titled with its RMSE. ``symatomic eval`` writes
them next to the predictions, ``symatomic train`` into the run folder for the
validation and test sets.

Drawn with matplotlib's Agg backend (no display, no global ``pyplot`` state). Panels
of more than :data:`MAX_POINTS` values draw a random subset of them (the RMSE is of
all values) so that large sets stay cheap.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .files import atomic_write

__all__ = [
    "MAX_POINTS",
    "ParityData",
    "Panel",
    "block_label",
    "file_safe",
    "parity_figure",
    "write_parity_plot",
]

#: at most this many points are drawn per panel
MAX_POINTS = 20_000


def file_safe(name: str) -> str:
    """A target name usable in a file name (``::`` and ``/`` become ``_``)."""
    return name.replace("::", "_").replace("/", "_")


def block_label(spec, block) -> str:
    """Panel title of a block of a target: the target's name for scalars, else
    ``o3_lambda=L, o3_sigma=S`` (and the atom type).

    :param spec: a :class:`symatomic.data.targets.TargetSpec`
    :param block: one of its :class:`symatomic.data.targets.BlockSpec`
    """
    if spec.is_scalar:
        return spec.name
    label = f"o3_lambda={block.o3_lambda}, o3_sigma={block.o3_sigma}"
    if block.atom_type is not None:
        label += f", atom_type={block.atom_type}"
    return label


@dataclass
class Panel:
    """Values of one panel: reference and predicted values, flattened."""

    label: str
    unit: str = ""
    reference: List[np.ndarray] = field(default_factory=list)
    predicted: List[np.ndarray] = field(default_factory=list)

    def add(self, reference, predicted) -> None:
        reference = _as_array(reference)
        predicted = _as_array(predicted)
        if reference.shape != predicted.shape:
            raise ValueError(
                f"parity panel '{self.label}': reference values have shape "
                f"{reference.shape} but predictions {predicted.shape}"
            )
        self.reference.append(reference.reshape(-1))
        self.predicted.append(predicted.reshape(-1))

    def values(self):
        reference = np.concatenate(self.reference) if self.reference else np.zeros(0)
        predicted = np.concatenate(self.predicted) if self.predicted else np.zeros(0)
        return reference, predicted

    def rmse(self) -> float:
        reference, predicted = self.values()
        if reference.size == 0:
            return math.nan
        return float(np.sqrt(np.mean((predicted - reference) ** 2)))


def _as_array(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().to("cpu").double().numpy()
    return np.asarray(values, dtype=np.float64)


class ParityData:
    """Reference and predicted values gathered per target and panel."""

    def __init__(self) -> None:
        self.targets: Dict[str, Dict[str, Panel]] = {}

    def add(self, target: str, label: str, reference, predicted, unit: str = ""):
        """Add values to the panel ``label`` of ``target`` (created on first use,
        in the order of first use)."""
        panels = self.targets.setdefault(target, {})
        if label not in panels:
            panels[label] = Panel(label, unit)
        panels[label].add(reference, predicted)

    def write(self, pattern: str, subtitle: str = "") -> List[str]:
        """One PNG per target; ``pattern`` holds ``{target}`` (file-safe name).

        :return: the files written
        """
        written = []
        for target, panels in self.targets.items():
            path = pattern.format(target=file_safe(target))
            title = target + (f" ({subtitle})" if subtitle else "")
            write_parity_plot(path, title, list(panels.values()))
            written.append(path)
        return written


def write_parity_plot(
    path: str, title: str, panels: List[Panel], seed: Optional[int] = 0
) -> None:
    """Draw ``panels`` (see :func:`parity_figure`) into the PNG ``path``,
    atomically."""
    figure = parity_figure(title, panels, seed)
    with atomic_write(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)


def parity_figure(title: str, panels: List[Panel], seed: Optional[int] = 0):
    """A matplotlib ``Figure`` with ``panels`` side by side (at most four per row),
    each titled with its label and RMSE.

    :param seed: of the random subset drawn from panels of more than
        :data:`MAX_POINTS` values
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [panel for panel in panels if panel.reference]
    if not panels:
        raise ValueError(f"parity plot '{title}': no values to draw")
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(3.4 * columns, 3.4 * rows + 0.4), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    rng = np.random.default_rng(seed)
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        reference, predicted = panel.values()
        rmse = panel.rmse()
        if reference.size > MAX_POINTS:
            chosen = rng.choice(reference.size, MAX_POINTS, replace=False)
            reference, predicted = reference[chosen], predicted[chosen]
        low = float(min(reference.min(), predicted.min()))
        high = float(max(reference.max(), predicted.max()))
        margin = 0.05 * (high - low) or 0.5 * max(abs(low), 1.0)
        low, high = low - margin, high + margin
        axes.plot([low, high], [low, high], color="0.6", linewidth=0.8, zorder=0)
        axes.scatter(
            reference, predicted, s=6, alpha=0.6, linewidths=0, rasterized=True
        )
        axes.set_xlim(low, high)
        axes.set_ylim(low, high)
        axes.set_aspect("equal")
        unit = f" [{panel.unit}]" if panel.unit else ""
        axes.set_xlabel("reference" + unit)
        axes.set_ylabel("predicted" + unit)
        axes.set_title(
            f"{panel.label}\nRMSE {rmse:.4g}{(' ' + panel.unit) if panel.unit else ''}",
            fontsize=9,
        )
    return figure
