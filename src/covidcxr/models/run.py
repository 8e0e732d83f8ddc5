"""The run directory: what a trained model *is* in covidcxr.

A run directory holds ``run.json`` (the :class:`~covidcxr.models.record.RunRecord`: architecture,
classes, preprocessing spec, decision threshold, split, provenance, integrity block),
``model.safetensors`` and, for ensembles, member runs under ``members/``. :func:`load_run` is the
one way to get a PyTorch model back; it refuses an edited record and a weights file whose SHA-256
does not match it.

Every model returned here outputs *logits*. An ensemble outputs ``log(mean softmax)`` of its
members, which is a valid logit vector (softmax of it is the averaged probability), so ensembles
load and predict like one model.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from covidcxr.data.preprocess import PreprocessSpec
from covidcxr.errors import CovidCXRError, WeightsError
from covidcxr.models.record import (MODEL_FILE, RUN_JSON, RunRecord, RunSplit, read_run_record, update_run_record,
                                    write_run_record)
from covidcxr.models.registry import create_model
from covidcxr.models.weights import save_weights, sha256_file, verify_recorded_file

__all__ = ["MODEL_FILE", "RUN_JSON", "EnsembleModel", "FlipTTAModel", "LoadedRun", "RunView", "load_run",
           "read_run_record", "save_ensemble", "save_model", "save_weights", "update_run_record"]


def save_model(run_dir: str | Path, model: nn.Module, *, architecture: str, classes: Sequence[str],
               preprocess_spec: PreprocessSpec, positive_class: str | None = None, threshold: float | None = None,
               label_space: dict | None = None, split: RunSplit | None = None, tta: Sequence[str] = (),
               info: dict | None = None, provenance=None) -> Path:
    """Write ``model.safetensors`` + ``run.json`` (through the record's one writer) into ``run_dir``; returns it.

    ``preprocess_spec`` must be resolved (:func:`covidcxr.models.registry.resolve_spec`).
    ``info`` carries free-form provenance (selection metric, training manifest hash and counts, ...);
    ``provenance`` (:class:`covidcxr.models.provenance.Provenance`) the data and config hashes.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(run_dir / MODEL_FILE, model)
    record = RunRecord(
        architecture=architecture, classes=list(classes),
        positive_class=positive_class if positive_class is not None else _default_positive(classes),
        label_space=label_space, preprocess=preprocess_spec.require_resolved(), threshold=threshold,
        model_sha256=sha256_file(run_dir / MODEL_FILE), tta=list(tta), split=split, info=info or {},
        provenance=provenance)
    write_run_record(run_dir, record)
    return run_dir


def save_ensemble(run_dir: str | Path, members: Sequence[str | Path], *, info: dict | None = None,
                  threshold: float | None = None, split: RunSplit | None = None) -> Path:
    """Write an ensemble run whose members are existing run directories (stored relative)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    records = [read_run_record(m) for m in members]
    first = records[0]
    for m, r in zip(members, records):
        if r.classes != first.classes or r.preprocess != first.preprocess or r.tta != first.tta:
            raise CovidCXRError(f"{m}: ensemble members must share classes, preprocessing and test-time augmentation")
    record = RunRecord(
        architecture="ensemble", classes=first.classes, positive_class=first.positive_class,
        label_space=first.label_space, preprocess=first.preprocess, threshold=threshold,
        members=[os.path.relpath(Path(m).resolve(), run_dir.resolve()) for m in members],
        model_sha256=_ensemble_sha([r.model_sha256 for r in records]), split=split, info=info or {})
    write_run_record(run_dir, record)
    return run_dir


def _ensemble_sha(hashes: Iterable[str]) -> str:
    return hashlib.sha256("".join(hashes).encode()).hexdigest()


def _default_positive(classes: Sequence[str]) -> str | None:
    return "covid" if "covid" in classes else None


class EnsembleModel(nn.Module):
    """Averages the members' probabilities; returns log-probabilities (usable as logits)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).softmax(dim=1) for m in self.members]).mean(dim=0)
        return probs.clamp_min(1e-12).log()


class FlipTTAModel(nn.Module):
    """Test-time augmentation ``tta: [hflip]``: the mean of the probabilities for the image and its
    horizontal mirror, returned as log-probabilities (usable as logits). The one flip-TTA: training's
    validation, inference and ONNX export all wrap the network in it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = (self.model(x).softmax(dim=1) + self.model(torch.flip(x, dims=[3])).softmax(dim=1)) / 2
        return probs.clamp_min(1e-12).log()


#: Test-time augmentations a run may record (``RunRecord.tta``), applied by :func:`with_tta`.
TTA_WRAPPERS = {"hflip": FlipTTAModel}


def with_tta(model: nn.Module, tta: Sequence[str]) -> nn.Module:
    for name in tta:
        model = TTA_WRAPPERS[name](model)
    return model


class RunView:
    """What every predictor exposes about its run (shared by the PyTorch and ONNX Runtime backends)."""

    run_dir: Path
    record: RunRecord

    @property
    def spec(self) -> PreprocessSpec:
        return self.record.preprocess

    @property
    def classes(self) -> list[str]:
        return list(self.record.classes)

    @property
    def positive_class(self) -> str | None:
        return self.record.positive_class

    @property
    def positive_index(self) -> int | None:
        return self.record.positive_index

    @property
    def threshold(self) -> float | None:
        return self.record.threshold

    @property
    def model_sha256(self) -> str:
        return self.record.model_sha256

    def decide(self, probs: np.ndarray) -> list[str]:
        return self.record.decide(probs)

    @property
    def lung_finder(self):
        """The run's own lung segmenter (``RUN/segmenter``) when its spec crops to the lungs, else None.

        Loaded once, with its record and weights checked and pinned by ``preprocess.segmenter_sha256``.
        """
        if self.spec.roi == "full":
            return None
        if "_lung_finder" not in self.__dict__:
            from covidcxr.models.lung_finder import RUN_SEGMENTER_DIR, load_lung_finder

            if self.spec.segmenter_sha256 is None:
                raise WeightsError(f"{self.run_dir}: the run crops to the lungs but records no segmenter_sha256")
            # An ensemble's members were trained with the same segmenter (their specs are equal).
            home = self.run_dir / self.record.members[0] if self.record.members else self.run_dir
            self.__dict__["_lung_finder"] = load_lung_finder(home / RUN_SEGMENTER_DIR, self.spec.segmenter_sha256)
        return self.__dict__["_lung_finder"]


@dataclass
class LoadedRun(RunView):
    """A run's PyTorch model, ready to predict exactly as trained (the ``torch`` backend)."""

    run_dir: Path
    model: nn.Module
    record: RunRecord = field(repr=False)
    backend: str = "torch"
    #: An ensemble's member runs (their own directories and records), in ``record.members`` order.
    members: list["LoadedRun"] = field(default_factory=list, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def predict_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """Preprocessed N x C x S x S batch -> N x K class probabilities."""
        self.model.eval()
        batch = batch.to(self.device, memory_format=torch.channels_last)
        return self.model(batch).softmax(dim=1).float().cpu().numpy()

    def predict_arrays(self, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Decoded H x W float images in [0, 1] (as from ``read_xray``) -> N x K class probabilities."""
        from covidcxr.data.preprocess import preprocess

        out = [self.predict_tensor(torch.stack([preprocess(img, self.spec, self.lung_finder)
                                                for img in images[i : i + batch_size]]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu") -> LoadedRun:
    """Load the model of a run directory (single model or ensemble), checking the record and SHA-256s."""
    run_dir = Path(run_dir)
    record = read_run_record(run_dir)
    if record.members:
        members = [load_run(run_dir / m, device=device) for m in record.members]
        if _ensemble_sha([m.model_sha256 for m in members]) != record.model_sha256:
            raise WeightsError(f"{run_dir}: ensemble members changed since the ensemble was written (SHA-256 mismatch)")
        # Members carry their own test-time augmentation; the ensemble averages the wrapped members.
        model = EnsembleModel([m.model for m in members])
    else:
        members = []
        model_path = run_dir / MODEL_FILE
        verify_recorded_file(model_path, record.model_sha256)
        from safetensors.torch import load_file

        model = create_model(record.architecture, len(record.classes), channels=record.channels)
        model.load_state_dict(load_file(str(model_path)), strict=True)
        model = with_tta(model, record.tta)
    # NHWC: oneDNN's depthwise convolutions run 1.2-2x faster than on NCHW (bench/inference_baselines.py);
    # the numbers differ from NCHW only in float rounding.
    model.eval().to(device, memory_format=torch.channels_last)
    run = LoadedRun(run_dir=run_dir, model=model, record=record, members=members)
    run.lung_finder  # noqa: B018 - a missing or changed segmenter stops the load, not the first image
    return run
