"""Training: config, dataset sampling, augmentation, the loop with checkpoints/resume, k-fold ensembles.

``run_training(config_path, out_dir, overrides=[...], resume=False, folds=None)`` is what
``covidcxr train`` calls; ``fit`` trains one model from a validated :class:`TrainingConfig`.
"""

from covidcxr.training.config import TrainingConfig, load_config, validate_config
from covidcxr.training.cv import run_training, train_kfold
from covidcxr.training.loop import fit

__all__ = ["TrainingConfig", "fit", "load_config", "run_training", "train_kfold", "validate_config"]
