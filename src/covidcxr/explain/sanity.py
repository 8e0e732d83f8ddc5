"""Model-randomisation sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

A heatmap that explains the *model* must change when the model's weights are destroyed. We compute
each method's maps for the trained model and for the same architecture with randomised weights and
report the Spearman rank correlation between the two maps of every image:

* ``full``: every weight re-initialised (a fresh ``create_model`` with a fixed seed);
* ``cascading``: re-initialise the classifier head, then the backbone stages one by one from the top
  (output side) down, recording the correlation after each step.

A method whose maps barely change (mean |rho| > ``DEFAULT_FLAG_RHO`` = 0.5 after full randomisation,
or at the last cascading step) is flagged: its maps show image structure (edges, the lung fields),
not what the model learned. A randomised map that is constant (no positive evidence left) shares no
ranking with the trained map and counts as rho = 0 (``n_constant`` says how often that happened).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from covidcxr.errors import CovidCXRError, ConfigError
from covidcxr.explain.cam import CamModel, cam_models, canonical_method, class_index, compute_cams
from covidcxr.models.registry import create_model, get_architecture
from covidcxr.files import write_json
from covidcxr.models.run import LoadedRun, load_run
from covidcxr.plotting import pyplot, save_figure

DEFAULT_FLAG_RHO = 0.5
MODES = ("full", "cascading")


def randomized_full(cm: CamModel, num_classes: int, channels: int, seed: int) -> CamModel:
    """The same architecture with freshly initialised weights."""
    torch.manual_seed(seed)
    model = create_model(cm.architecture, num_classes, channels=channels).eval()
    return CamModel(model=model, architecture=cm.architecture, layer=cm.layer, weight=cm.weight, hflip=cm.hflip)


def _stage_groups(architecture: str, model: nn.Module) -> list[list[str]]:
    """Backbone parameter names per stage, input -> output (the registry's grouping, which covers
    every backbone parameter for timm models; falls back to whole stage modules)."""
    arch = get_architecture(architecture)
    if hasattr(arch, "stage_parameter_names"):
        return arch.stage_parameter_names(model)
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in stage.parameters()] for stage in arch.stages(model)]


def cascade_steps(cm: CamModel) -> list[str]:
    """Names of the cascading steps: ``head``, then ``stage<k>`` from the last stage down."""
    n = len(_stage_groups(cm.architecture, cm.model))
    return ["head"] + [f"stage{k}" for k in range(n - 1, -1, -1)]


def _reset_owners(model: nn.Module, param_names: set[str]) -> None:
    # Re-initialise every module that owns one of the parameters (BatchNorm running stats included).
    owners = {n.rpartition(".")[0] for n in param_names}
    for name, module in model.named_modules():
        if name in owners and hasattr(module, "reset_parameters"):
            module.reset_parameters()


def randomized_cascade(cm: CamModel, steps: int, seed: int) -> CamModel:
    """A copy with the head and the top ``steps - 1`` backbone stages re-initialised."""
    torch.manual_seed(seed)
    model = copy.deepcopy(cm.model).eval()
    arch = get_architecture(cm.architecture)
    head_prefixes = tuple(arch.head(model))
    _reset_owners(model, {n for n, _ in model.named_parameters() if n.startswith(head_prefixes)})
    for group in list(reversed(_stage_groups(cm.architecture, model)))[: max(steps - 1, 0)]:
        _reset_owners(model, set(group))
    return CamModel(model=model, architecture=cm.architecture, layer=cm.layer, weight=cm.weight, hflip=cm.hflip)


def rank_correlations(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    """Spearman rho per image between two N x S x S map stacks; constant maps give 0 (counted)."""
    rhos, constant = [], 0
    for x, y in zip(a, b):
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            rhos.append(0.0)
            constant += 1
        else:
            rhos.append(float(spearmanr(x.ravel(), y.ravel()).statistic))
    return np.asarray(rhos), constant


def _stats(rhos: np.ndarray, constant: int) -> dict:
    return {"mean_rho": float(rhos.mean()), "mean_abs_rho": float(np.abs(rhos).mean()),
            "rho_per_image": rhos.round(4).tolist(), "n_constant": constant}


def sanity_check(run_dir: str | Path, images: Sequence[str | Path], *, methods: Sequence[str] = ("gradcam",),
                 mode: str = "full", target_class: str | None = None, layer: str | None = None, seed: int = 0,
                 flag_rho: float = DEFAULT_FLAG_RHO, batch_size: int = 8, out: str | Path | None = None,
                 allow_non_frontal: bool = False, run: LoadedRun | None = None) -> dict:
    """Correlation of each method's maps before / after weight randomisation; writes ``sanity.json``."""
    from covidcxr.explain.images import prepare_images

    if mode not in MODES:
        raise ConfigError(f"sanity mode {mode!r}: choose one of {MODES}")
    if not images:
        raise CovidCXRError("sanity check: pass the images to compare heatmaps on (a few tens are enough)")
    run = run if run is not None else load_run(run_dir)
    ok, skipped = [], []
    for path, xray, reason in prepare_images(images, run, allow_non_frontal=allow_non_frontal):
        (ok if xray is not None else skipped).append((path, xray) if xray is not None else {"image": str(path), "reason": reason})
    if not ok:
        raise CovidCXRError("sanity check: none of the images could be read: " + "; ".join(s["reason"] for s in skipped))
    inputs = torch.stack([x.tensor for _, x in ok])
    fixed = class_index(run, target_class)
    targets = [fixed if fixed is not None else int(k) for k in run.predict_tensor(inputs).argmax(1)]
    trained = cam_models(run, layer)
    n_classes = len(run.classes)
    result = {"mode": mode, "seed": seed, "flag_rho": flag_rho, "images": [str(p) for p, _ in ok],
              "skipped": skipped, "methods": {}}
    for method in methods:
        method = canonical_method(method)
        reference = compute_cams(run, inputs, method=method, models=trained, class_indices=targets, batch_size=batch_size)
        if mode == "full":
            rand = [randomized_full(cm, n_classes, run.spec.channels, seed + i) for i, cm in enumerate(trained)]
            maps = compute_cams(run, inputs, method=method, models=rand, class_indices=targets, batch_size=batch_size)
            entry = _stats(*rank_correlations(reference, maps))
        else:
            steps = cascade_steps(trained[0])  # ensemble members share the cascade length of the first member
            cascade = []
            for k, name in enumerate(steps, start=1):
                rand = [randomized_cascade(cm, k, seed + i) for i, cm in enumerate(trained)]
                maps = compute_cams(run, inputs, method=method, models=rand, class_indices=targets, batch_size=batch_size)
                cascade.append({"randomized_through": name, **_stats(*rank_correlations(reference, maps))})
            entry = {**{k: v for k, v in cascade[-1].items() if k != "randomized_through"}, "cascade": cascade}
        entry["flagged"] = bool(entry["mean_abs_rho"] > flag_rho)
        result["methods"][method] = entry
    if out is not None:
        out = Path(out)
        write_json(out / "sanity.json", result)
        _plot(result, out / "sanity.png")
    return result


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for method, entry in result["methods"].items():
        if "cascade" in entry:
            xs = [c["randomized_through"] for c in entry["cascade"]]
            ax.plot(xs, [c["mean_abs_rho"] for c in entry["cascade"]], marker="o", label=method)
        else:
            ax.bar(method, entry["mean_abs_rho"])
    ax.axhline(result["flag_rho"], color="red", linestyle="--", linewidth=1, label="flag threshold")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean |Spearman rho|\ntrained vs randomised")
    ax.set_title(f"Model-randomisation sanity check ({result['mode']})", fontsize=10)
    ax.legend(fontsize=7)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=7)
    save_figure(fig, path)
