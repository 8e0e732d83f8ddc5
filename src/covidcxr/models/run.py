"""The run directory: what a trained model *is* in covidcxr.

A run directory holds ``run.json`` (architecture, classes, preprocessing spec, decision threshold,
selection metric, data provenance), ``model.safetensors`` and its SHA-256, and for ensembles the
member runs under ``members/``. :func:`load_run` is the one way to get a model back; it refuses a
weights file whose SHA-256 does not match the record.

Every model returned here outputs *logits*. An ensemble outputs ``log(mean softmax)`` of its
members, which is a valid logit vector (softmax of it is the averaged probability), so ensembles
load and predict like one model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from covidcxr.data.preprocess import PreprocessSpec, preprocess
from covidcxr.errors import CovidCXRError, WeightsError
from covidcxr.models.registry import create_model
from covidcxr.models.weights import sha256_file
from covidcxr.files import atomic_write_bytes, json_default, write_json  # noqa: F401  (re-exported)

RUN_JSON = "run.json"
MODEL_FILE = "model.safetensors"


def save_weights(path: str | Path, model: nn.Module) -> None:
    """Write ``model``'s state dict as safetensors, atomically (temporary file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def save_model(run_dir: str | Path, model: nn.Module, *, architecture: str, classes: Sequence[str],
               preprocess_spec: PreprocessSpec, positive_class: str | None = None,
               threshold: float | None = None, info: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``run.json`` into ``run_dir`` and return the directory.

    ``info`` carries everything else worth keeping with the model (selection metric, training
    manifest hash and counts, threshold method, ...); it is stored under ``run.json["info"]``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(run_dir / MODEL_FILE, model)
    channels = preprocess_spec.channels
    record = {
        "format": "covidcxr-run/1",
        "architecture": architecture,
        "channels": channels,
        "classes": list(classes),
        "positive_class": positive_class if positive_class is not None else _default_positive(classes),
        "preprocess": preprocess_spec.to_dict(),
        "threshold": threshold,
        "model_sha256": sha256_file(run_dir / MODEL_FILE),
        "info": info or {},
    }
    write_json(run_dir / RUN_JSON, record)
    return run_dir


def save_ensemble(run_dir: str | Path, members: Sequence[str | Path], *, info: dict | None = None,
                  threshold: float | None = None) -> Path:
    """Write an ensemble run whose members are existing run directories (stored relative)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    records = [read_run_record(m) for m in members]
    first = records[0]
    for m, r in zip(members, records):
        if r["classes"] != first["classes"] or r["preprocess"] != first["preprocess"]:
            raise CovidCXRError(f"{m}: ensemble members must share classes and preprocessing")
    record = {
        "format": "covidcxr-run/1",
        "architecture": "ensemble",
        "channels": first["channels"],
        "classes": first["classes"],
        "positive_class": first["positive_class"],
        "preprocess": first["preprocess"],
        "threshold": threshold,
        "members": [os.path.relpath(Path(m).resolve(), run_dir.resolve()) for m in members],
        "model_sha256": _ensemble_sha([r["model_sha256"] for r in records]),
        "info": info or {},
    }
    write_json(run_dir / RUN_JSON, record)
    return run_dir


def _ensemble_sha(hashes: Iterable[str]) -> str:
    import hashlib

    return hashlib.sha256("".join(hashes).encode()).hexdigest()


def _default_positive(classes: Sequence[str]) -> str | None:
    return "covid" if "covid" in classes else None


def read_run_record(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise CovidCXRError(f"{run_dir}: not a covidcxr run directory (no {RUN_JSON}); train one with `covidcxr train`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CovidCXRError(f"{path}: not valid JSON ({exc})") from exc


def update_run_record(run_dir: str | Path, **changes) -> dict:
    """Change top-level fields of ``run.json`` (e.g. ``threshold``) atomically."""
    record = read_run_record(run_dir)
    record.update(changes)
    write_json(Path(run_dir) / RUN_JSON, record)
    return record


class EnsembleModel(nn.Module):
    """Averages the members' probabilities; returns log-probabilities (usable as logits)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).softmax(dim=1) for m in self.members]).mean(dim=0)
        return probs.clamp_min(1e-12).log()


