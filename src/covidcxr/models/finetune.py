"""How deep to fine-tune: linear probe, the last k backbone stages, or the whole network.

``apply_finetune(model, architecture, mode, last_k)`` freezes parameters (``requires_grad``) from
the architecture's stage list (``Architecture.stage_parameter_names``), and makes frozen
BatchNorm layers stay in eval mode even after ``model.train()``: a forward pre-hook resets
``training`` on every call, so a linear probe neither updates running statistics nor normalises
with batch statistics the frozen weights never saw. Nothing for the training loop to remember;
calling ``apply_finetune(..., mode="full")`` removes the hooks again.

``param_groups(model, architecture, lr, backbone_lr_mult, weight_decay)`` builds optimizer groups:
the new head at ``lr``, the trainable backbone at ``lr * backbone_lr_mult``, no weight decay on
biases, normalisation weights and other 1-d parameters (timm's rule).

"Last k stages" means: everything from the first parameter of stage ``-k`` to the end of the
network, so layers between the last stage and the head (DenseNet ``norm5``, EfficientNet
``conv_head``, VGG's pretrained fully connected layers) train with the last stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from covidcxr.errors import ConfigError
from covidcxr.models.registry import get_architecture

FinetuneMode = Literal["full", "linear", "last_k"]
FINETUNE_MODES = ("full", "linear", "last_k")


@dataclass(frozen=True)
class FinetunePlan:
    """What :func:`apply_finetune` did, for logging in the run record."""

    mode: str
    last_k: int | None
    n_stages: int
    trainable: tuple[str, ...]  # parameter names
    frozen: tuple[str, ...]
    frozen_norm_layers: tuple[str, ...]  # BatchNorm modules kept in eval mode

    @property
    def n_trainable(self) -> int:
        return len(self.trainable)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "last_k": self.last_k, "n_stages": self.n_stages,
                "trainable_tensors": len(self.trainable), "frozen_tensors": len(self.frozen),
                "frozen_norm_layers": len(self.frozen_norm_layers)}


def _keep_eval(module: nn.Module, args) -> None:
    # Forward pre-hook on a frozen BatchNorm: whatever model.train() set, use running statistics.
    module.training = False


def _remove_keep_eval_hooks(model: nn.Module) -> None:
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _keep_eval:
                del module._forward_pre_hooks[key]


def trainable_parameter_names(model: nn.Module, architecture: str, mode: FinetuneMode = "full",
                              last_k: int = 1) -> tuple[list[str], int]:
    """Names of the parameters ``mode`` trains, and the architecture's number of stages."""
    if mode not in FINETUNE_MODES:
        raise ConfigError(f"finetune.mode={mode!r}: choose one of {FINETUNE_MODES}")
    arch = get_architecture(architecture)
    names = [n for n, _ in model.named_parameters()]
    head = set(arch.head_parameter_names(model))
    if not head:
        raise ConfigError(f"{architecture}: no head parameters found under {arch.head(model)}; is this the right architecture?")
    stages = arch.stage_parameter_names(model)
    if mode == "full":
        return names, len(stages)
    if mode == "linear":
        return [n for n in names if n in head], len(stages)
    if isinstance(last_k, bool) or not isinstance(last_k, int) or not 1 <= last_k <= len(stages):
        raise ConfigError(f"finetune.last_k={last_k!r}: {architecture} has {len(stages)} stages; choose 1..{len(stages)}")
    first = names.index(stages[-last_k][0])
    return [n for i, n in enumerate(names) if i >= first or n in head], len(stages)


def apply_finetune(model: nn.Module, architecture: str, mode: FinetuneMode = "full", last_k: int = 1) -> FinetunePlan:
    """Freeze ``model`` for ``mode`` ("full", "linear" or "last_k") and keep frozen BatchNorm in eval mode."""
    trainable, n_stages = trainable_parameter_names(model, architecture, mode, last_k)
    trainable_set = set(trainable)
    frozen = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable_set)
        if name not in trainable_set:
            frozen.append(name)
    _remove_keep_eval_hooks(model)
    frozen_norms = []
    if frozen:
        first_trainable_module = _first_trainable_module_index(model, trainable_set)
        for index, (name, module) in enumerate(model.named_modules()):
            if not isinstance(module, _BatchNorm):
                continue
            own = list(module.parameters(recurse=False))
            is_frozen = all(not p.requires_grad for p in own) if own else index < first_trainable_module
            if is_frozen:
                module.register_forward_pre_hook(_keep_eval)
                frozen_norms.append(name)
    return FinetunePlan(mode=mode, last_k=last_k if mode == "last_k" else None, n_stages=n_stages,
                        trainable=tuple(trainable), frozen=tuple(frozen), frozen_norm_layers=tuple(frozen_norms))


