"""Training within a time limit: durations, the planner on a fake clock, the probes of
``backbone: auto`` (deterministic for a seed), and resume."""

import logging
import math

import pytest
import torch

from conftest import tiny_options
from symatomic.cli import main
from symatomic.model_options import SMALL_PET_SIZES
from symatomic.options import check_options, check_training_hypers
from symatomic.train import Trainer, load_checkpoint
from symatomic.train.budget import (
    EpochPlanner,
    Schedule,
    TimeBudget,
    epoch_cap,
    parse_duration,
)
from symatomic.train.probes import ProbeResult, choose

TARGETS = {
    "energy": {"key": "energy", "unit": "eV"},
    "mtt::dipole": {
        "key": "dipole",
        "type": {"cartesian": {"rank": 1}},
        "unit": "e*Angstrom",
    },
}


class FakeClock:
    """A clock that advances ``tick`` seconds every time it is read: the trainer's
    timings then depend on what it does, not on the machine."""

    def __init__(self, tick: float = 1.0):
        self.now = 1000.0
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_parse_duration():
    assert parse_duration("90s") == 90.0
    assert parse_duration("10m") == 600.0
    assert parse_duration("10min") == 600.0
    assert parse_duration("1.5h") == 5400.0
    assert parse_duration("1h30m") == 5400.0
    assert parse_duration("1h 30m") == 5400.0
    assert parse_duration(45) == 45.0
    assert parse_duration("45") == 45.0
    assert parse_duration(None) is None and parse_duration("none") is None
    for bad in ("ten minutes", "10 parsecs", "m10", "-5m", 0, -1, True, [1]):
        with pytest.raises(ValueError, match="--time-limit"):
            parse_duration(bad, "--time-limit")
    assert check_training_hypers({"time_limit": "5m"})["time_limit"] == "5m"
    with pytest.raises(ValueError, match="architecture.training.time_limit"):
        check_training_hypers({"time_limit": "soon"})
    assert epoch_cap(None, False) == 100 and epoch_cap(7, True) == 7
    assert epoch_cap(None, True) > 10**6


def test_plan_epochs_fits_the_limit():
    clock = FakeClock(tick=0.0)
    budget = TimeBudget(100.0, clock)
    clock.now += 20.0  # 80 s left
    # 3 % kept free, 10 s for the end: (77.6 - 10) // 6 = 11 more epochs
    assert budget.plan_epochs(2, 1000, 6.0, 10.0) == 13
    assert budget.plan_epochs(2, 5, 6.0, 10.0) == 5  # the cap
    # nothing fits: at least the minimum, never fewer than done
    assert budget.plan_epochs(0, 1000, 500.0, 10.0) == 1
    assert budget.plan_epochs(4, 1000, 500.0, 10.0, minimum=1) == 4
    unlimited = TimeBudget(None, clock)
    assert unlimited.plan_epochs(0, 42, 1e9, 1e9) == 42
    assert math.isinf(unlimited.left())


def _planner(limit: float, n_evaluated_at_end: float, n_validation: int):
    """A planner of a fresh run (epochs of 10 steps of 8 structures, no cap) on a
    clock that moves only when told: ``(clock, budget, schedule, planner)``."""
    clock = FakeClock(tick=0.0)
    budget = TimeBudget(limit, clock)
    schedule = Schedule(steps_per_epoch=10, epochs=10**9)
    planner = EpochPlanner(
        budget,
        schedule,
        cap=10**9,
        start_epoch=0,
        n_evaluated_at_end=n_evaluated_at_end,
        n_validation=n_validation,
        batch_size=8,
    )
    return clock, budget, schedule, planner


