"""Training objectives (``train.objective``): cross-entropy, group DRO, within-source pairwise AUC.

Every objective is called once per training batch as ``objective(logits, soft_targets, targets, groups)``:
``logits`` N x K (float32), ``soft_targets`` N x K (one-hot unless mixup / cutmix), ``targets`` the
N integer classes and ``groups`` the N integer (source, class) cell ids of the batch's images
(:func:`cell_ids`). It returns the scalar loss to back-propagate. Objectives with state (group DRO's
group weights) expose ``state_dict()`` / ``load_state_dict()``; the training checkpoint stores it,
so a resumed run continues bit-identically.

* ``ce``: ``F.cross_entropy`` with the class weights (``train.loss_weighting``) and label smoothing,
  exactly what training always did.
* ``group_dro`` (Sagawa et al., ICLR 2020, online algorithm): groups are the training cells
  (source, class). Each batch's per-group mean loss ``L_g`` updates the group weights
  ``q_g <- q_g * exp(dro_eta * L_g)`` (then renormalised) and the loss is ``sum_g q_g L_g`` over the
  groups in the batch, so the worst-fitted cells (e.g. IEEE8023 non-COVID, Figure1 normal) get the
  gradient instead of the easy "this is NIH" cells.
* ``within_source_auc``: a logistic pairwise surrogate of the within-source AUC: for every positive
  i and negative j of the SAME source in the batch, ``softplus(-(s_i - s_j))`` with ``s`` the positive
  class's log-odds; mean over pairs, plus ``auc_ce_weight`` x cross-entropy (which keeps the scores
  calibrated-ish and uses the one-class sources at all). Pairs across sources never enter the
  pairwise term, so "which collection" cannot lower it. Batches without a same-source pair give only
  the cross-entropy term; use ``train.sampler: source_balanced`` so that every batch holds pairs.
  With ``train.auc_abnormal_weight`` w > 0 a second pairwise term, w x the mean of
  ``softplus(-(s_i - s_j))`` over abnormal non-positive i (manifest label not ``normal``: pneumonia,
  other) and normal j of the same source, ranks lung disease above normal lungs inside every source
  (NIH, Kermany, ieee8023, Figure1). Why: the first term ranks COVID above the other images of the
  COVID sources, most of them pneumonias, and says almost nothing about normal lungs there (ieee8023
  holds 11 normals); out of fold the main recipe scored those normals *higher* than the pneumonias
  (mean P(covid) 0.80 against 0.60). A hospital's own COVID vs normal is the contrast that needs it.
  The order covid > pneumonia > normal is consistent with a perfect COVID-vs-rest AUC. Measured out
  of fold (weight 1, seed 0; bench/results/oof_contrasts.json): it did not lower the normals'
  P(covid) and cost about 0.05 within-source AUC, so no shipped config uses it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from covidcxr.errors import ConfigError
from covidcxr.training.config import TrainingConfig

OBJECTIVES = ("ce", "group_dro", "within_source_auc", "label_decomposition")


def cell_ids(sources: Sequence, targets: Sequence[int], kinds: Sequence[int] | None = None
             ) -> tuple[np.ndarray, list[tuple]]:
    """Integer id of each item's (source, class) cell - (source, class, kind) with ``kinds`` - and the sorted cells."""
    if kinds is None:
        pairs = [(str(s), int(t)) for s, t in zip(sources, targets)]
    else:
        pairs = [(str(s), int(t), int(k)) for s, t, k in zip(sources, targets, kinds)]
    cells = sorted(set(pairs))
    index = {c: i for i, c in enumerate(cells)}
    return np.asarray([index[p] for p in pairs], dtype=np.int64), cells


def source_ids(cells: list[tuple]) -> torch.Tensor:
    """Source index of each cell (cells of the same source share it)."""
    names = sorted({c[0] for c in cells})
    return torch.tensor([names.index(c[0]) for c in cells], dtype=torch.long)


def abnormal_kinds(labels: Sequence[str]) -> np.ndarray:
    """1 for an image whose manifest label is not ``normal`` (lung disease of any kind), 0 for a normal one."""
    return (np.asarray(labels, dtype=object).astype(str) != "normal").astype(np.int64)