def _first_trainable_module_index(model: nn.Module, trainable: set[str]) -> int:
    # Position (in named_modules order) of the first module owning a trainable parameter; used for
    # BatchNorm layers without affine parameters, which follow the region they sit in.
    for index, (name, module) in enumerate(model.named_modules()):
        prefix = f"{name}." if name else ""
        if any(f"{prefix}{p}" in trainable for p, _ in module.named_parameters(recurse=False)):
            return index
    return len(list(model.modules()))


def _no_weight_decay(model: nn.Module, name: str, param: nn.Parameter, skip: set[str]) -> bool:
    # timm's rule (timm.optim.param_groups_weight_decay): biases, norm weights, other 1-d tensors.
    return param.ndim <= 1 or name.endswith(".bias") or name in skip


def param_groups(model: nn.Module, architecture: str, lr: float, backbone_lr_mult: float = 1.0,
                 weight_decay: float = 1e-4) -> list[dict]:
    """Optimizer parameter groups over the trainable parameters of ``model``.

    Groups (empty ones left out), each with a ``name`` key for logging: ``head`` / ``head_no_decay``
    at ``lr``; ``backbone`` / ``backbone_no_decay`` at ``lr * backbone_lr_mult``. Biases,
    normalisation weights and other 1-d parameters get no weight decay.
    """
    if not lr > 0:
        raise ConfigError(f"optimizer.lr={lr!r}: must be > 0")
    if not backbone_lr_mult > 0:
        raise ConfigError(f"optimizer.backbone_lr_mult={backbone_lr_mult!r}: must be > 0 (freeze with finetune.mode instead)")
    if not weight_decay >= 0:
        raise ConfigError(f"optimizer.weight_decay={weight_decay!r}: must be >= 0")
    head = set(get_architecture(architecture).head_parameter_names(model))
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    buckets: dict[str, list] = {"head": [], "head_no_decay": [], "backbone": [], "backbone_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = "head" if name in head else "backbone"
        if _no_weight_decay(model, name, param, skip):
            key += "_no_decay"
        buckets[key].append(param)
    groups = []
    for key, params in buckets.items():
        if params:
            groups.append({"name": key, "params": params,
                           "lr": lr if key.startswith("head") else lr * backbone_lr_mult,
                           "weight_decay": 0.0 if key.endswith("no_decay") else weight_decay})
    if not groups:
        raise ConfigError(f"{architecture}: no trainable parameters; check finetune.mode")
    return groups


# ---------------------------------------------------------------- LP-FT (linear probe, then fine-tune)


def lpft_mode(epoch: int, lp_epochs: int, mode: FinetuneMode) -> FinetuneMode:
    """The fine-tuning mode of 0-based ``epoch`` under LP-FT: ``linear`` for the first ``lp_epochs``, then ``mode``."""
    return "linear" if epoch < lp_epochs else mode


def apply_lpft_phase(model: nn.Module, architecture: str, epoch: int, lp_epochs: int, mode: FinetuneMode = "full",
                     last_k: int = 1) -> FinetunePlan:
    """Freeze ``model`` as LP-FT's phase at ``epoch`` says (Kumar et al., ICLR 2022).

    A function of the epoch alone, so a resumed run sets the same phase as an uninterrupted one.
    During the probe the backbone is frozen and its BatchNorm layers stay in eval mode (no running
    statistics change): the head learns on the pretrained features without distorting them.
    Afterwards ``mode`` (full / last_k) applies as usual; the optimiser must hold every parameter
    of that final mode from the start (:func:`param_groups` after ``apply_finetune(model, mode)``),
    frozen ones simply get no gradient.
    """
    return apply_finetune(model, architecture, mode=lpft_mode(epoch, lp_epochs, mode), last_k=last_k)


def is_head_group(group: dict) -> bool:
    """Whether an optimiser group from :func:`param_groups` holds head parameters."""
    return str(group.get("name", "")).startswith("head")
