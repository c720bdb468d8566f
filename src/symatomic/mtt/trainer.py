"""symatomic's trainer in metatrain's :class:`~metatrain.utils.abc.TrainerInterface`.

:class:`SymatomicMTTTrainer` converts metatrain's datasets to symatomic structures
(:mod:`symatomic.mtt.convert`) and runs symatomic's own training loop
(:class:`symatomic.train.Trainer`): the same losses, normalisation, schedule,
augmentation and validation. Its state (optimizer, scheduler, epochs, best weights,
loss scales) goes into metatrain's checkpoints.
"""

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import torch
from metatrain.utils.abc import ModelInterface, TrainerInterface
from metatrain.utils.io import check_file_extension
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..data.sets import DataSets
from ..options import check_training_hypers
from ..train.checkpoint import CHECKPOINT_VERSION
from ..train.trainer import Trainer
from .convert import spec_from_target_info, structures_from_dataset
from .documentation import TrainerHypers
from .model import SymatomicMTT

__all__ = ["SymatomicMTTTrainer"]

LOGGER = logging.getLogger(__name__)

#: keys of symatomic's training state stored in metatrain checkpoints
_STATE_KEYS = (
    "optimizer_state_dict",
    "scheduler_state_dict",
    "epoch",
    "best_epoch",
    "best_metric",
    "loss_scales",
    "history",
    "seed",
)


class _Run(Trainer):
    """symatomic's training loop on a given model, saving metatrain checkpoints."""

    def __init__(
        self,
        owner: "SymatomicMTTTrainer",
        mtt_model: SymatomicMTT,
        options: Dict[str, Any],
        output_dir: str,
    ):
        super().__init__(options, output_dir, restart=None, progress=False)
        self.owner = owner
        self.mtt_model = mtt_model

    def _setup_model(
        self, data: Optional[DataSets], checkpoint: Optional[Dict]
    ) -> None:
        assert data is not None
        model = self.mtt_model.model.to(dtype=self.dtype)
        self.model = model
        unfitted = [
            name for name in data.targets if name not in self.mtt_model.fitted_targets
        ]
        if unfitted:
            # fit every target, then keep the statistics of those already fitted
            saved = {
                name: (
                    readout.baseline.clone(),
                    readout.scale.clone(),
                    readout.pair_normalization.clone(),
                )
                for name, readout in model.readouts.items()
                if name in self.mtt_model.fitted_targets
            }
            model.fit_output_statistics(data.train)
            for name, (baseline, scale, normalization) in saved.items():
                model.readouts[name].baseline.copy_(baseline)
                model.readouts[name].scale.copy_(scale)
                model.readouts[name].pair_normalization.copy_(normalization)
            model.start_heads_small(unfitted)
            self.mtt_model.fitted_targets.extend(unfitted)
            self._log("fitted baselines and scales of %s", unfitted)
        model.to(device=self.device)

    def _save_epoch(
        self, checkpoint_data: Dict[str, Any], epoch: int, is_best: bool
    ) -> None:
        self.owner._record(checkpoint_data)
        if (epoch + 1) % self.hypers["checkpoint_interval"] == 0:
            self.owner.save_checkpoint(
                self.mtt_model,
                os.path.join(self.output_dir, f"model_{epoch + 1}.ckpt"),
            )

    def _finish(self, checkpoint_data: Dict[str, Any]) -> Optional[str]:
        self.owner._record(checkpoint_data)
        return None

    def _check_exportable(self) -> None:
        # metatrain exports the model itself, under its own output names
        # (``spherical_tensor_atomic_basis``…), which metatomic's capabilities of
        # symatomic's export would reject
        pass

    def _parity_plots(self, *args: Any, **kwargs: Any) -> List[str]:
        # metatrain's output folder keeps metatrain's layout
        return []