class FlipTTAModel(nn.Module):
    """Test-time augmentation recorded in ``run.json["tta"] = ["hflip"]``: the mean of the probabilities
    for the image and its horizontal mirror, returned as log-probabilities (usable as logits)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = (self.model(x).softmax(dim=1) + self.model(torch.flip(x, dims=[3])).softmax(dim=1)) / 2
        return probs.clamp_min(1e-12).log()


#: Test-time augmentations a run may record (``run.json["tta"]``), applied by :func:`load_run`.
TTA_WRAPPERS = {"hflip": FlipTTAModel}


@dataclass
class LoadedRun:
    """A model ready to predict, with everything needed to use it exactly as trained."""

    run_dir: Path
    model: nn.Module
    spec: PreprocessSpec
    classes: list[str]
    positive_class: str | None
    threshold: float | None
    model_sha256: str
    record: dict = field(repr=False)

    @property
    def positive_index(self) -> int | None:
        return self.classes.index(self.positive_class) if self.positive_class in self.classes else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def predict_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """Preprocessed N x C x S x S batch -> N x K class probabilities."""
        self.model.eval()
        return self.model(batch.to(self.device)).softmax(dim=1).float().cpu().numpy()

    def predict_arrays(self, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Float32 H x W images in [0, 1] (as from ``read_xray``) -> N x K class probabilities."""
        out = []
        for i in range(0, len(images), batch_size):
            batch = torch.stack([preprocess(img, self.spec) for img in images[i : i + batch_size]])
            out.append(self.predict_tensor(batch))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def decide(self, probs: np.ndarray) -> list[str]:
        """Predicted labels: the stored threshold on the positive class when there is one, else argmax."""
        probs = np.asarray(probs)
        if self.threshold is not None and self.positive_index is not None:
            pos = probs[:, self.positive_index] >= self.threshold
            rest = probs.copy()
            rest[:, self.positive_index] = -1
            return [self.positive_class if p else self.classes[int(j)] for p, j in zip(pos, rest.argmax(1))]
        return [self.classes[int(j)] for j in probs.argmax(1)]


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> LoadedRun:
    """Load the model of a run directory (single model or ensemble), checking SHA-256s."""
    run_dir = Path(run_dir)
    record = read_run_record(run_dir)
    if record.get("members"):
        members = [load_run(run_dir / m, device=device, verify=verify) for m in record["members"]]
        expected = _ensemble_sha([m.model_sha256 for m in members])
        if verify and expected != record["model_sha256"]:
            raise WeightsError(f"{run_dir}: ensemble members changed since the ensemble was written (SHA-256 mismatch)")
        model = EnsembleModel([m.model for m in members])
    else:
        model_path = run_dir / MODEL_FILE
        if not model_path.is_file():
            raise WeightsError(f"{model_path}: model file missing")
        if verify:
            actual = sha256_file(model_path)
            if actual != record["model_sha256"]:
                raise WeightsError(
                    f"{model_path}: SHA-256 {actual} does not match the recorded {record['model_sha256']}; "
                    "the model file was changed or corrupted. Refusing to use it."
                )
        from safetensors.torch import load_file

        model = create_model(record["architecture"], len(record["classes"]), channels=record["channels"])
        model.load_state_dict(load_file(str(model_path)), strict=True)
    for name in record.get("tta") or []:
        if name not in TTA_WRAPPERS:
            raise CovidCXRError(f"{run_dir / RUN_JSON}: unknown test-time augmentation {name!r}; "
                                f"known: {sorted(TTA_WRAPPERS)}")
        model = TTA_WRAPPERS[name](model)
    model.eval().to(device)
    return LoadedRun(
        run_dir=run_dir, model=model, spec=PreprocessSpec.from_dict(record["preprocess"]),
        classes=list(record["classes"]), positive_class=record.get("positive_class"),
        threshold=record.get("threshold"), model_sha256=record["model_sha256"], record=record,
    )
