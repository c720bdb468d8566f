"""Training: losses, the training loop, checkpoints and data parallelism."""

from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .trainer import Trainer, TrainingResult, evaluate_structures, export_model

__all__ = [
    "Trainer",
    "TrainingResult",
    "evaluate_structures",
    "export_model",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
]