def test_planner_replans_from_measured_times():
    clock, budget, schedule, planner = _planner(300.0, 40, 20)
    # the first plan is made after the first step, which warms up (slow); the
    # next ones leave it out of the estimate
    durations = [5.0, 1.0, 1.0]
    changed = []
    for seconds in durations:
        clock.now += seconds
        changed.append(planner.after_step(seconds))
    assert changed[:2] == [True, True]
    # an epoch: 10 steps of 1 s plus 20 validation structures at share/8 s each;
    # the end: 40 structures + export; 293 s left
    share = EpochPlanner.EVALUATION_SHARE
    validation = 20 * share / 8
    epoch = 10.0 + validation
    finish = 40 * share / 8 + TimeBudget.EXPORT_SECONDS
    available = 293.0 * (1 - TimeBudget.SAFETY) - finish
    whole = int(available // epoch)
    # what is left after the whole epochs (3 steps of the first are done) holds
    # some steps of one more, and its validation
    extra = min(int((available - whole * epoch + 3 * 1.0 - validation) // 1.0), 9)
    assert extra >= 1
    assert schedule.epochs == whole + 1
    assert schedule.total_steps == whole * 10 + extra
    # measured epochs longer than planned: the plan shrinks
    for _ in range(7):  # the rest of the epoch
        planner.after_step(1.0)
    planner.validated(4.0)
    clock.now += 150.0
    planner.after_epoch(1, 150.0)
    left = budget.left() * (1 - TimeBudget.SAFETY) - planner.finish_seconds()
    assert left < 150.0  # no whole epoch more: a shorter one (steps of 14.6 s)
    assert schedule.epochs == 2
    assert schedule.total_steps == 10 + int((left - 4.0) // 14.6)


def test_planner_ends_an_epoch_that_does_not_fit():
    """Steps so long that not even the one epoch a run must have fits: the
    schedule is capped in steps, the epoch (and the run) ends early."""
    clock, _, schedule, planner = _planner(100.0, 0, 0)
    for seconds in (20.0, 15.0, 15.0):
        clock.now += seconds
        planner.after_step(seconds)
    # 50 s left, 3 % kept free and 8 s for the export: 40.5 s, two more steps
    assert schedule.epochs == 1
    assert schedule.max_steps == 5 and schedule.total_steps == 5
    # steps that get faster lift the cap again
    for _ in range(2):
        clock.now += 0.1
        planner.after_step(0.1)
    assert schedule.max_steps is None and schedule.total_steps >= 10


def test_a_limit_shorter_than_an_epoch_ends_within_the_epoch(
    synthetic_file, tmp_path, monkeypatch
):
    """Optimizer steps of 1 s (on a fake clock) and an 8 s limit: the run stops
    within its first epoch."""
    clock = FakeClock(tick=0.001)
    step = Trainer._train_step

    def slow_step(self, *args, **kwargs):
        clock.now += 1.0
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_step", slow_step)
    options = _timed_options(
        synthetic_file, time_limit="8s", batch_size=2, uncertainty=False
    )
    trainer = Trainer(options, str(tmp_path / "run"), progress=False, clock=clock)
    result = trainer.run()
    steps_per_epoch = math.ceil(len(trainer.data.train) / 2)
    assert len(result.history) == 1
    assert 1 <= trainer.schedule.total_steps < steps_per_epoch
    assert trainer.budget.elapsed() <= 8.0
    assert math.isfinite(result.history[0]["loss"])


def _timed_options(path, **training):
    training.setdefault("num_epochs", None)
    return check_options(tiny_options(path, TARGETS, **training))


def test_time_limited_run_ends_within_the_limit(synthetic_file, tmp_path):
    clock = FakeClock(tick=0.05)
    options = _timed_options(synthetic_file, time_limit="60s", uncertainty=False)
    trainer = Trainer(options, str(tmp_path / "run"), progress=False, clock=clock)
    result = trainer.run()
    budget = trainer.budget
    assert budget.elapsed() <= 60.0
    epochs = len(result.history)
    assert epochs >= 2
    # the schedule was planned for the epochs that ran: it ends at its minimum
    planned = [record["planned_epochs"] for record in result.history]
    assert planned[-1] == epochs
    last_rate = result.history[-1]["learning_rate"]
    minimum = options["architecture"]["training"]["min_learning_rate_ratio"]
    assert last_rate == pytest.approx(
        minimum * options["architecture"]["training"]["learning_rate"], rel=0.2
    )
    for activity in ("setup", "training", "validation", "export"):
        assert activity in budget.spent
    # the same fake clock gives the same plan
    again = Trainer(
        options, str(tmp_path / "again"), progress=False, clock=FakeClock(tick=0.05)
    ).run()
    assert len(again.history) == epochs
    assert [r["loss"] for r in again.history] == [r["loss"] for r in result.history]


def test_num_epochs_caps_a_time_limit(synthetic_file, tmp_path):
    options = _timed_options(
        synthetic_file, time_limit="1h", num_epochs=2, uncertainty=False
    )
    result = Trainer(
        options, str(tmp_path / "run"), progress=False, clock=FakeClock(0.01)
    ).run()
    assert len(result.history) == 2


def test_time_limited_run_resumes_with_its_budget(synthetic_file, tmp_path):
    options = _timed_options(synthetic_file, time_limit="60s", uncertainty=False)
    first = Trainer(
        options, str(tmp_path / "first"), progress=False, clock=FakeClock(0.05)
    )
    first.run()
    saved = load_checkpoint(str(tmp_path / "first" / "last.ckpt"))
    assert 0 < saved["time_used"] <= 60.0
    assert saved["planned_epochs"] == saved["epoch"] + 1
    # an interrupted run: the checkpoint of an earlier epoch, resumed with the
    # rest of the budget (it finishes the plan, and at least one more epoch)
    saved["epoch"] = 0
    saved["history"] = saved["history"][:1]
    resumed = Trainer(
        options,
        str(tmp_path / "resumed"),
        progress=False,
        clock=FakeClock(0.05),
    )
    result = resumed.run(checkpoint=saved)
    assert len(result.history) >= 2
    assert resumed.budget.used_before == pytest.approx(saved["time_used"])
    assert resumed.budget.elapsed() <= 60.0 + 5.0
    # a finished time-limited run can not be resumed without more time or epochs
    with pytest.raises(ValueError, match="already finished"):
        Trainer(
            options, str(tmp_path / "again"), progress=False, clock=FakeClock(0.05)
        ).run(checkpoint=load_checkpoint(str(tmp_path / "first" / "last.ckpt")))


def test_choose_lowest_compared_loss_first_on_ties():
    """The probes are compared by their validation loss times the candidate's
    handicap (SOAP's: it flattens after its fast start); the first on ties."""
    from symatomic.train.probes import HANDICAPS, compared

    def result(name, metric):
        return ProbeResult(name, 1, 1, 1.0, 1.0, metric)

    assert choose([result("a", 2.0), result("b", 1.0), result("c", 3.0)]).name == "b"
    assert choose([result("a", 1.0), result("b", 1.0)]).name == "a"
    assert choose([result("a", math.nan), result("b", 5.0)]).name == "b"
    with pytest.raises(ValueError):
        choose([])
    handicap = HANDICAPS["soap"]
    assert handicap > 1.0
    assert compared(result("soap", 1.0)) == handicap
    assert not math.isfinite(compared(result("soap", math.inf)))
    # the small PET behind SOAP, but by less than SOAP's handicap, wins
    soap = result("soap", 1.0)
    assert choose([soap, result("pet-small", 0.99 * handicap)]).name == "pet-small"
    assert choose([soap, result("pet-small", 1.01 * handicap)]).name == "soap"
    assert choose([soap, result("pet-small", 2.0), result("pet", 1.5)]).name == "pet"


def _auto_options(path, time_limit="20s"):
    return check_options(
        {
            "seed": 3,
            "base_precision": 64,
            "architecture": {
                "name": "pet",
                "model": {},
                "training": {
                    "batch_size": 8,
                    "learning_rate": 3e-3,
                    "time_limit": time_limit,
                    "uncertainty": False,
                },
            },
            "training_set": {
                "systems": {"read_from": path},
                "targets": TARGETS,
            },
            "validation_set": 0.25,
            "test_set": 0.0,
        }
    )


def _run_auto(path, folder):
    """A ``backbone: auto`` run with a 20 s limit on a fake clock; the trainer."""
    trainer = Trainer(
        _auto_options(path), str(folder), progress=False, clock=FakeClock(0.02)
    )
    trainer.run()
    return trainer


def test_auto_probes_are_deterministic(synthetic_file, tmp_path):
    """backbone: auto with a time limit probes every candidate on the same data;
    with the same seed and the same (fake) clock, the same table and winner; the
    winner goes on from its probe (its steps count in the learning-rate schedule)."""
    tables = []
    for run in ("a", "b"):
        trainer = _run_auto(synthetic_file, tmp_path / run)
        assert [p.name for p in trainer.probes] == ["soap", "pet-small", "pet"]
        winner = choose(trainer.probes)
        assert trainer.model.hypers["backbone"] == (
            "soap" if winner.name == "soap" else "pet"
        )
        assert all(p.steps >= 1 and math.isfinite(p.metric) for p in trainer.probes)
        assert not any(p.skipped for p in trainer.probes)
        saved = load_checkpoint(str(tmp_path / run / "last.ckpt"))
        assert saved["probe_steps"] == winner.steps
        tables.append([(p.name, p.steps, p.metric) for p in trainer.probes])
    assert tables[0] == tables[1]


def test_auto_skips_candidates_whose_steps_do_not_fit(
    synthetic_file, tmp_path, monkeypatch, caplog
):
    """A candidate whose estimated step leaves fewer than MIN_PROBE_STEPS in its
    share is not probed (here: the default PET, made slow); when only one
    candidate fits, it goes on without an evaluation of its probe."""
    from symatomic.train.probes import MIN_PROBE_STEPS

    def estimate(self, model, data, specs):
        large = sum(p.numel() for p in model.parameters()) > 10**6
        return 1.0 if large else 1e-3

    caplog.set_level(logging.INFO, logger="symatomic")
    monkeypatch.setattr(Trainer, "_single_structure_step", estimate)
    trainer = _run_auto(synthetic_file, tmp_path / "run")
    probes = {p.name: p for p in trainer.probes}
    assert probes["pet"].steps == 0 and f"fewer than {MIN_PROBE_STEPS}" in (
        probes["pet"].skipped
    )
    assert not math.isfinite(probes["pet"].metric)
    assert choose(trainer.probes).name in ("soap", "pet-small")
    log = caplog.text
    caplog.clear()
    assert "pet skipped" in log and "skipped: a step would take" in log

    def slow_pet(self, model, data, specs):
        small = sum(p.numel() for p in model.parameters()) < 420_000
        return 1e-3 if small else 1.0

    monkeypatch.setattr(Trainer, "_single_structure_step", slow_pet)
    trainer = _run_auto(synthetic_file, tmp_path / "alone")
    probed = [p for p in trainer.probes if not p.skipped]
    assert [p.name for p in probed] == ["soap"] and probed[0].steps >= 1
    assert trainer.model.hypers["backbone"] == "soap"
    assert "the only candidate whose steps fit its share" in caplog.text


def test_auto_stops_probes_far_behind_after_the_first_round(
    synthetic_file, tmp_path, monkeypatch
):
    """The probes run in two rounds: a candidate whose compared loss after the
    first is ELIMINATION_RATIO times the best or more does not get its second, and
    the others share it; the lowest compared loss wins (SOAP's handicapped)."""
    from symatomic.train.probes import ELIMINATION_RATIO, HANDICAPS

    small_pet = 0.5 * HANDICAPS["soap"]

    def score(self, probe, scored):
        parameters = sum(p.numel() for p in probe.model.parameters())
        if parameters > 10**6:  # the default PET, far behind
            return 2 * ELIMINATION_RATIO * small_pet, {}
        return (1.0 if probe.model.hypers["backbone"] == "soap" else small_pet), {}

    monkeypatch.setattr(Trainer, "_score_probe", score)
    trainer = _run_auto(synthetic_file, tmp_path / "run")
    probes = {p.name: p for p in trainer.probes}
    assert "stopped after the first round" in probes["pet"].stopped
    assert not probes["soap"].stopped and not probes["pet-small"].stopped
    # the stopped candidate had one round, the others two, longer by half its
    # second round each
    assert probes["pet"].steps < probes["pet-small"].steps
    assert probes["pet"].seconds < 0.5 * probes["pet-small"].seconds
    # the small PET, 2x behind SOAP, within SOAP's handicap: it wins
    assert choose([probes["soap"], probes["pet-small"]]).name == "pet-small"
    assert trainer.model.hypers["backbone"] == "pet"
    assert trainer.model.hypers["d_pet"] == SMALL_PET_SIZES["d_pet"]


def test_cli_time_limit(synthetic_file, tmp_path, capsys):
    import yaml

    options = tiny_options(synthetic_file, TARGETS, epochs=3)
    options["architecture"]["training"]["uncertainty"] = False
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump(options))
    assert (
        main(["train", str(path), "--time-limit", "soon", "-o", str(tmp_path / "x")])
        == 1
    )
    assert "--time-limit" in capsys.readouterr().err
    output = tmp_path / "run"
    code = main(
        ["train", str(path), "--time-limit", "10m", "-o", str(output), "--no-progress"]
    )
    assert code == 0
    log = (output / "train.log").read_text()
    assert "time limit 10 min" in log and "of the 600 s limit" in log
    saved = load_checkpoint(str(output / "last.ckpt"))
    assert saved["options"]["architecture"]["training"]["time_limit"] == "10m"
    assert torch.is_tensor(next(iter(saved["model_state_dict"].values())))
