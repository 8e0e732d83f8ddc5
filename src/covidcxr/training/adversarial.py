"""Source-adversarial training (DANN, Ganin & Lempitsky, ICML 2015): ``train.source_adversarial_weight``.

A small source classifier (the *adversary*) reads the model's penultimate features, i.e. the input
of its classification head, through a gradient-reversal layer (GRL). The adversary learns to tell
which collection (manifest ``source``) an image comes from; the reversed, lambda-scaled gradient
pushes the backbone towards features from which the source cannot be told. The training loss is

    task loss (train.objective) + CE(adversary(GRL(features, lambda)), source index)

with ``lambda`` constant (``train.source_adversarial_schedule: constant``) or ramped up with DANN's
schedule ``lambda(p) = weight * (2 / (1 + exp(-10 p)) - 1)``, ``p`` = training progress in [0, 1]
(``dann``). ``train.source_adversarial_hidden``: 0 = a linear adversary, N = one hidden ReLU layer
of N units.

The adversary is training-only: it is a separate module (a forward pre-hook on the model's
classifier captures the features; ``model(x)`` itself is unchanged), so it is never part of
``model.safetensors``, the run record, inference or ONNX export. Its weights and its own AdamW
state (constant lr ``train.lr``, ``train.weight_decay``) are stored in the training checkpoint, so
``--resume`` stays bit-identical.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from covidcxr.errors import ConfigError
from covidcxr.models.registry import get_architecture
from covidcxr.training.config import TrainingConfig


class GradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-lambda``."""

    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = float(lam)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    return GradReverse.apply(x, lam)


def adversary_lambda(weight: float, schedule: str, progress: float) -> float:
    """The GRL coefficient at training progress ``progress`` (0 = first step, 1 = end)."""
    if schedule == "constant":
        return float(weight)
    p = min(1.0, max(0.0, float(progress)))
    return float(weight) * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


def source_index(sources: Sequence) -> tuple[torch.Tensor, list[str]]:
    """Integer index of each item's source and the sorted source names."""
    names = sorted({str(s) for s in sources})
    pos = {s: i for i, s in enumerate(names)}
    return torch.tensor([pos[str(s)] for s in sources], dtype=torch.long), names


def _classifier(model: nn.Module, model_name: str) -> nn.Module:
    """The model's classification head module (its input: the penultimate feature vector)."""
    prefixes = get_architecture(model_name).head(model)
    modules = dict(model.named_modules())
    names = [p.rstrip(".") for p in prefixes if p.rstrip(".") in modules]
    if len(names) != 1:
        raise ConfigError(f"train.source_adversarial_weight: cannot find the single classifier module of "
                          f"model {model_name!r} (head prefixes {prefixes}); use source_adversarial_weight=0")
    return modules[names[0]]


class SourceAdversary:
    """The adversary head, its optimiser and the hook that captures the features."""

    def __init__(self, model: nn.Module, model_name: str, n_sources: int, item_sources: torch.Tensor,
                 sources: list[str], *, weight: float, schedule: str, hidden: int, total_steps: int,
                 lr: float, weight_decay: float):
        if n_sources < 2:
            raise ConfigError("train.source_adversarial_weight > 0 needs training images from at least 2 sources; "
                              f"this run has {n_sources} ({', '.join(sources)})")
        head = _classifier(model, model_name)
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if not isinstance(head, nn.Linear) else [head]
        if not linears:
            raise ConfigError(f"train.source_adversarial_weight: the classifier of {model_name!r} has no Linear "
                              "layer, so its feature size is unknown; use source_adversarial_weight=0")
        dim = linears[0].in_features
        self.net = (nn.Linear(dim, n_sources) if hidden == 0 else
                    nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, n_sources)))
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        self.item_sources, self.sources = item_sources, sources
        self.weight, self.schedule, self.hidden = float(weight), schedule, int(hidden)
        self.total_steps, self.step = max(1, int(total_steps)), 0
        self.features: torch.Tensor | None = None
        self._handle = head.register_forward_pre_hook(self._capture)
        self.reset_epoch()

    def _capture(self, module, args):
        if torch.is_grad_enabled():  # training steps only; validation / inference run without grad
            self.features = args[0]

    def to(self, device) -> "SourceAdversary":
        self.net.to(device)
        self.item_sources = self.item_sources.to(device)
        return self

    def remove(self) -> None:
        self._handle.remove()
        self.features = None

    def reset_epoch(self) -> None:
        self.correct, self.seen, self.loss_sum, self.lam = 0, 0, 0.0, self.current_lambda()
        self.counts = torch.zeros(len(self.sources), dtype=torch.long)

    def current_lambda(self) -> float:
        return adversary_lambda(self.weight, self.schedule, self.step / self.total_steps)

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        """The adversarial loss of the batch whose forward pass just ran (``idx``: its dataset indices)."""
        feats = self.features
        if feats is None or feats.dim() != 2:
            raise ConfigError("train.source_adversarial_weight: the model's classifier input is not an N x D "
                              "feature matrix; this architecture is not supported (use weight 0)")
        self.features = None
        self.net.train()
        self.lam = self.current_lambda()
        target = self.item_sources[idx.to(self.item_sources.device)]
        logits = self.net(grad_reverse(feats.float(), self.lam))
        loss = F.cross_entropy(logits, target)
        with torch.no_grad():
            self.correct += int((logits.argmax(1) == target).sum())
            self.seen += len(target)
            self.counts += torch.bincount(target.cpu(), minlength=len(self.sources))
            self.loss_sum += float(loss.detach()) * len(target)
        return loss

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self, grad_clip: float | None) -> None:
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), grad_clip)
        self.optimizer.step()
        self.step += 1

    def epoch_metrics(self) -> dict:
        return {"adv_source_acc": self.correct / self.seen if self.seen else float("nan"),
                "adv_loss": self.loss_sum / self.seen if self.seen else float("nan"), "adv_lambda": self.lam,
                # what always naming the epoch's most frequent source would score (the adversary's chance level)
                "adv_majority_acc": int(self.counts.max()) / self.seen if self.seen else float("nan")}

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            raise ConfigError("the checkpoint holds no source-adversary state; resume with the run's own config")
        try:
            self.net.load_state_dict(state["net"])
        except RuntimeError as exc:
            raise ConfigError(f"source-adversary state does not fit this run ({exc}); resume with the same data "
                              "and config") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def summary(self) -> dict:
        return {"weight": self.weight, "schedule": self.schedule, "hidden": self.hidden, "sources": self.sources,
                "final_lambda": self.current_lambda()}


def build_adversary(config: TrainingConfig, model: nn.Module, sources: Sequence, steps_per_epoch: int
                    ) -> SourceAdversary | None:
    """The source adversary ``train.source_adversarial_weight`` asks for (None when it is 0)."""
    t = config.train
    if t.source_adversarial_weight == 0:
        return None
    items, names = source_index(sources)
    return SourceAdversary(model, config.model.name, len(names), items, names, weight=t.source_adversarial_weight,
                           schedule=t.source_adversarial_schedule, hidden=t.source_adversarial_hidden,
                           total_steps=steps_per_epoch * t.epochs, lr=t.lr, weight_decay=t.weight_decay)
