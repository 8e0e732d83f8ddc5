"""Class activation maps (Grad-CAM family) for any covidcxr run, ensembles included.

The CAM algorithms come from the ``grad-cam`` library (``pytorch_grad_cam``); this module only
decides *which* model, layer and class they look at:

* the target layer is the architecture's default (``Architecture.cam_layer``) or a module name;
* the target class is the run's positive class (e.g. ``covid``), a named class, or the predicted one;
* an ensemble's map is the average of its members' maps, each computed on the member's own layer;
* :func:`to_original_geometry` maps a map computed at the model input size back onto the stored
  image, undoing the letterbox padding when the run was trained with ``resize="letterbox"``.

Every map is the library's output: non-negative, min-max scaled to [0, 1] per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from covidcxr.data.preprocess import PreprocessSpec, letterbox_box
from covidcxr.errors import ConfigError
from covidcxr.models.registry import get_architecture
from covidcxr.models.run import FlipTTAModel, LoadedRun


def _cam_classes() -> dict[str, type]:
    import pytorch_grad_cam as pgc

    return {
        "gradcam": pgc.GradCAM,
        "gradcam++": pgc.GradCAMPlusPlus,
        "hirescam": pgc.HiResCAM,
        "scorecam": pgc.ScoreCAM,
        "eigencam": pgc.EigenCAM,
        "layercam": pgc.LayerCAM,
        "xgradcam": pgc.XGradCAM,
        "eigengradcam": pgc.EigenGradCAM,
    }


#: Names accepted by ``method=`` (lower case), mapped to pytorch_grad_cam classes on first use.
METHODS = ("gradcam", "gradcam++", "hirescam", "scorecam", "eigencam", "layercam", "xgradcam", "eigengradcam")


def cam_class(method: str) -> type:
    """The pytorch_grad_cam class registered as ``method``."""
    classes = _cam_classes()
    key = method.lower().replace("_", "").replace("-", "")
    key = {"gradcampp": "gradcam++", "gradcamplusplus": "gradcam++"}.get(key, key)
    if key not in classes:
        raise ConfigError(f"CAM method {method!r}: choose one of {', '.join(METHODS)}")
    return classes[key]


def canonical_method(method: str) -> str:
    cls = cam_class(method)
    return next(name for name, c in _cam_classes().items() if c is cls)


@dataclass
class CamModel:
    """One network whose CAM is computed: the model, its architecture name and its target layer name."""

    model: nn.Module
    architecture: str
    layer: str
    weight: float = 1.0  # share in the ensemble average
    hflip: bool = False  # explain the mirrored input (flip-TTA runs), map mirrored back


def module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ConfigError("target layer is not a sub-module of the model")


def resolve_layer(model: nn.Module, architecture: str, layer: str | None = None) -> str:
    """Name of the target layer: ``layer`` if given (checked), else the architecture's CAM layer."""
    if layer:
        try:
            model.get_submodule(layer)
        except AttributeError:
            names = [n for n, m in model.named_modules() if n and len(list(m.children())) > 0][-8:]
            raise ConfigError(f"layer {layer!r} is not a module of {architecture}; e.g. {', '.join(names)}") from None
        return layer
    return module_name(model, get_architecture(architecture).cam_layer(model))


def cam_models(run: LoadedRun, layer: str | None = None, weight: float = 1.0) -> list[CamModel]:
    """The networks of a run, flattened through ensembles (``run.members``), each with its target layer."""
    if run.members:
        return [c for m in run.members for c in cam_models(m, layer, weight / len(run.members))]
    model, arch = run.model, run.record.architecture
    if isinstance(model, FlipTTAModel):
        # The run averages the image and its mirror: explain the network on both, the mirror's map flipped back.
        net = model.model
        name = resolve_layer(net, arch, layer)
        return [CamModel(model=net, architecture=arch, layer=name, weight=weight / 2, hflip=flip) for flip in (False, True)]
    return [CamModel(model=model, architecture=arch, layer=resolve_layer(model, arch, layer), weight=weight)]


def class_index(run: LoadedRun, target_class: str | None) -> int | None:
    """Index of the class to explain: ``target_class``, else the positive class, else None (= predicted)."""
    if target_class is not None:
        if target_class not in run.classes:
            raise ConfigError(f"target class {target_class!r}: the run's classes are {run.classes}")
        return run.classes.index(target_class)
    return run.positive_index