class CrossEntropy:
    name = "ce"

    def __init__(self, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0):
        self.weights, self.label_smoothing = class_weights, float(label_smoothing)

    def to(self, device) -> "CrossEntropy":
        if self.weights is not None:
            self.weights = self.weights.to(device)
        return self

    def __call__(self, logits, soft, targets, groups) -> torch.Tensor:
        return F.cross_entropy(logits, soft, weight=self.weights, label_smoothing=self.label_smoothing)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def summary(self) -> dict:
        return {"name": self.name}


class GroupDRO(CrossEntropy):
    """Online group DRO over (source, class) cells; ``q`` (the group weights) is the state."""

    name = "group_dro"

    def __init__(self, n_groups: int, eta: float, class_weights=None, label_smoothing: float = 0.0,
                 cells: list | None = None):
        super().__init__(class_weights, label_smoothing)
        if n_groups < 1:
            raise ConfigError("train.objective=group_dro: no training groups")
        self.n_groups, self.eta = int(n_groups), float(eta)
        self.q = torch.full((self.n_groups,), 1.0 / self.n_groups, dtype=torch.float32)
        self.cells = cells

    def to(self, device) -> "GroupDRO":
        super().to(device)
        self.q = self.q.to(device)
        return self

    def group_losses(self, logits, soft, groups) -> tuple[torch.Tensor, torch.Tensor]:
        per_item = F.cross_entropy(logits, soft, weight=self.weights, label_smoothing=self.label_smoothing,
                                   reduction="none")
        one_hot = F.one_hot(groups, self.n_groups).to(per_item.dtype)  # N x G
        counts = one_hot.sum(0)
        sums = (one_hot * per_item[:, None]).sum(0)
        present = counts > 0
        return torch.where(present, sums / counts.clamp_min(1), torch.zeros_like(sums)), present

    def __call__(self, logits, soft, targets, groups) -> torch.Tensor:
        losses, present = self.group_losses(logits, soft, groups)
        with torch.no_grad():
            step = torch.where(present, self.eta * losses.detach(), torch.zeros_like(losses))
            if torch.isfinite(step).all():  # a NaN loss stops training; it must not poison q first
                q = self.q * torch.exp(step)
                self.q = q / q.sum()
        return (self.q.detach() * losses).sum()

    def state_dict(self) -> dict:
        return {"q": self.q.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if "q" in state:
            if state["q"].shape != self.q.shape:
                raise ConfigError(f"group DRO state has {state['q'].numel()} groups, this run {self.n_groups}; "
                                  "resume with the same data")
            self.q = state["q"].to(self.q.device, torch.float32).clone()

    def summary(self) -> dict:
        q = self.q.detach().cpu().tolist()
        out = {"name": self.name, "eta": self.eta, "group_weights": q}
        if self.cells is not None:
            out["groups"] = [f"{s}|{c}" for s, c in self.cells]
        return out


def _mean_pair_loss(s: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean of ``softplus(-(s_i - s_j))`` over the pairs (i, j) that ``valid`` marks, and their number."""
    n = int(valid.sum())
    if not n:
        return s.sum() * 0.0, 0  # keeps the graph (and the device) without a pair
    return F.softplus(-(s[:, None] - s[None, :]))[valid].mean(), n


class WithinSourcePairwise(CrossEntropy):
    """Logistic pairwise loss over same-source positive / negative pairs + ``ce_weight`` x cross-entropy."""

    name = "within_source_auc"

    def __init__(self, positive: int, group_source: torch.Tensor, ce_weight: float = 0.5, class_weights=None,
                 label_smoothing: float = 0.0, group_abnormal: torch.Tensor | None = None,
                 abnormal_weight: float = 0.0):
        super().__init__(class_weights, label_smoothing)
        self.positive, self.ce_weight = int(positive), float(ce_weight)
        self.group_source = group_source
        self.abnormal_weight = float(abnormal_weight)
        if self.abnormal_weight > 0 and group_abnormal is None:
            raise ConfigError("train.auc_abnormal_weight > 0 needs the cells' abnormal / normal kind")
        self.group_abnormal = group_abnormal
        self.last_pairs = self.last_abnormal_pairs = 0

    def to(self, device) -> "WithinSourcePairwise":
        super().to(device)
        self.group_source = self.group_source.to(device)
        if self.group_abnormal is not None:
            self.group_abnormal = self.group_abnormal.to(device)
        return self

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-odds of the positive class (binary: logit difference)."""
        others = [k for k in range(logits.shape[1]) if k != self.positive]
        return logits[:, self.positive] - torch.logsumexp(logits[:, others], dim=1)

    def pairwise(self, logits, targets, groups) -> torch.Tensor:
        s = self.scores(logits)
        src = self.group_source[groups]
        pos = targets == self.positive
        valid = (src[:, None] == src[None, :]) & pos[:, None] & ~pos[None, :]  # i positive, j negative, same source
        loss, self.last_pairs = _mean_pair_loss(s, valid)
        return loss

    def abnormal_pairwise(self, logits, targets, groups) -> torch.Tensor:
        """Mean logistic loss over (abnormal non-positive i, normal j) pairs of the same source."""
        s = self.scores(logits)
        src = self.group_source[groups]
        negative = targets != self.positive
        abnormal = self.group_abnormal[groups].bool()
        valid = (src[:, None] == src[None, :]) & (negative & abnormal)[:, None] & (negative & ~abnormal)[None, :]
        loss, self.last_abnormal_pairs = _mean_pair_loss(s, valid)
        return loss

    def __call__(self, logits, soft, targets, groups) -> torch.Tensor:
        loss = self.pairwise(logits, targets, groups)
        if self.abnormal_weight > 0:
            loss = loss + self.abnormal_weight * self.abnormal_pairwise(logits, targets, groups)
        if self.ce_weight > 0:
            loss = loss + self.ce_weight * super().__call__(logits, soft, targets, groups)
        return loss

    def summary(self) -> dict:
        return {"name": self.name, "ce_weight": self.ce_weight, "abnormal_weight": self.abnormal_weight}


def build_objective(config: TrainingConfig, *, class_weights: torch.Tensor | None, sources: Sequence,
                    targets: Sequence[int], classes: Sequence[str], positive: str | None,
                    labels: Sequence[str] | None = None) -> tuple[CrossEntropy, np.ndarray]:
    """The objective ``train.objective`` names and the cell id of every training item.

    ``labels`` (the manifest's label of every item) is needed by ``train.auc_abnormal_weight`` only."""
    t = config.train
    groups, cells = cell_ids(sources, targets)
    if t.objective == "ce":
        return CrossEntropy(class_weights, t.label_smoothing), groups
    if t.objective == "group_dro":
        return GroupDRO(len(cells), t.dro_eta, class_weights, t.label_smoothing, cells), groups
    if t.objective == "label_decomposition":
        from covidcxr.training.decomposition import LabelDecomposition

        return LabelDecomposition(classes, cells, t.decomposition_covid_weight), groups
    if positive is None or positive not in classes:
        raise ConfigError("config key train.objective: within_source_auc needs a label space with a positive class "
                          "(e.g. binary covid vs non-covid)")
    pos = list(classes).index(positive)
    mixed = {s for s, c in cells if c == pos} & {s for s, c in cells if c != pos}
    if not mixed:
        raise ConfigError("config key train.objective: within_source_auc needs training sources that hold both "
                          f"{positive} and non-{positive} images; none does")
    if t.auc_abnormal_weight <= 0:
        return WithinSourcePairwise(pos, source_ids(cells), t.auc_ce_weight, class_weights, t.label_smoothing), groups
    if labels is None or len(labels) != len(targets):
        raise ConfigError("train.auc_abnormal_weight > 0 needs the manifest label of every training image")
    groups, cells = cell_ids(sources, targets, abnormal_kinds(labels))  # cells (source, class, abnormal)
    if not {s for s, c, k in cells if c != pos and k} & {s for s, c, k in cells if c != pos and not k}:
        raise ConfigError("config key train.auc_abnormal_weight: no training source holds both normal and abnormal "
                          f"non-{positive} images (manifest label 'normal' against any other); set it to 0")
    group_abnormal = torch.tensor([k for _, _, k in cells], dtype=torch.long)
    return WithinSourcePairwise(pos, source_ids(cells), t.auc_ce_weight, class_weights, t.label_smoothing,
                                group_abnormal, t.auc_abnormal_weight), groups
