"""Training within a wall-clock limit: parse the limit, keep the clock, plan epochs.

``symatomic train --time-limit 10m`` (or ``architecture.training.time_limit``) makes
``num_epochs`` a cap: the trainer asks :class:`TimeBudget` how many epochs fit in what
is left of the limit once the final work (calibration of the uncertainties, final
evaluation of the validation and test sets, export) is set aside, re-plans after
every epoch with the measured times, and stretches or shrinks its learning-rate
schedule to end with the plan. Every measurement goes through one ``clock``
(``time.monotonic`` by default), so that tests can drive the planner with a fake
clock.
"""

import math
import re
import time
from typing import Any, Callable, Dict, List, Optional

__all__ = [
    "EpochPlanner",
    "Schedule",
    "TimeBudget",
    "epoch_cap",
    "format_duration",
    "parse_duration",
]

#: epochs of a run without a time limit and without ``num_epochs``
DEFAULT_EPOCHS = 100


def epoch_cap(num_epochs: Optional[int], limited: bool) -> int:
    """The largest number of epochs of a run: ``num_epochs``; when it is not given,
    :data:`DEFAULT_EPOCHS` without a time limit, no cap with one."""
    if num_epochs is not None:
        return int(num_epochs)
    return 10**9 if limited else DEFAULT_EPOCHS


_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(d|h|min|m|sec|s)")


