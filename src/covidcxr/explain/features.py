"""Intermediate activation maps of chosen layers for one image (forward hooks), as a grid figure.

Each row is one layer; the columns are its ``max_channels`` most active channels (highest mean
activation on this image), each scaled to its own range and shown at the input geometry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.files import write_json
from covidcxr.models.predict import prepare_input
from covidcxr.models.run import LoadedRun, load_run
from covidcxr.plotting import pyplot, save_figure


def activations(model: torch.nn.Module, inputs: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Outputs of the named sub-modules for ``inputs`` (one forward pass, hooks removed afterwards)."""
    captured, handles = {}, []
    for name in layers:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"layer {name!r} is not a module of this model; names look like "
                              f"{', '.join(n for n, _ in list(model.named_children())[:6])}") from None
        handles.append(module.register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach())))
    try:
        with torch.no_grad():
            model.eval()(inputs)
    finally:
        for h in handles:
            h.remove()
    for name, act in captured.items():
        if act.ndim != 4:
            raise ConfigError(f"layer {name!r} outputs shape {tuple(act.shape)}, not a feature map (N x C x H x W)")
    return captured


def feature_maps(run_dir: str | Path, image: str | Path, layers: Sequence[str], *, max_channels: int = 8,
                 out: str | Path | None = None, run: LoadedRun | None = None) -> dict:
    """Grid figure ``<stem>_features.png`` of the most active channels of each layer; returns what it drew."""
    if not layers:
        raise ConfigError("feature maps: name at least one layer (e.g. 'blocks.3' or 'layer2')")
    run = run if run is not None else load_run(run_dir)
    xray = prepare_input(image, run.spec, lung_finder=run.lung_finder)
    acts = activations(run.model, xray.tensor.unsqueeze(0).to(run.device), layers)
    missing = [n for n in layers if n not in acts]
    if missing:
        raise CovidCXRError(f"layers {missing} did not run on this input (not on the forward path)")
    chosen = {}
    for name in layers:
        a = acts[name][0].float().cpu().numpy()
        order = np.argsort(-a.reshape(len(a), -1).mean(1))[:max_channels]
        chosen[name] = (a, order)
    out = Path(out) if out is not None else Path(run_dir) / "explain"
    path = out / f"{Path(image).stem}_features.png"
    _draw(xray.pixels, chosen, path, run.spec.image_size)
    result = {"image": str(image), "figure": path.name,
              "layers": {n: {"shape": list(acts[n].shape[1:]), "channels": order.tolist()} for n, (_, order) in chosen.items()}}
    write_json(out / f"{Path(image).stem}_features.json", result)
    return result


def _draw(pixels, chosen: dict, path: Path, size: int) -> None:
    import cv2
    plt = pyplot()

    cols = 1 + max(len(order) for _, order in chosen.values())
    rows = len(chosen)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    small = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)
    for r, (name, (a, order)) in enumerate(chosen.items()):
        axes[r, 0].imshow(small, cmap="gray")
        axes[r, 0].set_title(f"{name}\n{a.shape[0]} ch, {a.shape[1]}x{a.shape[2]}", fontsize=7)
        for c, ch in enumerate(order, start=1):
            axes[r, c].imshow(a[ch], cmap="viridis", interpolation="nearest")
            axes[r, c].set_title(f"ch {ch}", fontsize=7)
    save_figure(fig, path)