class SymatomicMTTTrainer(TrainerInterface[TrainerHypers]):
    """Train :class:`~symatomic.mtt.model.SymatomicMTT` models with symatomic's
    training loop.

    :param hypers: trainer hyper-parameters (:class:`~.documentation.TrainerHypers`);
        metatrain's ``loss`` section is honoured for MSE losses
        (:func:`symatomic.options.apply_metatrain_loss`), ``finetune.read_from`` is
        handled by metatrain (which loads the model)
    """

    #: 2: ``time_limit`` in the training hyper-parameters, ``num_epochs`` may be
    #: ``None``
    __checkpoint_version__ = 2

    def __init__(self, hypers: TrainerHypers) -> None:
        super().__init__(hypers)
        plain = hypers
        if isinstance(plain, (DictConfig, ListConfig)):
            plain = OmegaConf.to_container(plain, resolve=True)
        options = {
            str(k): OmegaConf.to_container(v, resolve=True)
            if isinstance(v, (DictConfig, ListConfig))
            else v
            for k, v in dict(plain).items()
            if k != "finetune"
        }
        self.training_hypers = check_training_hypers(options)
        #: index of the last epoch trained (``None`` before any)
        self.epoch: Optional[int] = None
        self.optimizer_state_dict: Optional[Dict[str, Any]] = None
        self.scheduler_state_dict: Optional[Dict[str, Any]] = None
        self.best_epoch: Optional[int] = None
        self.best_metric: Optional[float] = None
        self.best_model_state_dict: Optional[Dict[str, Any]] = None
        self.last_model_state_dict: Optional[Dict[str, Any]] = None
        self.loss_scales: Optional[Dict[str, Any]] = None
        self.history: List[Dict[str, float]] = []
        self.seed: Optional[int] = None

    def _record(self, checkpoint_data: Dict[str, Any]) -> None:
        """Keep the training state written by symatomic's loop."""
        self.optimizer_state_dict = checkpoint_data["optimizer_state_dict"]
        self.scheduler_state_dict = checkpoint_data["scheduler_state_dict"]
        epoch = int(checkpoint_data["epoch"])
        self.epoch = epoch if epoch >= 0 else None
        best_epoch = int(checkpoint_data["best_epoch"])
        self.best_epoch = best_epoch if best_epoch >= 0 else None
        self.best_metric = float(checkpoint_data["best_metric"])
        self.best_model_state_dict = _prefixed(checkpoint_data["best_model_state_dict"])
        self.last_model_state_dict = _prefixed(checkpoint_data["model_state_dict"])
        self.loss_scales = checkpoint_data["loss_scales"]
        self.history = list(checkpoint_data["history"])

    def train(
        self,
        model: ModelInterface,
        dtype: torch.dtype,
        devices: List[torch.device],
        train_datasets: List[Any],
        val_datasets: List[Any],
        checkpoint_dir: str,
    ) -> None:
        """Train ``model`` (a :class:`SymatomicMTT`) on the datasets.

        :param dtype: float64 or float32
        :param devices: one device (several are not supported: use ``torchrun`` with
            ``symatomic train`` for data-parallel training)
        :param train_datasets: metatrain datasets (their structures are merged)
        :param val_datasets: metatrain datasets for validation (may be empty)
        :param checkpoint_dir: folder for the intermediate checkpoints
        """
        if not isinstance(model, SymatomicMTT):
            raise TypeError(
                f"the symatomic trainer trains SymatomicMTT models, got "
                f"{type(model).__name__}"
            )
        if len(devices) != 1:
            raise ValueError(
                f"symatomic trains on one device through metatrain, got {devices}; "
                "use 'torchrun -m symatomic train' for data-parallel training"
            )
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"unsupported dtype {dtype} (float32 or float64)")
        device = devices[0]
        if self.seed is None:
            # metatrain seeds torch's generator from the options' seed
            self.seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        inner = model.model
        specs = {
            name: spec_from_target_info(name, info)
            for name, info in model.dataset_info.targets.items()
        }
        train: List[Any] = []
        for index, dataset in enumerate(train_datasets):
            train.extend(
                structures_from_dataset(
                    dataset, specs, inner.cutoff, f"training set {index}"
                )
            )
        validation: List[Any] = []
        for index, dataset in enumerate(val_datasets):
            validation.extend(
                structures_from_dataset(
                    dataset, specs, inner.cutoff, f"validation set {index}"
                )
            )
        if not train:
            raise ValueError("the training set is empty")
        data = DataSets(
            train=train,
            validation=validation,
            test=[],
            targets=specs,
            length_unit=model.dataset_info.length_unit,
            atomic_types=list(inner.atomic_types),
        )
        options = {
            "architecture": {
                "name": "pet",
                "model": inner.hypers,
                "training": self.training_hypers,
            },
            "seed": self.seed,
            "base_precision": 64 if dtype == torch.float64 else 32,
            "device": "cuda" if device.type == "cuda" else "cpu",
        }
        run = _Run(self, model, options, checkpoint_dir or ".")
        run.device = device
        resume = None
        if self.optimizer_state_dict is not None and self.epoch is not None:
            resume = {
                "optimizer_state_dict": self.optimizer_state_dict,
                "scheduler_state_dict": self.scheduler_state_dict,
                "epoch": self.epoch,
                "best_metric": (
                    self.best_metric if self.best_metric is not None else math.inf
                ),
                "best_epoch": self.best_epoch if self.best_epoch is not None else -1,
                "best_model_state_dict": _unprefixed(
                    self.best_model_state_dict or model.state_dict()
                ),
                "loss_scales": self.loss_scales,
                "history": self.history,
            }
        run.run(data, resume)

    def save_checkpoint(self, model: ModelInterface, path: Union[str, Path]) -> None:
        """Write the model and the training state to ``path`` (``.ckpt``)."""
        checkpoint = model.get_checkpoint()
        if self.last_model_state_dict is not None:
            checkpoint["model_state_dict"] = self.last_model_state_dict
        if self.best_model_state_dict is not None:
            checkpoint["best_model_state_dict"] = self.best_model_state_dict
        checkpoint.update(
            {
                "trainer_ckpt_version": self.__checkpoint_version__,
                "symatomic_checkpoint_version": CHECKPOINT_VERSION,
                "train_hypers": self.hypers,
                "epoch": self.epoch,
                "best_epoch": self.best_epoch,
                "trainer_state": {key: getattr(self, key) for key in _STATE_KEYS},
            }
        )
        path = Path(check_file_extension(path, ".ckpt"))
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        try:
            torch.save(checkpoint, temporary)
            os.replace(temporary, path)
        finally:
            if temporary.exists():
                temporary.unlink()

    @classmethod
    def load_checkpoint(
        cls,
        checkpoint: Dict[str, Any],
        hypers: TrainerHypers,
        context: Literal["restart", "finetune"],
    ) -> "SymatomicMTTTrainer":
        """A trainer with ``hypers``; with ``context="restart"`` it continues the
        training state of ``checkpoint`` (optimizer, scheduler, epochs, best
        model), with ``"finetune"`` it starts afresh."""
        trainer = cls(hypers)
        if context == "finetune":
            return trainer
        if context != "restart":
            raise ValueError(
                f"unknown context '{context}' (expected 'restart' or 'finetune')"
            )
        for key, value in checkpoint["trainer_state"].items():
            setattr(trainer, key, value)
        trainer.best_model_state_dict = checkpoint.get("best_model_state_dict")
        trainer.last_model_state_dict = checkpoint.get("model_state_dict")
        return trainer

    @classmethod
    def upgrade_checkpoint(cls, checkpoint: Dict[str, Any]) -> Dict[str, Any]:
        version = checkpoint.get("trainer_ckpt_version")
        if version == 1:
            # 1 → 2: no time limit in older runs
            hypers = dict(checkpoint.get("train_hypers") or {})
            hypers.setdefault("time_limit", None)
            checkpoint["train_hypers"] = hypers
            checkpoint["trainer_ckpt_version"] = version = 2
        if version != cls.__checkpoint_version__:
            raise RuntimeError(
                "Unable to upgrade the checkpoint: the checkpoint is using trainer "
                f"version {version}, while the current trainer version is "
                f"{cls.__checkpoint_version__}."
            )
        return checkpoint


def _prefixed(state: Dict[str, Any]) -> Dict[str, Any]:
    """State of the inner :class:`SymatomicModel` → state of :class:`SymatomicMTT`."""
    return {f"model.{key}": value for key, value in state.items()}


def _unprefixed(state: Dict[str, Any]) -> Dict[str, Any]:
    return {
        key[len("model.") :]: value
        for key, value in state.items()
        if key.startswith("model.")
    }
