"""Training loop: AdamW, warm-up + cosine schedule, validation, checkpoints, resume.

Reproducibility: the shuffling of every epoch and the random rotations of every step
come from generators seeded by ``(seed, epoch, step)``, so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.

Data parallelism: every global batch is split over the ranks of ``torch.distributed``;
losses are normalised by counts summed over ranks and gradients are summed, so the
update equals that of a single process on the whole batch.
"""

import copy
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from metatomic.torch.o3 import random_transformations
from tqdm import tqdm

from ..data.batch import collate, random_o3_augmentation
from ..data.sets import DataSets, load_data_sets
from ..data.structures import Structure
from ..data.targets import TargetSpec
from ..files import atomic_write
from ..model import SymatomicModel
from ..model_options import (
    DENSE_NEIGHBORS,
    auto_candidates,
    backbone_for_data,
    check_model_hypers,
)
from ..plots import ParityData, block_label
from ..statistics import average_neighbors
from .budget import (
    EpochPlanner,
    Schedule,
    TimeBudget,
    epoch_cap,
    format_duration,
    median,
    parse_duration,
)
from .calibration import fit_uncertainties
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistributedContext
from .losses import ErrorAccumulator, error_unit, loss_terms, predict_batch
from .probes import (
    ELIMINATION_RATIO,
    HANDICAPS,
    MAX_PROBE_VALIDATION,
    MIN_PROBE_STEPS,
    PROBE_SHARE,
    ProbeResult,
    choose,
    compared,
    table,
)

__all__ = ["Trainer", "TrainingResult", "evaluate_structures", "export_model"]

LOGGER = logging.getLogger("symatomic")

_MIX = 1_000_003  # to derive independent seeds from (seed, epoch, step)

_BACKBONE_NAMES = {"pet": "PET", "soap": "SOAP"}


@dataclass
class TrainingResult:
    """What a training run produced."""

    output_dir: str
    checkpoint: str
    exported_model: Optional[str]
    best_epoch: int
    validation_errors: Dict[str, float] = field(default_factory=dict)
    test_errors: Dict[str, float] = field(default_factory=dict)
    history: List[Dict[str, float]] = field(default_factory=list)
    #: parity plots of the validation and test sets
    plots: List[str] = field(default_factory=list)


def _dtype(options: Dict[str, Any]) -> torch.dtype:
    return torch.float64 if options["base_precision"] == 64 else torch.float32


