"""The lung segmenter: a segmentation-models-pytorch U-Net with a MobileNetV2 encoder, as a run directory.

A segmenter run directory holds ``model.safetensors`` and ``run.json`` with a :class:`SegmenterRecord`
(format ``covidcxr-segmenter/1``). The record is sealed and checked by the same integrity machinery as a
classifier's run record (:mod:`covidcxr.models.record`): an edited record, or weights whose SHA-256 is not
the recorded one, are refused by :func:`load_segmenter`.

The encoder starts from the shared ImageNet MobileNetV2 features (a torchvision ``mobilenet_v2().features``
state dict, SHA-256 checked). smp's ``MobileNetV2Encoder`` *is* a torchvision ``MobileNetV2`` without its
classifier, so its keys are the file's keys with a ``features.`` prefix; the 3-channel stem is summed over
its input channels for the 1-channel (grey) input, which equals feeding the grey value three times.

Inference (:meth:`LoadedSegmenter.predict_mask`) uses the project's one preprocessing pipeline
(:mod:`covidcxr.data.preprocess`: working size -> intensity -> resize -> tensor), resizes the
probability map back to the decoded image's own geometry, thresholds it and keeps the (at most two)
large connected components: the lungs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from covidcxr.data.preprocess import PreprocessSpec, prepare, to_tensor, working_image
from covidcxr.errors import ConfigError, CovidCXRError, WeightsError
from covidcxr.models.record import (MODEL_FILE, RUN_JSON, SEGMENTER_FORMAT, Integrity, RunSplit,
                                    read_sealed_record, write_run_record)
from covidcxr.models.weights import read_state_dict, save_weights, sha256_file, verify_recorded_file

ARCHITECTURE = "smp_unet_mobilenet_v2"
ENCODER_FILE = "mobilenet_v2_imagenet_features_torchvision.pth"
ENCODER_SHA256 = "2f3656925dbcba43a561f7fa0d7f00d433df053f0597ae570d72e2ef6614de20"
#: Lighter than smp's default (256, 128, 64, 32, 16): half the decoder cost at 256 px on a CPU.
DECODER_CHANNELS = (128, 64, 32, 16, 8)
#: ImageNet mean / std averaged over RGB (the grey value stands for all three channels).
GREY_MEAN, GREY_STD = 0.449, 0.226


def _smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise CovidCXRError("lung segmentation needs segmentation-models-pytorch (pip install "
                            "segmentation-models-pytorch)") from exc
    return smp


def build_unet(decoder_channels=DECODER_CHANNELS) -> nn.Module:
    """The U-Net, randomly initialised (encoder_weights=None: smp never downloads anything)."""
    return _smp().Unet("mobilenet_v2", encoder_weights=None, in_channels=1, classes=1,
                       decoder_channels=tuple(decoder_channels))


def encoder_state(path: str | Path, expected_sha256: str = ENCODER_SHA256) -> dict[str, torch.Tensor]:
    """The shared torchvision MobileNetV2 features file mapped to smp encoder keys (1-channel stem)."""
    state = read_state_dict(path, expected_sha256)  # SHA-256 checked, torch.load(weights_only=True)
    mapped = {f"features.{k}": v for k, v in state.items()}
    stem = "features.0.0.weight"
    if stem not in mapped or mapped[stem].ndim != 4 or mapped[stem].shape[1] != 3:
        raise WeightsError(f"{path}: not a torchvision mobilenet_v2().features state dict (no 3-channel stem {stem})")
    mapped[stem] = mapped[stem].sum(dim=1, keepdim=True)
    return mapped


def build_segmenter(encoder_weights: str | Path | None, decoder_channels=DECODER_CHANNELS) -> nn.Module:
    """U-Net whose encoder is loaded (strictly) from ``encoder_weights``; random when None."""
    model = build_unet(decoder_channels)
    if encoder_weights is not None:
        try:
            model.encoder.load_state_dict(encoder_state(encoder_weights), strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{encoder_weights}: does not fit smp's mobilenet_v2 encoder ({exc})") from None
    return model


def segmenter_spec(image_size: int, working_size: int = 512, intensity: str = "clahe") -> PreprocessSpec:
    """The resolved preprocessing spec of a segmenter (1 channel, stretched to a square)."""
    try:
        return PreprocessSpec(image_size=image_size, working_size=working_size, intensity=intensity,
                              resize="stretch", channels=1, mean=(GREY_MEAN,), std=(GREY_STD,))
    except ValidationError as exc:
        raise ConfigError(f"segmenter preprocessing: {exc.errors()[0]['msg']}") from None


# ---------------------------------------------------------------------------- record


class SegmenterRecord(BaseModel):
    """``run.json`` of a lung segmenter: architecture, preprocessing, threshold, provenance, metrics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["covidcxr-segmenter/1"] = SEGMENTER_FORMAT
    kind: Literal["lung_segmenter"] = "lung_segmenter"
    architecture: Literal["smp_unet_mobilenet_v2"] = ARCHITECTURE
    decoder_channels: list[int] = list(DECODER_CHANNELS)
    preprocess: PreprocessSpec
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    #: Predicted components smaller than this share of the largest one are dropped.
    min_component_share: float = Field(0.1, ge=0.0, le=1.0)
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    encoder_init: dict = {}
    config: dict = {}
    data: dict = {}
    split: Optional[RunSplit] = None
    metrics: dict = {}
    info: dict = {}
    integrity: Optional[Integrity] = None


