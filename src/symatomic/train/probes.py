"""``backbone: auto`` with a time limit: short probes of the candidates on the user's
own data, and the choice.

Every candidate of :data:`symatomic.model_options.AUTO_CANDIDATES` (the SOAP
backbone, a small PET, the default PET) gets the same share of the time limit
(:data:`PROBE_SHARE` of what is left, split equally). Before its probe, one training
step on a single structure estimates its step on a whole batch; a candidate whose
share holds fewer than :data:`MIN_PROBE_STEPS` such steps is skipped (a large model
on large structures: after one or two steps a probe says nothing, and the full run
would have few steps too). The others are trained from the same seed and on the
same batches, each probe being the start of the run it would have if it won: the
warm-up and cosine schedule are planned for the whole time limit. They are trained
in two rounds of half their share; after each round their validation loss (the
trainer's metric: weighted, normalised squared errors of every target, forces and
stress) is measured on the validation set, and after the first, a candidate whose
loss is :data:`ELIMINATION_RATIO` times the best or more stops, and the survivors
share its second half between them (successive halving: the probes take the same
time in all, and the candidates still in the race are trained longer). The winner
is the candidate with the lowest *compared* loss: its validation loss times its
:data:`HANDICAPS` factor (1 but for SOAP), and the elimination compares the same.
SOAP learns fastest in the probes but flattens first, while the PETs keep
improving: measured at 5 minutes, the small PET ended ahead of SOAP on the bundled
example (forces 1.3x, tensors up to 1.75x), the water monomers (up to 3.3x on four
of five tensor blocks) and dimers, methane and QM7-X (80 structures; α₀ 1.2x), and
level on the example's energies and forces alone and on the QM7-X polarizabilities,
though after its probe its loss was 1.1x to 5x SOAP's: 1.1x, 1.2x, 2.1x and 3.4x
on the example in four runs, 2.1x and 5x on the monomers, 1.5x to 2.1x on the
dimers, 1.1x and 4.4x on QM7-X (it varies from run to run with the steps each
gets). Only where the PETs' steps do not fit (dense liquids at 5 minutes) was SOAP
the best model. The probes then guard against a PET that does not learn at all.
The winner goes on where its probe stopped, with its weights, its optimizer's state
and its place in the learning-rate schedule, so that the time of the winner's probe
is not lost; a candidate that is alone (the others skipped or stopped) wins without more
rounds. Everything random comes from the seed, everything timed from the trainer's
clock: with the same seed and the same timings, the same candidate wins.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

__all__ = [
    "PROBE_SHARE",
    "MAX_PROBE_VALIDATION",
    "MIN_PROBE_STEPS",
    "ELIMINATION_RATIO",
    "HANDICAPS",
    "ProbeResult",
    "choose",
    "compared",
    "table",
]

#: share of the time left (after setting the end aside) that all probes take
PROBE_SHARE = 0.24
#: at most this many validation structures are evaluated after each probe
MAX_PROBE_VALIDATION = 100
#: a candidate whose share holds fewer optimizer steps than this is not probed
MIN_PROBE_STEPS = 8
#: after the first of the two rounds, a candidate whose validation loss is this
#: many times the best or more stops
ELIMINATION_RATIO = 3.0
#: candidate → factor of its validation loss when the probes are compared (the
#: others: 1): SOAP's loss after its probe is up to 5x lower, relative to the
#: PETs', than where it ends (see the module's documentation)
HANDICAPS: Dict[str, float] = {"soap": 8.0}


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
    #: why the candidate was not probed ("" when it was)
    skipped: str = ""
    #: why the candidate's probe stopped after the first round ("" when it did not)
    stopped: str = ""


def compared(result: ProbeResult) -> float:
    """The loss the probes are compared by: the validation loss times the
    candidate's :data:`HANDICAPS` factor (``inf`` when it is not finite)."""
    return _key(result.metric) * HANDICAPS.get(result.name, 1.0)


def choose(results: Sequence[ProbeResult]) -> ProbeResult:
    """The probe with the lowest :func:`compared` loss; the first on ties (the
    order of :data:`~symatomic.model_options.AUTO_CANDIDATES`)."""
    if not results:
        raise ValueError("no probe to choose from")
    best = results[0]
    for result in results[1:]:
        if compared(result) < compared(best):
            best = result
    return best


def _key(metric: float) -> float:
    return metric if math.isfinite(metric) else math.inf


def table(results: Sequence[ProbeResult], columns: List[str]) -> List[str]:
    """Lines of the probe table: candidate, parameters, steps (epochs), seconds,
    validation loss, compared loss and the validation RMSE of ``columns``."""
    header = (
        f"  {'candidate':10s} {'parameters':>10s} {'steps':>6s} {'epochs':>7s} "
        f"{'seconds':>7s} {'val. loss':>10s} {'compared':>10s}"
        + "".join(f" {column[-22:]:>22s}" for column in columns)
    )
    lines = [header]
    for result in results:
        if result.skipped:
            lines.append(
                f"  {result.name:10s} {result.parameters:10d} {'-':>6s} {'-':>7s} "
                f"{result.seconds:7.1f} {'-':>10s} {'-':>10s}  skipped: "
                f"{result.skipped}"
            )
            continue
        cells = "".join(
            f" {result.errors[column]:22.4g}"
            if column in result.errors
            else f" {'':>22s}"
            for column in columns
        )
        lines.append(
            f"  {result.name:10s} {result.parameters:10d} {result.steps:6d} "
            f"{result.epochs:7.2f} {result.seconds:7.1f} "
            + (
                f"{result.metric:10.4g} {compared(result):10.4g}"
                if math.isfinite(result.metric)
                else f"{'-':>10s} {'-':>10s}"
            )
            + cells
            + (f"  {result.stopped}" if result.stopped else "")
        )
    return lines
