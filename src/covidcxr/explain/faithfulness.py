"""Faithfulness: does removing what the heatmap marks as important change the prediction?

ROAD (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for Attribution Methods"),
as implemented in ``pytorch_grad_cam.metrics.road``: pixels are removed in order of relevance and
filled by noisy linear imputation (so the removal itself leaks no shape), then the change of the
target class probability is measured.

* ``morf`` (most relevant first): mean change of the probability when the top 10..90 % are removed;
  a faithful map makes it strongly negative.
* ``lerf`` (least relevant first): the same removing the *least* relevant pixels; near zero is good.
* ``combined`` = (lerf - morf) / 2: higher is more faithful (0 = no better than chance ordering).

The library expects the *preprocessed* model input (N x C x S x S), maps at the input size
(N x S x S), one target callable per image, and the model; the imputer adds ``torch.randn`` noise,
so this module seeds torch for reproducible numbers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

DEFAULT_PERCENTILES = (10, 30, 50, 70, 90)


def road_scores(model: nn.Module, inputs: torch.Tensor, cams: np.ndarray, class_indices: list[int], *,
                percentiles=DEFAULT_PERCENTILES, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-image ROAD scores {"morf", "lerf", "combined"} on the target class probability."""
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    cams = np.asarray(cams, dtype=np.float32)
    if cams.shape != (inputs.shape[0], inputs.shape[-2], inputs.shape[-1]):
        raise ValueError(f"cams {cams.shape} must be N x S x S matching inputs {tuple(inputs.shape)}")
    targets = [ClassifierOutputSoftmaxTarget(k) for k in class_indices]
    model.eval()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        morf = ROADMostRelevantFirstAverage(list(percentiles))(inputs, cams, targets, model)
        lerf = ROADLeastRelevantFirstAverage(list(percentiles))(inputs, cams, targets, model)
    finally:
        torch.random.set_rng_state(state)
    morf, lerf = np.asarray(morf, dtype=float), np.asarray(lerf, dtype=float)
    return {"morf": morf, "lerf": lerf, "combined": (lerf - morf) / 2}
