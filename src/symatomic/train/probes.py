"""``backbone: auto`` with a time limit: short probes of the candidates on the user's
own data, and the choice.

Every candidate of :data:`symatomic.model_options.AUTO_CANDIDATES` (the SOAP
backbone, a small PET, the default PET) is trained for the same share of the time
limit (:data:`PROBE_SHARE` of what is left, split equally), with its own short
warm-up and cosine schedule, from the same seed and on the same batches; then its
validation loss (the trainer's metric: weighted, normalised squared errors of every
target, forces and stress) is measured on the validation set. The candidate with the
lowest loss wins (the earlier candidate on ties) and is trained for the rest of the
limit, starting from the weights of its probe. Everything random comes from the
seed, everything timed from the trainer's clock: with the same seed and the same
timings, the same candidate wins.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

__all__ = ["PROBE_SHARE", "MAX_PROBE_VALIDATION", "ProbeResult", "choose", "table"]

#: share of the time left (after setting the end aside) that all probes take
PROBE_SHARE = 0.3
#: at most this many validation structures are evaluated after each probe
MAX_PROBE_VALIDATION = 100


@dataclass
class ProbeResult:
    """What one probe measured."""

    name: str
    parameters: int
    steps: int
    epochs: float
    seconds: float
    #: validation loss (lower is better); ``inf`` when the probe failed
    metric: float
    #: validation RMSE per target (and forces, stress)
    errors: Dict[str, float] = field(default_factory=dict)


def choose(results: Sequence[ProbeResult]) -> ProbeResult:
    """The probe with the lowest finite validation loss; the first on ties (the
    order of :data:`~symatomic.model_options.AUTO_CANDIDATES`)."""
    if not results:
        raise ValueError("no probe to choose from")
    best = results[0]
    for result in results[1:]:
        if _key(result.metric) < _key(best.metric):
            best = result
    return best


def _key(metric: float) -> float:
    return metric if math.isfinite(metric) else math.inf


def table(results: Sequence[ProbeResult], columns: List[str]) -> List[str]:
    """Lines of the probe table: candidate, parameters, steps (epochs), seconds,
    validation loss and the validation RMSE of ``columns``."""
    header = (
        f"  {'candidate':10s} {'parameters':>10s} {'steps':>6s} {'epochs':>7s} "
        f"{'seconds':>7s} {'val. loss':>10s}"
        + "".join(f" {column[-22:]:>22s}" for column in columns)
    )
    lines = [header]
    for result in results:
        cells = "".join(
            f" {result.errors[column]:22.4g}"
            if column in result.errors
            else f" {'':>22s}"
            for column in columns
        )
        lines.append(
            f"  {result.name:10s} {result.parameters:10d} {result.steps:6d} "
            f"{result.epochs:7.2f} {result.seconds:7.1f} {result.metric:10.4g}" + cells
        )
    return lines