def _learning_rate_factor(step: int, total_steps: int, hypers: Dict[str, Any]) -> float:
    warmup = int(hypers["warmup_fraction"] * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if hypers["scheduler"] == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    minimum = hypers["min_learning_rate_ratio"]
    return minimum + (1 - minimum) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _loss_scales(
    model: SymatomicModel, structures: List[Structure], specs: Dict[str, TargetSpec]
) -> Dict[str, Any]:
    """The scales of the residuals in the loss: the output scales of the model
    (for energies with forces, the force scale: forces then dominate, as with the
    usual force-weighted losses), and the root mean square forces and stress."""
    scales: Dict[str, Any] = {
        name: readout.scale.tolist() for name, readout in model.readouts.items()
    }
    scales.update(_gradient_scales(structures, specs))
    return scales


def _gradient_scales(
    structures: List[Structure], specs: Dict[str, TargetSpec]
) -> Dict[str, float]:
    scales: Dict[str, float] = {}
    for name, spec in specs.items():
        if spec.has_forces:
            values = torch.cat([s.forces[name].reshape(-1) for s in structures])
            scales[name + "/forces"] = float(torch.sqrt((values**2).mean())) or 1.0
        if spec.has_stress:
            values = torch.cat([s.stress[name].reshape(-1) for s in structures])
            scales[name + "/stress"] = float(torch.sqrt((values**2).mean())) or 1.0
    return scales


def evaluate_structures(
    model: SymatomicModel,
    structures: List[Structure],
    specs: Dict[str, TargetSpec],
    batch_size: int,
    context: Optional[DistributedContext] = None,
    weights: Optional[Dict[str, float]] = None,
    loss_scales: Optional[Dict[str, Any]] = None,
    parity: Optional[ParityData] = None,
    length_unit: str = "",
) -> Dict[str, float]:
    """Errors of ``model`` on ``structures``.

    :param parity: when given, gathers the predicted and reference values (this
        rank's share) for parity plots
    :param length_unit: for the units of forces and stress in ``parity``
    :return: RMSE per key of :class:`ErrorAccumulator`, MAE under ``mae:<key>``, and,
        when ``weights`` are given, the training loss on these structures under
        ``loss``
    """
    accumulator = ErrorAccumulator(specs)
    parameter = next(model.parameters())
    dtype, device = parameter.dtype, parameter.device
    keys = sorted(weights) if weights is not None else []
    sums = torch.zeros(len(keys), dtype=torch.float64)
    counts = torch.zeros(len(keys), dtype=torch.float64)
    for start in range(0, len(structures), batch_size):
        chunk = list(range(start, min(start + batch_size, len(structures))))
        if context is not None:
            chunk = context.shard(chunk)
        if not chunk:
            continue
        batch = collate([structures[i] for i in chunk], dtype, device)
        predictions = predict_batch(model, batch, specs, with_gradients=True)
        accumulator.update(batch, predictions)
        if parity is not None:
            _gather_parity(parity, batch, predictions, specs, length_unit)
        if weights is not None:
            terms = loss_terms(model, batch, specs, predictions, loss_scales or {})
            for i, key in enumerate(keys):
                if key in terms.sums:
                    sums[i] += float(terms.sums[key].detach())
                    counts[i] += terms.counts[key]
    if context is not None:
        accumulator.reduce(context)
        context.all_reduce_sum(sums)
        context.all_reduce_sum(counts)
    result = accumulator.rmse()
    result.update({"mae:" + k: v for k, v in accumulator.mae().items()})
    if weights is not None:
        result["loss"] = float(
            sum(
                weights[key] * float(sums[i]) / float(counts[i])
                for i, key in enumerate(keys)
                if counts[i] > 0
            )
        )
    return result


def _gather_parity(
    parity: ParityData,
    batch: Any,
    predictions: Any,
    specs: Dict[str, TargetSpec],
    length_unit: str,
) -> None:
    """Add the values of a batch to ``parity``: a panel per block, and forces and
    stress of energies."""
    blocks, forces, stress = predictions
    for name, spec in specs.items():
        for block, prediction, reference in zip(
            spec.blocks, blocks[name], batch.targets[name]
        ):
            parity.add(name, block_label(spec, block), reference, prediction, spec.unit)
        for key, values, references in (
            ("forces", forces, batch.forces),
            ("stress", stress, batch.stress),
        ):
            if name in values and name in references:
                parity.add(
                    name,
                    key,
                    references[name],
                    values[name],
                    error_unit(specs, f"{name}/{key}", length_unit),
                )


class Trainer:
    """Train a :class:`SymatomicModel` as described by a checked options dictionary.

    :param options: options (see :func:`symatomic.options.check_options`)
    :param output_dir: folder for checkpoints, the exported model and the log
    :param restart: checkpoint to resume from (exactly, same options)
    :param progress: show progress bars
    :param parity_plots: write the parity plots of the validation and test sets
        (``parity-<set>-<target>.png``) into ``output_dir`` at the end
    :param time_limit: seconds the whole run may take, calibration and export
        included (replaces ``architecture.training.time_limit``; ``num_epochs``
        is then a cap, see :mod:`symatomic.train.budget`)
    :param clock: the clock of the time limit (``time.monotonic``; tests pass a
        fake one)
    :param started: the clock's value when the run started (by default when
        :meth:`run` is called; the command line passes its own start)
    """

    #: the outcome of the last :meth:`run`
    result: TrainingResult
    #: the targets trained on (those of the data)
    specs: Dict[str, TargetSpec]
    #: ``last.ckpt`` and ``model.ckpt`` are written at most this often (seconds):
    #: writing them after every epoch took 10 % of a 5-minute run on the example
    CHECKPOINT_SECONDS = 20.0

    def __init__(
        self,
        options: Dict[str, Any],
        output_dir: str,
        restart: Optional[str] = None,
        progress: bool = True,
        parity_plots: bool = True,
        time_limit: Optional[float] = None,
        clock: Callable[[], float] = time.monotonic,
        started: Optional[float] = None,
    ):
        self.options = options
        self.parity_plots = parity_plots
        self.output_dir = output_dir
        self.restart = restart
        self.progress = progress
        #: where the run is: "setup", "training" (epochs), "finishing" (final
        #: evaluation and export), "done"
        self.stage = "setup"
        #: the newest checkpoint a run can resume from, and its number of epochs
        self.last_checkpoint: Optional[str] = restart
        self.last_epoch: Optional[int] = None
        self.num_epochs: Optional[int] = None
        self.hypers = options["architecture"]["training"]
        if time_limit is None:
            time_limit = parse_duration(
                self.hypers.get("time_limit"), "architecture.training.time_limit"
            )
        #: seconds the run may take (``None``: no limit)
        self.time_limit = time_limit
        self.clock = clock
        self.started = started
        #: the accounts of the run's time (created by :meth:`run`)
        self.budget = TimeBudget(None, clock)
        #: whether training batches are randomly rotated (set for each model)
        self.augmentation = False
        #: the probes of ``backbone: auto`` with a time limit, if any
        self.probes: List[ProbeResult] = []
        # the probe of the winner: its optimizer and steps, for the run to go on
        self._probe_optimizer: Optional[torch.optim.Optimizer] = None
        self._probe_steps = 0
        # checkpoints of the latest and the best epoch not written yet, and when
        # the last were written (see _save_epoch)
        self._unsaved_last: Optional[Tuple[Dict[str, Any], int]] = None
        self._unsaved_best: Optional[Dict[str, Any]] = None
        self._checkpoint_written: Optional[float] = None
        #: the learning-rate schedule's length (created by :meth:`run`)
        self.schedule = Schedule(1, 0)
        self.dtype = _dtype(options)
        device_type = options.get("device", "cpu")
        if device_type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: 'cuda' was requested but CUDA is not available")
        self.context = DistributedContext(device_type)
        if device_type == "cuda":
            self.device = torch.device("cuda", self.context.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")

    # --------------------------------------------------------------- set-up
    def _log(self, message: str, *args: Any) -> None:
        if self.context.is_main:
            LOGGER.info(message, *args)

    def _setup_model(
        self, data: Optional[DataSets], checkpoint: Optional[Dict]
    ) -> None:
        if checkpoint is not None:
            self.model = SymatomicModel.from_model_data(checkpoint["model_data"])
            self.model.to(dtype=self.dtype, device=self.device)
            self.model.load_state_dict(checkpoint["model_state_dict"])
            return
        assert data is not None
        architecture = self.options["architecture"]
        torch.manual_seed(self.options["seed"])
        model_hypers = check_model_hypers(architecture["model"])
        finetune = self.hypers["finetune"].get("read_from")
        pretrained = load_checkpoint(finetune) if finetune else None
        candidates = auto_candidates(model_hypers)
        if pretrained is None and self.budget.limited and candidates:
            # backbone: auto with a time limit: short probes on the user's data
            self.model = self._probe_backbones(data, candidates)
            self.target_scales = self._fitted_scales
            self._log_target_scales(data)
            return
        if pretrained is not None:
            # fine-tuning keeps the backbone of the pretrained model
            backbone = str(pretrained["model_data"]["hypers"]["backbone"])
        else:
            neighbors = 0.0
            if model_hypers["backbone"] == "auto":
                neighbors = average_neighbors(
                    data.train[:1000],
                    model_hypers["cutoff"],
                    model_hypers["cutoff_width"],
                )
            backbone = backbone_for_data(
                model_hypers, data.targets, len(data.train), neighbors
            )
        if model_hypers["backbone"] == "auto" and pretrained is None:
            self._log(
                "backbone: auto -> %s (%d training structures, %.1f neighbors per "
                "atom%s; docs/heads.rst)",
                backbone,
                len(data.train),
                neighbors,
                ", no energy target"
                if backbone == "soap" and neighbors < DENSE_NEIGHBORS
                else "",
            )
        if model_hypers["backbone"] == "auto":
            model_hypers["backbone"] = backbone
        self.model = SymatomicModel(
            model_hypers, data.atomic_types, data.targets, data.length_unit
        )
        self.model.to(dtype=self.dtype)
        self.target_scales = self.model.fit_output_statistics(data.train)
        # (fine-tuning then loads the heads it takes over)
        self.model.start_heads_small()
        if pretrained is not None:
            self._load_pretrained(finetune, pretrained)
        self.model.to(device=self.device)
        self._log_target_scales(data)

    def _log_target_scales(self, data: DataSets) -> None:
        for name, values in self.target_scales.items():
            self._log(
                "target '%s': residual RMS per atom after the baseline %s %s",
                name,
                np.array2string(np.unique(np.round(values, 6))[:6], precision=4),
                data.targets[name].unit,
            )

    def _probe_backbones(
        self, data: DataSets, candidates: Dict[str, Dict[str, Any]]
    ) -> SymatomicModel:
        """Train every candidate of ``backbone: auto`` that fits for an equal share
        of the time limit, log the table of their validation errors and return the
        winner, trained; its optimizer and steps are kept for the run to go on
        (:mod:`symatomic.train.probes`)."""
        budget = self.budget
        budget.charge("setup")
        specs = dict(data.targets)
        n_end = self._structures_evaluated_at_end(data)
        left = max(budget.left(), 0.0)
        share = PROBE_SHARE * left / len(candidates)
        # what the winner has after the probes, the end of the run included
        after_probes = (1.0 - PROBE_SHARE) * left
        validation = list(data.validation[:MAX_PROBE_VALIDATION])
        scored = validation if validation else list(data.train[:MAX_PROBE_VALIDATION])
        batch_size = self.hypers["batch_size"]
        results: Dict[str, ProbeResult] = {}
        models: Dict[str, SymatomicModel] = {}
        scales: Dict[str, Dict[str, List[float]]] = {}
        estimates: Dict[str, float] = {}
        # a candidate whose steps are too long for its share is not probed
        for name, hypers in candidates.items():
            start = budget.clock()
            torch.manual_seed(self.options["seed"])
            model = SymatomicModel(
                hypers, data.atomic_types, data.targets, data.length_unit
            ).to(dtype=self.dtype)
            scales[name] = model.fit_output_statistics(data.train)
            model.start_heads_small()
            model.to(device=self.device)
            one = self._single_structure_step(model, data, specs)
            estimates[name] = one * min(batch_size, len(data.train))
            models[name] = model
            fits = share / max(estimates[name], 1e-9)
            # every rank takes the main rank's decision (timings differ)
            if self.context.broadcast_int(int(fits < MIN_PROBE_STEPS)):
                results[name] = ProbeResult(
                    name=name,
                    parameters=sum(p.numel() for p in model.parameters()),
                    steps=0,
                    epochs=0.0,
                    seconds=budget.clock() - start,
                    metric=math.inf,
                    skipped=(
                        f"a step would take ~{format_duration(estimates[name])} "
                        f"({one:.2g} s per structure): {fits:.1f} steps in its "
                        f"share, fewer than {MIN_PROBE_STEPS}"
                    ),
                )
            else:
                results[name] = ProbeResult(
                    name, 0, 0, 0.0, budget.clock() - start, math.inf
                )
        probed = [name for name in candidates if not results[name].skipped]
        if not probed:
            # nothing fits: the candidate with the shortest steps goes on alone
            names = list(candidates)
            fastest = min(names, key=lambda name: estimates[name])
            fastest = names[self.context.broadcast_int(names.index(fastest))]
            results[fastest].skipped = ""
            probed = [fastest]
        self._log(
            "backbone: auto with a time limit: probing %s for %s each on %s%s",
            ", ".join(probed),
            format_duration(share),
            f"{len(scored)} validation structures"
            if validation
            else f"{len(scored)} training structures (no validation set)",
            "; "
            + ", ".join(f"{name} skipped" for name in candidates if name not in probed)
            if len(probed) < len(candidates)
            else "",
        )
        # two rounds of half a share each; after the first, a candidate whose
        # validation loss is ELIMINATION_RATIO times the best or more stops
        probes = {
            name: _Probe(self, models[name], data, specs, share + after_probes, n_end)
            for name in probed
        }
        metrics: Dict[str, float] = {}
        errors: Dict[str, Dict[str, float]] = {}
        alive = list(probed)
        round_seconds = 0.5 * share
        for round_ in range(2):
            for name in alive:
                start = budget.clock()
                probes[name].train_for(round_seconds)
                if len(alive) > 1:
                    metrics[name], errors[name] = self._score_probe(
                        probes[name], scored
                    )
                results[name].seconds += budget.clock() - start
            if round_ == 0 and len(alive) > 1:
                for name in alive:
                    results[name].metric = metrics[name]
                best = min(compared(results[name]) for name in alive)
                alive = [
                    name
                    for name in alive
                    if compared(results[name]) < ELIMINATION_RATIO * best
                ] or [alive[0]]
                # the survivors share the second rounds of those that stopped
                extra = 0.5 * share * (len(probed) - len(alive)) / len(alive)
                round_seconds += extra
                for name in alive:
                    probes[name].run_seconds += extra
            if len(alive) == 1:
                break
        for name in probed:
            probe = probes[name]
            results[name] = ProbeResult(
                name=name,
                parameters=sum(p.numel() for p in models[name].parameters()),
                steps=probe.step,
                epochs=probe.epochs,
                seconds=results[name].seconds,
                metric=metrics.get(name, math.inf),
                errors=errors.get(name, {}),
                skipped=results[name].skipped,
                stopped=""
                if name in alive
                else f"stopped after the first round ({ELIMINATION_RATIO}x the "
                "best compared loss or more)",
            )
        budget.charge("probes")
        ordered = [results[name] for name in candidates]
        winner = choose([results[name] for name in alive])
        self._log("probes (validation RMSE in the targets' units):")
        for line in table(ordered, _display_keys(specs)):
            self._log(line)
        self._log(
            "backbone: auto -> %s (%s); it goes on from its probe's weights, "
            "optimizer and learning rate",
            winner.name,
            "lowest validation loss after the probes, SOAP's counted "
            f"{HANDICAPS['soap']:g}x"
            if len(probed) > 1
            else "the only candidate whose steps fit its share",
        )
        self._fitted_scales = scales[winner.name]
        self.probes = ordered
        self._probe_optimizer = probes[winner.name].optimizer
        self._probe_steps = winner.steps
        return models[winner.name]

    def _score_probe(
        self, probe: "_Probe", scored: List[Structure]
    ) -> Tuple[float, Dict[str, float]]:
        """Validation loss (the probe's loss weights and scales) and RMSE per
        target of a probe's model on ``scored``."""
        model = probe.model
        model.eval()
        errors = evaluate_structures(
            model,
            scored,
            probe.specs,
            probe.batch_size,
            self.context,
            probe.weights,
            probe.loss_scales,
        )
        model.train()
        metric = errors.pop("loss", math.inf)
        if not math.isfinite(metric):
            metric = math.inf
        return metric, {k: v for k, v in errors.items() if not k.startswith("mae:")}

    def _single_structure_step(
        self, model: SymatomicModel, data: DataSets, specs: Dict[str, TargetSpec]
    ) -> float:
        """Seconds of a training step on one structure (the largest of the first
        few training structures), measured on the second of two steps that do not
        change the model (learning rate and weight decay zero)."""
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
        weights = self._loss_weights(specs)
        loss_scales = _loss_scales(model, data.train, specs)
        with_gradients = any(s.has_forces or s.has_stress for s in specs.values())
        first = data.train[: min(len(data.train), 8)]
        largest = max(range(len(first)), key=lambda i: len(first[i].types))
        previous = self.augmentation
        self.augmentation = False
        model.train()
        try:
            seconds = 0.0
            for _ in range(2):
                start = self.clock()
                self._train_step(
                    [largest],
                    0,
                    0,
                    optimizer,
                    weights,
                    loss_scales,
                    with_gradients,
                    ErrorAccumulator(specs),
                    model=model,
                )
                seconds = self.clock() - start
        finally:
            self.augmentation = previous
            optimizer.zero_grad(set_to_none=True)
        return seconds

    def _load_pretrained(self, path: str, pretrained: Dict[str, Any]) -> None:
        """Start from the (best) weights of another checkpoint: the backbone must
        have the same hyper-parameters (ECSE settings may differ: fine-tune a PET
        trained without ECSE with ECSE in the loop); heads are taken for targets
        with the same name and blocks, the others start fresh."""
        data = pretrained["model_data"]
        ours = self.model.model_data()
        for key in ("atomic_types", "length_unit"):
            if data[key] != ours[key]:
                raise ValueError(
                    f"finetune: {key} of '{path}' ({data[key]}) differ from this "
                    f"model's ({ours[key]})"
                )
        mine = {k: v for k, v in ours["hypers"].items() if k != "ecse"}
        theirs = {k: v for k, v in data["hypers"].items() if k != "ecse"}
        if mine != theirs:
            differences = sorted(k for k in mine if mine.get(k) != theirs.get(k))
            raise ValueError(
                f"finetune: the model hyper-parameters {differences} differ from "
                f"those of '{path}'"
            )
        state = (
            pretrained.get("best_model_state_dict") or pretrained["model_state_dict"]
        )
        inherited = [
            name
            for name, spec in ours["targets"].items()
            if name in data["targets"]
            and data["targets"][name]["blocks"] == spec["blocks"]
        ]
        selected = {
            key: value
            for key, value in state.items()
            if not key.startswith("readouts.") or key.split(".")[1] in inherited
        }
        self.model.load_state_dict(selected, strict=False)
        fresh = sorted(set(ours["targets"]) - set(inherited))
        self._log(
            "fine-tuning from %s: backbone and heads of %s loaded%s",
            path,
            inherited,
            f"; new heads for {fresh}" if fresh else "",
        )

    def run(
        self,
        data: Optional[DataSets] = None,
        checkpoint: Optional[Dict[str, Any]] = None,
    ) -> TrainingResult:
        """Train (or resume) and return what the run produced.

        :param data: data sets to train on; by default they are read as the options
            describe
        :param checkpoint: the training state to resume from (the keys written by this
            trainer); by default the ``restart`` checkpoint, if any
        """
        used_before = 0.0
        if checkpoint is None and self.restart:
            checkpoint = load_checkpoint(self.restart)
        if checkpoint is not None and self.time_limit is not None:
            # a resumed run continues the budget of the run it resumes
            used_before = float(checkpoint.get("time_used", 0.0))
        self.budget = TimeBudget(
            self.time_limit, self.clock, self.started, used_before=used_before
        )
        if data is None:
            data = self._load_data(checkpoint)
        self.data = data
        self._log(
            "data: %d training, %d validation, %d test structures; atomic types %s",
            len(data.train),
            len(data.validation),
            len(data.test),
            data.atomic_types,
        )
        try:
            self._train(data, checkpoint)
        except KeyboardInterrupt:
            # the best epoch's checkpoint, if it waits to be written, is a
            # snapshot: it is written (the latest epoch's refers to the weights
            # that training has changed since, and is not)
            if self.context.is_main and self._unsaved_best is not None:
                save_checkpoint(
                    self._unsaved_best, os.path.join(self.output_dir, "model.ckpt")
                )
                self._unsaved_best = None
            raise
        return self.result

    def _load_data(self, checkpoint: Optional[Dict[str, Any]]) -> DataSets:
        """Read the data sets of the options (with the targets of ``checkpoint``)."""
        if checkpoint is not None:
            if checkpoint.get("options") is not None:
                self._compare_options(checkpoint["options"])
            specs = {
                name: TargetSpec.from_dict(spec)
                for name, spec in checkpoint["model_data"]["targets"].items()
            }
            data = load_data_sets(
                self.options,
                checkpoint["model_data"]["hypers"]["cutoff"],
                atomic_types=checkpoint["model_data"]["atomic_types"],
                targets=specs,
            )
        else:
            model_hypers = self.options["architecture"]["model"]
            data = load_data_sets(
                self.options,
                model_hypers["cutoff"],
                atomic_types=self.options["architecture"].get("atomic_types"),
            )
        return data

    def _compare_options(self, saved: Dict[str, Any]) -> None:
        """Say how the options of a restart differ from those of its checkpoint:
        a warning for the model (the checkpoint's is kept), a note for the training
        options (the run is then not an exact continuation); a new number of epochs
        only stretches the learning-rate schedule."""
        before = saved.get("architecture", {})
        after = self.options["architecture"]
        model = _differences(
            {k: v for k, v in before.items() if k != "training"},
            {k: v for k, v in after.items() if k != "training"},
        )
        if model and self.context.is_main:
            LOGGER.warning(
                "warning: the architecture options %s differ from those of the "
                "checkpoint; using the checkpoint's model with the new training "
                "options",
                model,
            )
        training = _differences(
            before.get("training", {}), after.get("training", {}), "training"
        )
        epochs = "training.num_epochs"
        if epochs in training:
            training.remove(epochs)
            self._log(
                "num_epochs changed from %s to %s: the learning-rate schedule is "
                "stretched accordingly",
                before.get("training", {}).get("num_epochs"),
                after["training"]["num_epochs"],
            )
        if training:
            self._log(
                "the training options %s differ from those of the checkpoint: the "
                "run continues with the new ones (not an exact continuation)",
                training,
            )

    def _check_exportable(self) -> None:
        """Build the metatomic capabilities of the model (units, outputs) now: an
        option metatomic rejects fails before the first epoch, not at export."""
        try:
            self.model.capabilities()
        except Exception as error:
            message = str(error).splitlines()[0] if str(error) else repr(error)
            raise ValueError(
                f"the model can not be exported with these options: {message}"
            ) from None

    def _train(self, data: DataSets, checkpoint: Optional[Dict[str, Any]]) -> None:
        for name, spec in data.targets.items():
            gradients = [
                g for g in ("forces", "stress") if getattr(spec, g) is not None
            ]
            if spec.virial is not None:
                gradients.append("virial")
            self._log(
                "target '%s' (%s, per %s, unit '%s'): blocks %s%s",
                name,
                spec.kind
                if spec.kind != "cartesian"
                else f"Cartesian rank {spec.rank}",
                spec.sample_kind,
                spec.unit,
                [(b.o3_lambda, b.o3_sigma) for b in spec.blocks],
                f", with {' and '.join(gradients)}" if gradients else "",
            )
        self.specs = dict(data.targets)
        self._setup_model(data, checkpoint)
        model = self.model
        missing = sorted(set(data.targets) - set(model.target_specs))
        if missing:
            raise ValueError(
                f"the data has target(s) {missing} that the model does not predict "
                f"(it predicts {sorted(model.target_specs)})"
            )
        # the targets of the data (the model may predict more; forces and stress
        # are trained where the data has them)
        specs = self.specs = dict(data.targets)
        self._check_exportable()
        self._log(
            "model: %s backbone, %d parameters, cutoff %.2f %s, interaction range "
            "%.2f %s",
            _BACKBONE_NAMES.get(
                str(model.hypers.get("backbone")), str(model.hypers.get("backbone"))
            ),
            sum(p.numel() for p in model.parameters()),
            model.cutoff,
            data.length_unit,
            model.interaction_range,
            data.length_unit,
        )
        if checkpoint is not None:
            loss_scales = checkpoint["loss_scales"]
        else:
            loss_scales = _loss_scales(model, data.train, specs)

        hypers = self.hypers
        # the winner of the probes goes on with its optimizer, and its steps count
        # in the learning-rate schedule (warm-up and cosine over the whole run)
        optimizer = self._probe_optimizer or torch.optim.AdamW(
            model.parameters(),
            lr=hypers["learning_rate"],
            weight_decay=hypers["weight_decay"],
        )
        self._probe_optimizer = None
        offset = self._probe_steps
        if checkpoint is not None:
            offset = int(checkpoint.get("probe_steps", 0))
        n_train = len(data.train)
        batch_size = hypers["batch_size"]
        steps_per_epoch = max(1, math.ceil(n_train / batch_size))
        cap = epoch_cap(hypers["num_epochs"], self.budget.limited)
        # the schedule's length: num_epochs, or what fits in the time limit
        # (re-planned as the run measures itself)
        schedule = Schedule(steps_per_epoch, cap)
        self.schedule = schedule
        if checkpoint is not None and self.budget.limited:
            schedule.epochs = min(cap, int(checkpoint.get("planned_epochs", cap)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: _learning_rate_factor(
                offset + step, offset + schedule.total_steps, hypers
            ),
        )

        start_epoch = 0
        checkpoint_data: Optional[Dict[str, Any]] = None
        best_metric = math.inf
        best_epoch = -1
        best_state = copy.deepcopy(model.state_dict())
        history: List[Dict[str, float]] = []
        if checkpoint is not None:
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
            scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
            start_epoch = checkpoint["epoch"] + 1
            best_metric = checkpoint["best_metric"]
            best_epoch = checkpoint["best_epoch"]
            best_state = checkpoint["best_model_state_dict"]
            history = list(checkpoint.get("history", []))
            finished = start_epoch >= cap or (
                self.budget.limited
                and start_epoch >= int(checkpoint.get("planned_epochs", cap))
                and bool(checkpoint.get("time_used"))
            )
            if finished:
                source = self.restart or "the given training state"
                exported = os.path.join(
                    os.path.dirname(self.restart or "") or ".", "model.pt"
                )
                if os.path.exists(exported):
                    done = f"its model is {exported}"
                else:
                    done = (
                        f"export its best model with 'symatomic export {source} -o "
                        f"{exported}'"
                    )
                raise ValueError(
                    f"checkpoint '{source}' already finished its {start_epoch} "
                    f"epoch(s) of {schedule.epochs}: {done}; to train further "
                    f"pass --epochs N with N > {start_epoch}"
                    + (" and a larger --time-limit" if self.budget.limited else "")
                )
            self._log(
                "resuming from epoch %d of %s",
                start_epoch,
                self.restart or "the given training state",
            )

        if self.context.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
        best_path = os.path.join(self.output_dir, "model.ckpt")
        weights = self._loss_weights(specs)
        train_with_gradients = any(s.has_forces or s.has_stress for s in specs.values())
        symmetric = bool(self.model.exactly_equivariant)
        augmentation = self.hypers["augmentation"]
        # an exactly equivariant model gains nothing from rotated copies
        self.augmentation = (not symmetric) if augmentation == "auto" else augmentation
        if symmetric:
            self._log(
                "exactly O(3)-equivariant model (%s); augmentation %s",
                _describe_symmetry(self.model.hypers),
                "on" if self.augmentation else "off",
            )

        seed = self.options["seed"]
        self.num_epochs = schedule.epochs
        if checkpoint is not None:
            self.last_epoch = start_epoch
        self.stage = "training"
        budget = self.budget
        budget.charge("setup")
        planner = EpochPlanner(
            budget,
            schedule,
            cap,
            start_epoch,
            n_evaluated_at_end=self._structures_evaluated_at_end(data),
            n_validation=len(data.validation),
            batch_size=batch_size,
            broadcast=self.context.broadcast_int,
        )
        if budget.limited:
            self._log(
                "time limit %s: %s left for training, calibration and export%s",
                format_duration(budget.limit),
                format_duration(max(budget.left(), 0.0)),
                f" (at most {cap} epochs)" if hypers["num_epochs"] is not None else "",
            )
        durations: List[float] = []
        epoch = start_epoch
        epoch_start = budget.clock()
        while True:
            if epoch > start_epoch:
                # the plan: how many epochs fit in the time left
                planner.after_epoch(epoch, budget.clock() - epoch_start)
                self.num_epochs = schedule.epochs
            if epoch >= schedule.epochs:
                break
            start_time = time.perf_counter()
            epoch_start = budget.clock()
            left = _time_left(durations, schedule.epochs - epoch)
            if budget.limited:
                left = (
                    f" ({format_duration(max(budget.left(), 0.0))} of the limit left)"
                )
            model.train()
            order = (
                np.random.default_rng(seed * _MIX + epoch).permutation(n_train).tolist()
            )
            epoch_loss = 0.0
            steps_done = 0
            bar = tqdm(
                range(steps_per_epoch),
                desc=f"epoch {epoch + 1}/{schedule.epochs}{left}",
                disable=not (self.progress and self.context.is_main),
                leave=False,
                file=sys.stderr,
                mininterval=0.5,
                dynamic_ncols=True,
            )
            train_errors = ErrorAccumulator(specs)
            for step in bar:
                step_start = budget.clock()
                global_chunk = order[step * batch_size : (step + 1) * batch_size]
                loss_value = self._train_step(
                    global_chunk,
                    epoch,
                    step,
                    optimizer,
                    weights,
                    loss_scales,
                    train_with_gradients,
                    train_errors,
                )
                scheduler.step()
                epoch_loss += loss_value
                steps_done = step + 1
                bar.set_postfix(loss=f"{loss_value:.4g}")
                if planner.after_step(budget.clock() - step_start):
                    bar.set_description(f"epoch {epoch + 1}/{schedule.epochs}{left}")
                if epoch * steps_per_epoch + steps_done >= schedule.total_steps:
                    # the time limit ends this (last) epoch early
                    break
            bar.close()
            if steps_done < steps_per_epoch:
                self._log(
                    "the time limit ends epoch %d after %d of its %d steps",
                    epoch + 1,
                    steps_done,
                    steps_per_epoch,
                )
            budget.charge("training")
            train_errors.reduce(self.context)
            record: Dict[str, float] = {
                "epoch": epoch + 1,
                "loss": epoch_loss / max(steps_done, 1),
                "learning_rate": scheduler.get_last_lr()[0],
            }
            record.update({"train:" + k: v for k, v in train_errors.rmse().items()})

            validate = (epoch + 1) % hypers["validation_interval"] == 0 or (
                epoch + 1 >= schedule.epochs
            )
            if validate and data.validation:
                model.eval()
                errors = evaluate_structures(
                    model,
                    data.validation,
                    specs,
                    batch_size,
                    self.context,
                    weights,
                    loss_scales,
                )
                planner.validated(budget.charge("validation"))
                record.update({"val:" + k: v for k, v in errors.items()})
                metric = errors["loss"]
            elif validate:
                metric = record["loss"]
            else:
                metric = math.inf
            if metric < best_metric:
                best_metric = metric
                best_epoch = epoch
                best_state = copy.deepcopy(model.state_dict())
            record["time"] = time.perf_counter() - start_time
            durations.append(record["time"])
            record["time_left"] = (
                max(budget.left(), 0.0)
                if budget.limited
                else _seconds_left(durations, schedule.epochs - epoch - 1)
            )
            if budget.limited:
                record["planned_epochs"] = schedule.epochs
            history.append(record)
            if self.context.is_main and (
                (epoch + 1) % hypers["log_interval"] == 0
                or epoch + 1 >= schedule.epochs
            ):
                LOGGER.info(self._format_record(record, specs, data.length_unit))

            checkpoint_data = {
                "model_data": model.model_data(),
                "model_state_dict": model.state_dict(),
                "best_model_state_dict": best_state,
                "best_epoch": best_epoch,
                "best_metric": best_metric,
                "optimizer_state_dict": optimizer.state_dict(),
                "scheduler_state_dict": scheduler.state_dict(),
                "epoch": epoch,
                "loss_scales": loss_scales,
                "options": self.options,
                "split_indices": data.indices,
                "history": history,
                "planned_epochs": schedule.epochs,
                "time_used": budget.elapsed() if budget.limited else 0.0,
                "probe_steps": offset,
            }
            if self.context.is_main:
                self._save_epoch(checkpoint_data, epoch, best_epoch == epoch)
            self.context.barrier()
            budget.charge("checkpoints")
            epoch += 1

        if self.context.is_main:
            self._flush_checkpoints()
        # final evaluation with the best model
        self.stage = "finishing"
        model.load_state_dict(best_state)
        model.eval()
        if self.hypers["uncertainty"]:
            best_state = self._fit_uncertainties(data, specs, batch_size)
            if checkpoint_data is not None:
                checkpoint_data = dict(
                    checkpoint_data, best_model_state_dict=best_state
                )
            self.budget.charge("calibration")
        # a single process gathers the values of the parity plots on the way
        gather = self.parity_plots and self.context.is_main and not self.context.enabled
        parity = {"validation": ParityData(), "test": ParityData()}
        validation_errors = (
            evaluate_structures(
                model,
                data.validation,
                specs,
                batch_size,
                self.context,
                parity=parity["validation"] if gather else None,
                length_unit=data.length_unit,
            )
            if data.validation
            else {}
        )
        test_errors = (
            evaluate_structures(
                model,
                data.test,
                specs,
                batch_size,
                self.context,
                parity=parity["test"] if gather else None,
                length_unit=data.length_unit,
            )
            if data.test
            else {}
        )
        self.budget.charge("final evaluation")
        if checkpoint_data is None:  # no epoch to run: the fitted baselines only
            checkpoint_data = {
                "model_data": model.model_data(),
                "model_state_dict": model.state_dict(),
                "best_model_state_dict": best_state,
                "best_epoch": best_epoch,
                "best_metric": best_metric,
                "optimizer_state_dict": optimizer.state_dict(),
                "scheduler_state_dict": scheduler.state_dict(),
                "epoch": start_epoch - 1,
                "loss_scales": loss_scales,
                "options": self.options,
                "split_indices": data.indices,
                "history": history,
                "planned_epochs": schedule.epochs,
                "time_used": self.budget.elapsed() if self.budget.limited else 0.0,
                "probe_steps": offset,
            }
        exported = None
        plots: List[str] = []
        if self.context.is_main:
            exported = self._finish(checkpoint_data)
            self.budget.charge("export")
            plots = self._parity_plots(data, specs, batch_size, parity, gather)
            if plots:
                self.budget.charge("plots")
        self.context.barrier()
        self.stage = "done"
        self._log(
            "time%s: %s",
            f" (limit {format_duration(self.budget.limit)})"
            if self.budget.limited
            else "",
            self.budget.summary(),
        )
        self.result = TrainingResult(
            output_dir=self.output_dir,
            checkpoint=best_path,
            exported_model=exported,
            best_epoch=best_epoch + 1,
            validation_errors=validation_errors,
            test_errors=test_errors,
            history=history,
            plots=plots,
        )

    def _loss_weights(self, specs: Dict[str, TargetSpec]) -> Dict[str, float]:
        """Weight of every loss term: targets, their forces and stress."""
        hypers = self.hypers
        weights = {name: float(hypers["loss_weights"].get(name, 1.0)) for name in specs}
        unknown = set(hypers["loss_weights"]) - set(specs)
        if unknown:
            raise ValueError(
                f"architecture.training.loss_weights: {sorted(unknown)} are not targets "
                f"({sorted(specs)})"
            )
        for name, spec in specs.items():
            if spec.has_forces:
                weights[name + "/forces"] = hypers["forces_weight"]
            if spec.has_stress:
                weights[name + "/stress"] = hypers["stress_weight"]
        return weights

    def _structures_evaluated_at_end(self, data: DataSets) -> float:
        """Structures evaluated after the last epoch, in units of a validation
        structure: the final validation and test errors and, with uncertainties,
        the calibration's passes over the training and validation sets (last-layer
        features without forces: measured at 0.4 of a validation structure)."""
        count = float(len(data.validation) + len(data.test))
        if self.hypers["uncertainty"]:
            count += 0.4 * (len(data.train) + len(data.validation))
        return count

    # ------------------------------------------------------------------ hooks
    def _save_epoch(
        self, checkpoint_data: Dict[str, Any], epoch: int, is_best: bool
    ) -> None:
        """Write the checkpoints of an epoch (main process only): ``last.ckpt`` and,
        when the epoch is the best so far, ``model.ckpt``, at most once every
        :attr:`CHECKPOINT_SECONDS` (what an epoch in between would have written
        waits for the next write or :meth:`_flush_checkpoints`), and
        ``checkpoints/epoch-N.ckpt`` every ``checkpoint_interval`` epochs."""
        if (epoch + 1) % self.hypers["checkpoint_interval"] == 0:
            save_checkpoint(
                checkpoint_data,
                os.path.join(self.output_dir, "checkpoints", f"epoch-{epoch + 1}.ckpt"),
            )
        if is_best:
            # the best epoch's own state, kept until it is written: copies of what
            # training changes in place (the optimizer's state) or appends to
            # (the history); the best weights are a copy already
            self._unsaved_best = dict(
                checkpoint_data,
                model_state_dict=checkpoint_data["best_model_state_dict"],
                optimizer_state_dict=copy.deepcopy(
                    checkpoint_data["optimizer_state_dict"]
                ),
                scheduler_state_dict=copy.deepcopy(
                    checkpoint_data["scheduler_state_dict"]
                ),
                history=list(checkpoint_data["history"]),
            )
        self._unsaved_last = (checkpoint_data, epoch)
        # the real clock (not the trainer's, which tests replace): disk time
        now = time.monotonic()
        if (
            self._checkpoint_written is None
            or now - self._checkpoint_written >= self.CHECKPOINT_SECONDS
        ):
            self._flush_checkpoints()
            self._checkpoint_written = now

    def _flush_checkpoints(self) -> None:
        """Write what :meth:`_save_epoch` has not written yet (main process)."""
        if self._unsaved_best is not None:
            save_checkpoint(
                self._unsaved_best, os.path.join(self.output_dir, "model.ckpt")
            )
            self._unsaved_best = None
        if self._unsaved_last is not None:
            checkpoint_data, epoch = self._unsaved_last
            last = os.path.join(self.output_dir, "last.ckpt")
            save_checkpoint(checkpoint_data, last)
            self.last_checkpoint = last
            self.last_epoch = epoch + 1
            self._unsaved_last = None

    def _parity_plots(
        self,
        data: DataSets,
        specs: Dict[str, TargetSpec],
        batch_size: int,
        parity: Dict[str, ParityData],
        gathered: bool,
    ) -> List[str]:
        """Parity plots of the best model on the validation and test sets (main
        process only): ``parity-<set>-<target>.png`` in the output folder. A
        plotting failure is logged, never fatal: the model is already exported."""
        written: List[str] = []
        if not self.parity_plots:
            return written
        for name, structures in (("validation", data.validation), ("test", data.test)):
            if not structures:
                continue
            try:
                if not gathered:  # distributed: the main process evaluates alone
                    evaluate_structures(
                        self.model,
                        structures,
                        specs,
                        batch_size,
                        parity=parity[name],
                        length_unit=data.length_unit,
                    )
                pattern = os.path.join(self.output_dir, f"parity-{name}-{{target}}.png")
                written.extend(parity[name].write(pattern, f"{name} set"))
            except Exception as error:  # noqa: BLE001 - plots are a bonus
                LOGGER.warning(
                    "warning: no parity plots for the %s set: %s", name, error
                )
        return written

    def _fit_uncertainties(
        self, data: DataSets, specs: Dict[str, TargetSpec], batch_size: int
    ) -> Dict[str, torch.Tensor]:
        """Calibrated last-layer uncertainties of the best model (every process
        fits the same ones); returns its new state."""
        start = time.time()
        report = fit_uncertainties(
            self.model,
            data.train,
            data.validation,
            specs,
            batch_size,
            n_members=self.hypers["num_ensemble_members"],
            seed=self.options["seed"],
        )
        if report:
            self._log(
                "uncertainties calibrated on the %s set for %d block(s) in %.1f s "
                "(docs/uncertainty.rst)",
                "validation" if data.validation else "training",
                len(report),
                time.time() - start,
            )
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _finish(self, checkpoint_data: Dict[str, Any]) -> Optional[str]:
        """After training (main process only): make sure ``model.ckpt`` exists and
        export the (best) model to ``model.pt``; returns the exported file."""
        best_path = os.path.join(self.output_dir, "model.ckpt")
        if not os.path.exists(best_path):
            save_checkpoint(checkpoint_data, best_path)
        elif self.hypers["uncertainty"]:
            # the best weights with their calibrated uncertainties, so that
            # 'symatomic export' of either checkpoint has them (atomic rewrites)
            best_state = checkpoint_data["best_model_state_dict"]
            for path in (best_path, os.path.join(self.output_dir, "last.ckpt")):
                if os.path.exists(path):
                    saved = load_checkpoint(path)
                    if saved.get("epoch") == saved.get("best_epoch"):
                        saved["model_state_dict"] = best_state
                    saved["best_model_state_dict"] = best_state
                    save_checkpoint(saved, path)
        exported = os.path.join(self.output_dir, "model.pt")
        export_model(copy.deepcopy(self.model).to("cpu"), exported)
        return exported

    # ------------------------------------------------------------ internals
    def _train_step(
        self,
        global_chunk: List[int],
        epoch: int,
        step: int,
        optimizer: torch.optim.Optimizer,
        weights: Dict[str, float],
        loss_scales: Dict[str, Any],
        with_gradients: bool,
        errors: ErrorAccumulator,
        model: Optional[SymatomicModel] = None,
    ) -> float:
        if model is None:
            model = self.model
        specs = self.specs
        optimizer.zero_grad(set_to_none=False)
        generator = torch.Generator().manual_seed(
            ((self.options["seed"] * _MIX + epoch) * _MIX + step) % 2**63
        )
        local = self.context.shard(list(range(len(global_chunk))))
        global_batch_structures = [self.data.train[i] for i in global_chunk]
        # draw the rotations of the whole global batch, keep this rank's
        matrices = None
        if self.augmentation:
            matrices = random_transformations(
                len(global_chunk),
                0,
                device=torch.device("cpu"),
                dtype=torch.float64,
                add_inversions=True,
                generator=generator,
            ).matrices
        loss = torch.zeros((), dtype=self.dtype, device=self.device)
        if local:
            batch = collate(
                [global_batch_structures[i] for i in local], self.dtype, self.device
            )
            if matrices is not None:
                batch = random_o3_augmentation(batch, specs, matrices=matrices[local])
            predictions = predict_batch(
                model, batch, specs, with_gradients=with_gradients, create_graph=True
            )
            terms = loss_terms(model, batch, specs, predictions, loss_scales)
            errors.update(batch, predictions)
        else:
            terms = None
        counts_keys = sorted(weights)
        local_counts = torch.tensor(
            [terms.counts.get(k, 0.0) if terms else 0.0 for k in counts_keys],
            dtype=torch.float64,
        )
        global_counts = self.context.all_reduce_sum(local_counts.clone())
        if terms is not None:
            for key, count in zip(counts_keys, global_counts.tolist()):
                if key in terms.sums and count > 0:
                    loss = loss + weights[key] * terms.sums[key] / count
            loss.backward()
        self.context.all_reduce_gradients(model.parameters())
        if self.hypers["grad_clip_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(
                model.parameters(), self.hypers["grad_clip_norm"]
            )
        optimizer.step()
        loss_tensor = self.context.all_reduce_sum(
            torch.tensor([float(loss.detach())], dtype=torch.float64)
        )
        return float(loss_tensor[0])

    def _format_record(
        self, record: Dict[str, float], specs: Dict[str, TargetSpec], length_unit: str
    ) -> str:
        parts = [
            f"epoch {int(record['epoch']):4d}",
            f"loss {record['loss']:.4g}",
            f"lr {record['learning_rate']:.2e}",
        ]
        for prefix in ("train", "val"):
            values = []
            for key in _display_keys(specs):
                full = f"{prefix}:{key}"
                if full in record:
                    unit = error_unit(specs, key, length_unit)
                    values.append(
                        f"{key} {record[full]:.4g}{(' ' + unit) if unit else ''}"
                    )
            if values:
                parts.append(f"{prefix} RMSE: " + ", ".join(values))
        parts.append(f"{record['time']:.1f}s")
        if record.get("time_left", 0.0) > 0:
            parts.append(f"~{_format_duration(record['time_left'])} left")
        return " | ".join(parts)


def _describe_symmetry(hypers: Dict[str, Any]) -> str:
    """How a model is made exact, in a few words."""
    heads = f"{hypers['tensor_heads']} tensor heads"
    if hypers["backbone"] == "soap":
        return "invariant SOAP backbone, " + heads
    if hypers.get("edge_inputs") == "invariant":
        return "PET with invariant edge inputs, " + heads
    if hypers["ecse"]["mode"] == "local":
        return "PET with local ECSE frames, " + heads
    return "PET, " + heads


def _seconds_left(durations: List[float], epochs_left: int) -> float:
    """Estimated seconds for the remaining epochs: the median of the last (up to
    5) epoch times, the first epoch (warm-up) left out once others exist, plus
    ~2 epochs for the final evaluation and export."""
    if not durations or epochs_left <= 0:
        return 0.0
    recent = durations[1:] if len(durations) > 1 else durations
    per_epoch = float(np.median(recent[-5:]))
    return per_epoch * (epochs_left + 2)


def _time_left(durations: List[float], epochs_left: int) -> str:
    seconds = _seconds_left(durations, epochs_left)
    return f" (~{_format_duration(seconds)} left in all)" if seconds > 0 else ""


def _format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _differences(before: Any, after: Any, prefix: str = "") -> List[str]:
    """Dotted names of the entries that differ between two nested mappings."""
    if isinstance(before, dict) and isinstance(after, dict):
        result = []
        for key in sorted(set(before) | set(after), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            result.extend(_differences(before.get(key), after.get(key), name))
        return result
    return [] if before == after else [prefix or "(all)"]


def _display_keys(specs: Dict[str, TargetSpec]) -> List[str]:
    keys = []
    for name, spec in specs.items():
        keys.append(name)
        if spec.has_forces:
            keys.append(name + "/forces")
        if spec.has_stress:
            keys.append(name + "/stress")
    return keys


def export_model(model: Any, path: str) -> None:
    """Export a :class:`SymatomicModel` (or save an :class:`AtomisticModel`) to a
    metatomic ``.pt`` file, written atomically."""
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise ValueError(
            f"'{path}' is a directory; give the file name of the model, e.g. "
            f"'{os.path.join(path, 'model.pt')}'"
        )
    exported = model.export() if isinstance(model, SymatomicModel) else model
    with atomic_write(path) as temporary:
        exported.save(temporary)


class _Probe:
    """The start of a candidate's run for ``backbone: auto`` (see
    :mod:`symatomic.train.probes`), trained in rounds: its optimizer, its
    warm-up and cosine schedule, planned in optimizer steps for the whole run it
    would have if it won, and the steps done.

    :param trainer: the trainer (its data, training step and clock)
    :param model: the candidate's model
    :param data: the data sets
    :param specs: the targets
    :param run_seconds: the run's seconds if the candidate wins: its share of the
        probes and the rest of the limit, the end of the run included
    :param n_end: structures evaluated after the last epoch
        (:meth:`Trainer._structures_evaluated_at_end`)
    """

    def __init__(
        self,
        trainer: "Trainer",
        model: SymatomicModel,
        data: DataSets,
        specs: Dict[str, TargetSpec],
        run_seconds: float,
        n_end: float,
    ):
        self.trainer = trainer
        self.model = model
        self.data = data
        self.specs = specs
        self.run_seconds = run_seconds
        self.n_end = n_end
        hypers = trainer.hypers
        self.hypers = hypers
        self.batch_size = hypers["batch_size"]
        self.steps_per_epoch = max(1, math.ceil(len(data.train) / self.batch_size))
        #: the steps of the run the probe starts (the schedule's length)
        self.run = Schedule(1, 10**9)
        self.optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=hypers["learning_rate"],
            weight_decay=hypers["weight_decay"],
        )
        run = self.run
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: _learning_rate_factor(step, run.total_steps, hypers),
        )
        self.weights = trainer._loss_weights(specs)
        self.loss_scales = _loss_scales(model, data.train, specs)
        self.with_gradients = any(s.has_forces or s.has_stress for s in specs.values())
        augmentation = hypers["augmentation"]
        self.augmentation = (
            (not model.exactly_equivariant) if augmentation == "auto" else augmentation
        )
        #: optimizer steps done
        self.step = 0
        #: seconds of every step, and of the probe's training in all
        self.step_seconds: List[float] = []
        self.seconds = 0.0

    @property
    def epochs(self) -> float:
        return self.step / self.steps_per_epoch

    def train_for(self, seconds: float) -> None:
        """Train for ``seconds`` (the evaluation of the round's model included),
        re-planning after every step: the steps that fit, and the run's length. A
        round has at least one step; one whose steps are long stops after the
        step that reaches its time, not after an epoch."""
        trainer = self.trainer
        context = trainer.context
        n_train = len(self.data.train)
        n_validation = len(self.data.validation)
        n_scored = min(n_validation or n_train, MAX_PROBE_VALIDATION)
        share = EpochPlanner.EVALUATION_SHARE
        budget = TimeBudget(seconds, trainer.clock)
        rounds = Schedule(1, self.step + 1)
        seed = trainer.options["seed"]
        cap = epoch_cap(self.hypers["num_epochs"], True) * self.steps_per_epoch
        previous = trainer.augmentation
        trainer.augmentation = self.augmentation
        self.model.train()
        try:
            while self.step < rounds.total_steps:
                epoch, position = divmod(self.step, self.steps_per_epoch)
                order = np.random.default_rng(seed * _MIX + epoch).permutation(n_train)
                chunk = order[
                    position * self.batch_size : (position + 1) * self.batch_size
                ]
                start = trainer.clock()
                trainer._train_step(
                    chunk.tolist(),
                    epoch,
                    position,
                    self.optimizer,
                    self.weights,
                    self.loss_scales,
                    self.with_gradients,
                    ErrorAccumulator(self.specs),
                    model=self.model,
                )
                self.scheduler.step()
                elapsed = trainer.clock() - start
                self.step_seconds.append(elapsed)
                self.seconds += elapsed
                self.step += 1
                recent = self.step_seconds[1:] or self.step_seconds
                per_step = median(recent[-20:])
                evaluation = share * per_step / self.batch_size
                planned = budget.plan_epochs(
                    self.step, 10**9, per_step, evaluation * n_scored, minimum=1
                )
                rounds.epochs = context.broadcast_int(planned)
                # the run: its steps with their share of the validation of every
                # epoch, after the end of the run is set aside
                end = evaluation * self.n_end + TimeBudget.EXPORT_SECONDS
                per_run_step = (
                    per_step + evaluation * n_validation / self.steps_per_epoch
                )
                left = self.run_seconds - self.seconds - end
                more = int(max(left, 0.0) * (1.0 - TimeBudget.SAFETY) // per_run_step)
                self.run.epochs = context.broadcast_int(
                    max(min(self.step + more, cap), planned)
                )
        finally:
            trainer.augmentation = previous
