"""Training of the three networks (paper sections 2.2-2.5) and the ``train_model`` entry point."""

from CMBDetectLib.training.config import StageConfig, TrainingConfig
from CMBDetectLib.training.trainer import train_model

__all__ = ["StageConfig", "TrainingConfig", "train_model"]