def compute_cams(run: LoadedRun, inputs: torch.Tensor, *, method: str = "gradcam", target_class: str | None = None,
                 layer: str | None = None, batch_size: int = 8, models: list[CamModel] | None = None,
                 class_indices: list[int] | None = None) -> np.ndarray:
    """CAMs of preprocessed ``inputs`` (N x C x S x S) -> float32 N x S x S in [0, 1].

    ``class_indices`` (one per input) overrides ``target_class``; otherwise the target class is the
    named class, else the run's positive class, else each image's predicted class.
    ``models`` lets a caller pass :func:`cam_models` of a modified (e.g. randomised) copy of the run.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if inputs.ndim != 4:
        raise ConfigError(f"inputs must be N x C x S x S, got shape {tuple(inputs.shape)}")
    if class_indices is None:
        idx = class_index(run, target_class)
        if idx is None:
            class_indices = [int(k) for k in run.predict_tensor(inputs).argmax(1)]
        else:
            class_indices = [idx] * len(inputs)
    models = models if models is not None else cam_models(run, layer)
    cls = cam_class(method)
    total = np.zeros((len(inputs), inputs.shape[-2], inputs.shape[-1]), dtype=np.float32)
    for cm in models:
        cm.model.eval()
        cam = cls(model=cm.model, target_layers=[cm.model.get_submodule(cm.layer)])
        cam.batch_size = batch_size  # ScoreCAM: forward passes per batch
        try:
            with torch.enable_grad():
                for i in range(0, len(inputs), batch_size):
                    targets = [ClassifierOutputTarget(k) for k in class_indices[i : i + batch_size]]
                    batch = inputs[i : i + batch_size].to(next(cm.model.parameters()).device)
                    # An input that requires grad keeps the graph even for a model with frozen weights.
                    batch = batch.detach().clone()
                    if cm.hflip:
                        batch = torch.flip(batch, dims=[3])
                    batch.requires_grad_(cam.uses_gradients)
                    maps = cam(input_tensor=batch, targets=targets)
                    total[i : i + batch_size] += cm.weight * (maps[..., ::-1] if cm.hflip else maps)
        finally:
            cam.activations_and_grads.release()
            cm.model.zero_grad(set_to_none=True)
    if len(models) > 1:
        total = _rescale(total)
    return total


def _rescale(maps: np.ndarray) -> np.ndarray:
    # Same per-image min-max scaling the library applies to a single model's map.
    lo = maps.reshape(len(maps), -1).min(1)[:, None, None]
    hi = maps.reshape(len(maps), -1).max(1)[:, None, None]
    return ((maps - lo) / np.maximum(hi - lo, 1e-7)).astype(np.float32)


def heatmaps(run: LoadedRun, inputs, *, method: str = "gradcam", class_indices: list[int] | None = None,
             target_class: str | None = None, layer: str | None = None, models: list[CamModel] | None = None,
             batch_size: int = 8) -> list[np.ndarray]:
    """The one heatmap function: CAMs of prepared inputs (:class:`~covidcxr.models.predict.PreparedInput`)
    mapped back onto each input's image geometry (``input.pixels``: the file's aspect and orientation,
    letterbox padding removed), float32 H x W in [0, 1]."""
    inputs = list(inputs)
    if not inputs:
        return []
    cams = compute_cams(run, torch.stack([x.tensor for x in inputs]), method=method, target_class=target_class,
                        layer=layer, batch_size=batch_size, models=models, class_indices=class_indices)
    return [to_original_geometry(c, x.pixels.shape, run.spec) for c, x in zip(cams, inputs)]


def to_original_geometry(cam: np.ndarray, shape: tuple[int, int], spec: PreprocessSpec) -> np.ndarray:
    """Map an S x S map (model input geometry) onto the H x W stored image the input came from."""
    h, w = int(shape[0]), int(shape[1])
    cam = np.asarray(cam, dtype=np.float32)
    if spec.resize == "letterbox":
        top, left, nh, nw = letterbox_box(h, w, cam.shape[0])
        cam = cam[top : top + nh, left : left + nw]
    return np.clip(cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