def parse_duration(value: Any, where: str = "time_limit") -> Optional[float]:
    """Seconds of a duration: a number (seconds) or a string such as ``"90s"``,
    ``"10m"``, ``"10min"``, ``"1.5h"``, ``"1h30m"``; ``None``, ``"none"`` or
    ``""`` for no limit.

    :raise ValueError: naming ``where`` for anything else, or a limit that is not
        positive
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{where} must be a duration such as '10m', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none", "null"):
            return None
        try:
            seconds = float(text)
        except ValueError:
            compact = text.replace(" ", "")
            parts = _PART.findall(compact)
            if not parts or "".join(n + u for n, u in parts) != compact:
                raise ValueError(
                    f"{where} must be a duration such as '90s', '10m', '1.5h' or "
                    f"'1h30m' (or a number of seconds), got {value!r}"
                ) from None
            seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    else:
        raise ValueError(f"{where} must be a duration such as '10m', got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{where} must be a positive duration, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``1.5 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class TimeBudget:
    """The clock of a time-limited run and its plan.

    :param limit: seconds the whole run may take (``None``: no limit; the budget
        then only keeps the accounts)
    :param clock: seconds from an arbitrary origin (``time.monotonic``)
    :param started: the clock's value when the run started (e.g. when the command
        line was read), by default now
    :param used_before: seconds an earlier part of the same run took (a run
        resumed from a checkpoint continues its budget)
    """

    #: seconds set aside for TorchScript export, the parity plots and the fixed
    #: part of the uncertainty calibration (measured: 1-2 s, 2 s and up to 4 s)
    EXPORT_SECONDS = 8.0
    #: share of the time left kept free for what the estimates miss
    SAFETY = 0.03

    def __init__(
        self,
        limit: Optional[float],
        clock: Callable[[], float] = time.monotonic,
        started: Optional[float] = None,
        used_before: float = 0.0,
    ):
        self.limit = limit
        self.clock = clock
        self.started = clock() if started is None else float(started)
        self.used_before = float(used_before)
        #: seconds per activity ("setup", "probes", "training", "validation", …)
        self.spent: Dict[str, float] = {}
        self._mark = self.clock()

    @property
    def limited(self) -> bool:
        return self.limit is not None

    def elapsed(self) -> float:
        """Seconds of the run so far (earlier parts included)."""
        return self.used_before + self.clock() - self.started

    def left(self) -> float:
        """Seconds left before the limit (infinite without one)."""
        if self.limit is None:
            return math.inf
        return self.limit - self.elapsed()

    def charge(self, activity: str) -> float:
        """Book the time since the previous :meth:`charge` to ``activity``; returns
        those seconds."""
        now = self.clock()
        seconds = now - self._mark
        self._mark = now
        self.spent[activity] = self.spent.get(activity, 0.0) + seconds
        return seconds

    def finish_seconds(
        self,
        evaluation_per_structure: float,
        n_structures_to_evaluate: float,
    ) -> float:
        """Seconds to set aside for the work after the last epoch: evaluating
        ``n_structures_to_evaluate`` structures (final validation and test errors,
        uncertainty calibration) and the export."""
        return evaluation_per_structure * n_structures_to_evaluate + self.EXPORT_SECONDS

    def plan_epochs(
        self,
        epochs_done: int,
        cap: int,
        epoch_seconds: float,
        finish_seconds: float,
        minimum: int = 1,
    ) -> int:
        """How many epochs the run should have in all.

        :param epochs_done: epochs already finished
        :param cap: largest number of epochs (``num_epochs``)
        :param epoch_seconds: estimated seconds of one more epoch (training steps,
            validation, checkpoints)
        :param finish_seconds: seconds set aside for the end
            (:meth:`finish_seconds`)
        :param minimum: the run has at least this many epochs, even if they do not
            fit (one epoch, so that a model exists)
        :return: ``epochs_done ≤ result ≤ cap``, and ``≥ minimum`` when ``cap`` allows
        """
        if self.limit is None:
            return cap
        available = self.left() * (1.0 - self.SAFETY) - finish_seconds
        more = 0
        if epoch_seconds > 0 and available > 0:
            more = int(available // epoch_seconds)
        total = epochs_done + more
        total = max(total, min(minimum, cap), epochs_done)
        return min(total, cap)

    def summary(self) -> str:
        """``setup 3 s, training 250 s (…), …; 290 s of 300 s``."""
        parts = [f"{name} {seconds:.0f} s" for name, seconds in self.spent.items()]
        total = self.elapsed()
        if self.limit is not None:
            return ", ".join(parts) + f"; {total:.0f} s of the {self.limit:.0f} s limit"
        return ", ".join(parts) + f"; {total:.0f} s in all"


class Schedule:
    """The length of the learning-rate schedule, which a time limit re-plans.

    :param steps_per_epoch: optimizer steps per epoch
    :param epochs: planned number of epochs
    """

    def __init__(self, steps_per_epoch: int, epochs: int):
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(epochs)
        #: the step at which the run ends within its last epoch (a time limit
        #: that leaves part of an epoch); ``None``: at the end of an epoch
        self.max_steps: Optional[int] = None

    @property
    def total_steps(self) -> int:
        steps = self.steps_per_epoch * self.epochs
        if self.max_steps is not None:
            return min(steps, self.max_steps)
        return steps


class EpochPlanner:
    """Re-plans a :class:`Schedule` from measured times so that a time-limited run
    ends within its limit.

    The first plan is made after :attr:`PLAN_AFTER_STEPS` optimizer step, so that
    the warm-up and the cosine decay have their planned lengths almost from the
    start, and renewed after every step of the first epoch (the first step, which
    warms up, left out of the estimate once there are others); after that, after
    every epoch, from the median duration of the recent epochs (training,
    validation and checkpoints). The time left after the whole epochs that fit
    goes to a shorter last epoch (:attr:`Schedule.max_steps`), and when not even
    the one epoch a run must have fits (a large model on large structures), that
    epoch ends early. The work after the last epoch (evaluation of
    ``n_evaluated_at_end`` structures, export) is set aside from validation
    timings (before the first validation: :attr:`EVALUATION_SHARE` of the
    training time per structure).

    :param budget: the run's :class:`TimeBudget`
    :param schedule: the schedule to re-plan (in place)
    :param cap: largest number of epochs
    :param start_epoch: epochs done before this process started
    :param n_evaluated_at_end: structures evaluated after the last epoch (in units
        of a validation structure)
    :param n_validation: structures of the validation set (evaluated every epoch)
    :param batch_size: structures per optimizer step
    :param broadcast: makes every rank use the main rank's plan
    """

    PLAN_AFTER_STEPS = 1
    #: before the first validation, the seconds of evaluating a structure (errors
    #: with forces, no parameter gradients) as a share of its training step's
    #: (measured 0.16 for the default PET on liquid methanol)
    EVALUATION_SHARE = 0.25

    def __init__(
        self,
        budget: TimeBudget,
        schedule: Schedule,
        cap: int,
        start_epoch: int,
        n_evaluated_at_end: float,
        n_validation: int,
        batch_size: int,
        broadcast: Callable[[int], int] = lambda value: value,
    ):
        self.budget = budget
        self.schedule = schedule
        self.cap = cap
        self.start_epoch = start_epoch
        # a fresh run has at least one epoch, a resumed one at least one more
        self.minimum = start_epoch + 1
        self.n_evaluated_at_end = n_evaluated_at_end
        self.n_validation = n_validation
        self.batch_size = max(1, batch_size)
        self.broadcast = broadcast
        self.step_seconds: List[float] = []
        self.steps_this_epoch = 0
        self.epoch_seconds: List[float] = []
        self.validation_seconds: Optional[float] = None

    def evaluation_per_structure(self) -> float:
        """Seconds to evaluate one structure (errors with forces)."""
        if self.validation_seconds is not None and self.n_validation > 0:
            return self.validation_seconds / self.n_validation
        if self.step_seconds:
            return self.EVALUATION_SHARE * self._step_estimate() / self.batch_size
        return 0.0

    def _step_estimate(self) -> float:
        steps = (
            self.step_seconds[1:] if len(self.step_seconds) > 1 else self.step_seconds
        )
        return median(steps)

    def after_step(self, seconds: float) -> bool:
        """Record a training step; plans after :attr:`PLAN_AFTER_STEPS` steps and
        every step after them in the first epoch. Returns whether the plan
        changed."""
        if not self.budget.limited:
            return False
        self.step_seconds.append(seconds)
        self.steps_this_epoch += 1
        if self.epoch_seconds or len(self.step_seconds) < self.PLAN_AFTER_STEPS:
            return False
        validation = self.evaluation_per_structure() * self.n_validation
        epoch = self.schedule.steps_per_epoch * self._step_estimate() + validation
        return self._replan(self.start_epoch, epoch, len(self.step_seconds))

    def validated(self, seconds: float) -> None:
        """Record the duration of a validation pass."""
        self.validation_seconds = seconds

    def after_epoch(self, epochs_done: int, seconds: float) -> bool:
        """Record the duration of an epoch and re-plan. Returns whether the plan
        changed."""
        steps, self.steps_this_epoch = self.steps_this_epoch, 0
        if not self.budget.limited:
            self.epoch_seconds.append(seconds)
            return False
        if 0 < steps < self.schedule.steps_per_epoch:
            # an epoch cut short by the plan is the last (the learning rate has
            # decayed over the steps it had)
            self.schedule.epochs = epochs_done
            return False
        self.epoch_seconds.append(seconds)
        recent = (
            self.epoch_seconds[1:]
            if len(self.epoch_seconds) > 1
            else self.epoch_seconds
        )
        return self._replan(epochs_done, median(recent[-5:]), 0)

    def finish_seconds(self) -> float:
        """Seconds set aside for the work after the last epoch."""
        return self.budget.finish_seconds(
            self.evaluation_per_structure(), self.n_evaluated_at_end
        )

    def _replan(
        self, epochs_done: int, epoch_seconds: float, steps_into_epoch: int
    ) -> bool:
        """Whole epochs that fit, then what is left as a shorter last epoch
        (:attr:`Schedule.max_steps`)."""
        finish = self.finish_seconds()
        epochs = self.budget.plan_epochs(
            epochs_done, self.cap, epoch_seconds, finish, minimum=self.minimum
        )
        max_steps = self._last_steps(
            epochs_done, epochs, epoch_seconds, steps_into_epoch, finish
        )
        if max_steps is not None:
            epochs = -(-max_steps // self.schedule.steps_per_epoch)
        elif epochs <= epochs_done:
            max_steps = self.schedule.max_steps  # the run is over: as it ran
        epochs = self.broadcast(epochs)
        cap = self.broadcast(-1 if max_steps is None else max_steps)
        max_steps = None if cap < 0 else cap
        changed = (epochs, max_steps) != (self.schedule.epochs, self.schedule.max_steps)
        self.schedule.epochs = epochs
        self.schedule.max_steps = max_steps
        return changed

    def _last_steps(
        self,
        epochs_done: int,
        epochs: int,
        epoch_seconds: float,
        steps_into_epoch: int,
        finish: float,
    ) -> Optional[int]:
        """The step at which the run ends when that is not the end of an epoch:
        the time left after the ``epochs`` planned whole epochs holds some steps
        of one more (and its validation), or not even the one epoch the run must
        have fits. ``None``: the run ends with its last whole epoch."""
        if not self.step_seconds:
            return None
        steps_per_epoch = self.schedule.steps_per_epoch
        validation = self.evaluation_per_structure() * self.n_validation
        # a step, with its share of what else an epoch costs (checkpoints)
        per_step = max(
            self._step_estimate(), (epoch_seconds - validation) / steps_per_epoch
        )
        if per_step <= 0:
            return None
        available = self.budget.left() * (1.0 - self.budget.SAFETY) - finish
        # the current epoch is partly done already
        planned = (epochs - epochs_done) * epoch_seconds - steps_into_epoch * per_step
        left_over = available - planned
        if left_over >= 0:
            if epochs >= self.cap:
                return None
            extra = int((left_over - validation) // per_step)
            if extra < 1:
                return None
            return epochs * steps_per_epoch + min(extra, steps_per_epoch - 1)
        if epochs_done >= self.minimum or epochs - epochs_done > 1:
            return None
        # not even the one epoch the run must have fits: it ends within it
        steps = steps_into_epoch + int(max(available - validation, 0.0) // per_step)
        if steps >= steps_per_epoch:
            return None
        return epochs_done * steps_per_epoch + steps


def median(values: List[float]) -> float:
    """Median of a non-empty list."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return 0.5 * (ordered[middle - 1] + ordered[middle])