def _segmenter_format(path: Path, raw) -> None:
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if fmt != SEGMENTER_FORMAT:
        raise CovidCXRError(f"{path}: run format {fmt!r} is not a lung segmenter ({SEGMENTER_FORMAT!r}); "
                            "train one with `covidcxr segment train`")


def read_segmenter_record(run_dir: str | Path, *, verify: bool = True) -> SegmenterRecord:
    """Read and integrity-check a segmenter's ``run.json`` (the classifier's reader and checks)."""
    return read_sealed_record(run_dir, SegmenterRecord, verify=verify, check_format=_segmenter_format,
                              what="segmenter record", missing=f"not a segmenter run directory (no {RUN_JSON}); "
                                                               "train one with `covidcxr segment train`")


def save_segmenter(run_dir: str | Path, model: nn.Module, **fields) -> SegmenterRecord:
    """Write ``model.safetensors`` and the sealed ``run.json`` (``fields``: SegmenterRecord fields)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(run_dir / MODEL_FILE, model)
    record = SegmenterRecord(model_sha256=sha256_file(run_dir / MODEL_FILE), **fields)
    return write_run_record(run_dir, record)


# ---------------------------------------------------------------------------- inference


def keep_lungs(mask: np.ndarray, min_share: float, max_components: int = 2) -> np.ndarray:
    """The at most ``max_components`` largest components of a bool mask, each >= ``min_share`` of the largest."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros(mask.shape, dtype=bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(areas)[::-1][:max_components]
    keep = [i + 1 for i in order if areas[i] >= min_share * areas[order[0]]]
    return np.isin(labels, keep)


@dataclass
class LoadedSegmenter:
    """A segmenter ready to predict: the model (eval mode), its preprocessing and post-processing."""

    model: nn.Module
    spec: PreprocessSpec
    threshold: float = 0.5
    min_component_share: float = 0.1
    record: SegmenterRecord | None = None

    def prepared(self, pixels: np.ndarray) -> np.ndarray:
        """Decoded float image -> the S x S uint16 input image (the project's pipeline)."""
        return prepare(working_image(pixels, self.spec.working_size), self.spec)

    @torch.no_grad()
    def probabilities(self, prepared: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """Lung probability maps (N x S x S) of prepared images."""
        batch = torch.stack([to_tensor(p, self.spec) for p in prepared])
        self.model.eval()
        return torch.sigmoid(self.model(batch))[:, 0].numpy()

    def mask_from_probability(self, prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """S x S probabilities -> bool lung mask in an H x W image's geometry."""
        h, w = shape
        full = cv2.resize(prob.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        return keep_lungs(full >= self.threshold, self.min_component_share)

    def predict_masks(self, images: list[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """Bool lung masks, each in its decoded image's own geometry."""
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            probs = self.probabilities([self.prepared(p) for p in chunk])
            out += [self.mask_from_probability(q, p.shape[:2]) for q, p in zip(probs, chunk)]
        return out


def load_segmenter(run_dir: str | Path) -> LoadedSegmenter:
    """Load a segmenter run directory; refuses an edited record and weights that do not match it."""
    run_dir = Path(run_dir)
    record = read_segmenter_record(run_dir)
    model_path = run_dir / MODEL_FILE
    verify_recorded_file(model_path, record.model_sha256)
    from safetensors.torch import load_file

    model = build_unet(record.decoder_channels)
    model.load_state_dict(load_file(str(model_path)), strict=True)
    return LoadedSegmenter(model=model.eval(), spec=record.preprocess, threshold=record.threshold,
                           min_component_share=record.min_component_share, record=record)
