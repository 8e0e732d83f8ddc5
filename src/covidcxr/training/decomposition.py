"""Label decomposition (``train.objective: label_decomposition``): two contrasts that sources cannot explain.

In the shared data COVID-19 images come from two collections (ieee8023, Figure1) and the rest from
collections without COVID, so "COVID vs the rest" is also "these collections vs those" and a model
learns the collection. Two contrasts exist *inside* single sources, though:

* **abnormal vs normal** - pneumonia against normal images inside every source that holds both
  (Kermany and NIH in the shared data; ieee8023 and Figure1 add a few);
* **COVID vs other pneumonia** - inside every source that holds both (ieee8023, Figure1).

With the 3-class softmax ``(normal, pneumonia, covid)`` the model's probabilities factor as
``P(abnormal) = 1 - p_normal`` and ``P(covid | abnormal) = p_covid / (p_covid + p_pneumonia)``, and
their product *is* ``p_covid``, the score every covidcxr tool reads. This objective trains the two
factors only on their within-source contrasts:

    loss = BCE(P(abnormal); normal / pneumonia items of sources holding both)
           + decomposition_covid_weight x BCE(P(covid | abnormal); covid / pneumonia items of sources holding both)

Everything else in a batch - COVID images against normals, one-class sources such as RSNA - gives no
gradient. With ``train.sampler: source_balanced`` each class gets an equal share of its source's
draws, so inside each term the source says nothing about the label. ``sampler: source_balanced`` is
therefore required; set ``train.single_class_source_weight: 0`` to stop drawing one-class sources,
which this objective cannot use.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from covidcxr.errors import ConfigError

REQUIRED_CLASSES = ("normal", "pneumonia", "covid")


def contrast_cells(cells: list[tuple[str, int]], a: int, b: int) -> torch.Tensor:
    """Bool per cell: class ``a`` or ``b`` of a source that holds both."""
    by_source: dict[str, set[int]] = {}
    for s, c in cells:
        by_source.setdefault(s, set()).add(c)
    return torch.tensor([c in (a, b) and {a, b} <= by_source[s] for s, c in cells], dtype=torch.bool)


class LabelDecomposition:
    """``P(abnormal)`` and ``P(covid | abnormal)`` trained on their within-source contrasts only."""

    name = "label_decomposition"

    def __init__(self, classes: Sequence[str], cells: list[tuple[str, int]], covid_weight: float = 1.0):
        missing = [c for c in REQUIRED_CLASSES if c not in classes]
        if missing:
            raise ConfigError(f"train.objective=label_decomposition needs the classes {list(REQUIRED_CLASSES)} "
                              f"(data.label_space=3class); the label space lacks {missing}")
        self.normal, self.pneumonia, self.covid = (list(classes).index(c) for c in REQUIRED_CLASSES)
        self.cells, self.covid_weight = cells, float(covid_weight)
        self.abnormal_cells = contrast_cells(cells, self.normal, self.pneumonia)
        self.covid_cells = contrast_cells(cells, self.covid, self.pneumonia)
        for what, mask in (("pneumonia and normal", self.abnormal_cells), ("COVID and pneumonia", self.covid_cells)):
            if not mask.any():
                raise ConfigError(f"train.objective=label_decomposition: no training source holds both {what} "
                                  "images, so that contrast cannot be learned inside a source")
        self.last_items = (0, 0)

    def to(self, device) -> "LabelDecomposition":
        self.abnormal_cells, self.covid_cells = self.abnormal_cells.to(device), self.covid_cells.to(device)
        return self

    @staticmethod
    def _bce(log_yes: torch.Tensor, log_no: torch.Tensor, yes: torch.Tensor) -> torch.Tensor:
        return -torch.where(yes, log_yes, log_no)

    def __call__(self, logits, soft, targets, groups) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1)
        log_abnormal = torch.logsumexp(logp[:, [self.pneumonia, self.covid]], dim=1)
        in_abn, in_cov = self.abnormal_cells[groups], self.covid_cells[groups]
        self.last_items = (int(in_abn.sum()), int(in_cov.sum()))
        loss = logits.sum() * 0.0  # a batch with neither contrast gives no gradient, not an error
        if in_abn.any():
            loss = loss + self._bce(log_abnormal, logp[:, self.normal], targets != self.normal)[in_abn].mean()
        if in_cov.any():
            log_cov = logp[:, self.covid] - log_abnormal
            log_pneu = logp[:, self.pneumonia] - log_abnormal
            loss = loss + self.covid_weight * self._bce(log_cov, log_pneu, targets == self.covid)[in_cov].mean()
        return loss

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def summary(self) -> dict:
        name = {self.normal: "normal", self.pneumonia: "pneumonia", self.covid: "covid"}
        pick = lambda mask: [f"{s}|{name.get(c, c)}" for (s, c), m in zip(self.cells, mask.tolist()) if m]  # noqa: E731
        return {"name": self.name, "covid_weight": self.covid_weight,
                "abnormal_contrast_cells": pick(self.abnormal_cells), "covid_contrast_cells": pick(self.covid_cells)}
