"""The model, its optimiser, learning-rate schedule and class weights for one training run."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from covidcxr.data.dataset import CXRDataset
from covidcxr.models.finetune import apply_finetune, is_head_group, param_groups
from covidcxr.models.registry import create_model, resolve_spec
from covidcxr.data.preprocess import PreprocessSpec
from covidcxr.training.config import TrainingConfig
from covidcxr.training.sampling import source_balanced_cell_weights


def build_spec(config: TrainingConfig) -> PreprocessSpec:
    """The run's preprocessing: the config's ``preprocess`` section resolved against the architecture."""
    return resolve_spec(config.preprocess, config.model.name, config.model.channels)


def build_model(config: TrainingConfig, num_classes: int) -> tuple[nn.Module, list[dict], dict]:
    """Model with pretrained backbone (if asked), fine-tuning mode applied (frozen BatchNorm stays in
    eval mode), optimiser param groups, and the fine-tuning plan for the run record."""
    m, t = config.model, config.train
    weights = None if m.weights in ("", "none", None) else m.weights
    model = create_model(m.name, num_classes, channels=m.channels, weights=weights, weights_sha256=m.weights_sha256)
    plan = apply_finetune(model, m.name, mode=m.finetune, last_k=m.last_k)
    groups = param_groups(model, m.name, lr=t.lr, backbone_lr_mult=m.backbone_lr_mult, weight_decay=t.weight_decay)
    return model, groups, plan.to_dict()


def build_optimizer(config: TrainingConfig, groups: list[dict]) -> torch.optim.Optimizer:
    t = config.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True)


def lr_factor(step: int, *, steps_per_epoch: int, epochs: int, schedule: str, warmup_epochs: float,
              step_epochs: int = 10, step_gamma: float = 0.1) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (linear warm-up, then schedule)."""
    total = max(1, steps_per_epoch * epochs)
    warm = int(round(warmup_epochs * steps_per_epoch))
    if step < warm:
        return (step + 1) / (warm + 1)
    if schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        return step_gamma ** (step // (steps_per_epoch * step_epochs))
    return 1.0


def lpft_lr_factor(step: int, *, head: bool, lp_steps: int, lp_scale: float, steps_per_epoch: int, epochs: int,
                   lp_epochs: int, **kw) -> float:
    """LP-FT multiplier of a group's base lr: during the probe (the first ``lp_steps`` steps) the head
    runs its own schedule over ``lp_epochs`` at ``lp_scale`` x lr and the backbone stands still (0);
    then both follow the schedule afresh (warm-up included) over the remaining epochs."""
    if step < lp_steps:
        return lp_scale * lr_factor(step, steps_per_epoch=steps_per_epoch, epochs=lp_epochs, **kw) if head else 0.0
    return lr_factor(step - lp_steps, steps_per_epoch=steps_per_epoch, epochs=epochs - lp_epochs, **kw)


def build_scheduler(config: TrainingConfig, optimizer, steps_per_epoch: int):
    t = config.train
    kw = dict(steps_per_epoch=steps_per_epoch, epochs=t.epochs, schedule=t.schedule, warmup_epochs=t.warmup_epochs,
              step_epochs=t.step_epochs, step_gamma=t.step_gamma)
    # A plain function (not a callable object) keeps the scheduler state free of pickled objects,
    # so the checkpoint loads with torch.load(weights_only=True).
    if not t.lp_epochs:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, **kw))
    lp = dict(kw, lp_steps=t.lp_epochs * steps_per_epoch, lp_scale=(t.lp_lr or t.lr) / t.lr, lp_epochs=t.lp_epochs)
    lambdas = [(lambda s: lpft_lr_factor(s, head=True, **lp)) if is_head_group(g) else
               (lambda s: lpft_lr_factor(s, head=False, **lp)) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def class_loss_weights(config: TrainingConfig, dataset: CXRDataset) -> torch.Tensor | None:
    """``class_weighted``: weights that make every class contribute equally under the chosen sampler."""
    if config.train.loss_weighting == "none":
        return None
    k = len(dataset.classes)
    labels = dataset.targets
    if config.train.sampler == "balanced":
        freq = np.full(k, 1.0 / k)
    elif config.train.sampler == "source_balanced":
        cells = source_balanced_cell_weights(labels, dataset.sources, config.train.single_class_source_weight)
        freq = np.zeros(k)
        for (_, c), w in cells.items():
            freq[c] += w
    else:
        freq = np.bincount(labels, minlength=k) / len(labels)
    w = np.where(freq > 0, 1.0 / (k * np.maximum(freq, 1e-12)), 0.0)
    return torch.tensor(w, dtype=torch.float32)
