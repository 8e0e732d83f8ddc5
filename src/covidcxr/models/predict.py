"""Model -> predictions: the one path from image files (or uploaded bytes) to class probabilities.

A :class:`Predictor` is anything with a run record and ``predict_tensor(batch) -> probabilities``:
the PyTorch backend (:class:`~covidcxr.models.run.LoadedRun`) and the ONNX Runtime backend
(:class:`covidcxr.serving.onnx.OnnxRun`) implement it. Everything else is shared:

* :func:`prepare_input` reads a file's bytes once, hashes them, decodes them and runs the one
  preprocessing pipeline (:mod:`covidcxr.data.preprocess`); the result keeps the working-size pixels
  and the model input, so heatmaps and overlays never decode a file a second time;
* :func:`predict_inputs` turns prepared inputs into :class:`PredictionRecord` objects;
* :func:`predict_paths` does both for a list of files in batches (bad files are reported with the
  reason and skipped; the rest go on), which is what ``covidcxr predict``, ``evaluate`` and the
  explainability tools use.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import pandas as pd
import torch

from covidcxr.data.lung_roi import LungFinder, apply_roi, locate_lungs
from covidcxr.data.plausibility import DEFAULT_CHECKS, InputChecks
from covidcxr.data.preprocess import PreprocessSpec, dequantise, prepare, to_tensor, working_image
from covidcxr.errors import CovidCXRError
from covidcxr.models.record import RunRecord
from covidcxr.progress import make_progress

log = logging.getLogger("covidcxr.predict")


class Predictor(Protocol):
    """A run's model on some backend: its record and a batch -> probabilities function."""

    run_dir: Path
    record: RunRecord
    backend: str

    @property
    def spec(self) -> PreprocessSpec: ...

    @property
    def classes(self) -> list[str]: ...

    @property
    def lung_finder(self) -> LungFinder | None: ...  # the run's segmenter when its spec has roi: lungs

    def predict_tensor(self, batch: torch.Tensor) -> np.ndarray: ...

    def decide(self, probs: np.ndarray) -> list[str]: ...


@dataclass(eq=False)
class PreparedInput:
    """One decoded, preprocessed image: what the model sees and what a person is shown."""

    name: str
    input_sha256: str
    # The working-size image, float32 H x W in [0, 1] (aspect and orientation of the file); with
    # roi: lungs, the lung crop of it the model saw (meta["roi"] gives its box in the working image).
    pixels: np.ndarray
    meta: dict  # the reader's meta (format, original_shape, DICOM tags ...) and, with roi: lungs, "roi"
    tensor: torch.Tensor  # C x S x S model input

    @property
    def original_shape(self) -> tuple[int, int]:
        return tuple(self.meta.get("original_shape") or self.pixels.shape)


@dataclass(eq=False)
class PredictionRecord:
    """One prediction: the input it was made on, the class probabilities and the decision."""

    input: PreparedInput
    probabilities: np.ndarray  # K, in the run's class order
    predicted: str

    @property
    def path(self) -> str:
        return self.input.name


def prepare_bytes(data: bytes, name: str, spec: PreprocessSpec, *, lung_finder: LungFinder | None = None,
                  allow_non_frontal: bool = False, **read_options) -> PreparedInput:
    """Decode ``data`` (the bytes of one file or upload) and run the pipeline; raises ImageReadError.

    ``lung_finder`` is the run's (``predictor.lung_finder``); a spec with ``roi: lungs`` needs it, and an
    image where it finds no lungs is refused with that reason (or recorded as a fallback in ``meta``).
    """
    from covidcxr.data.io import decode_xray

    xray = decode_xray(data, name, allow_non_frontal=allow_non_frontal, **read_options)
    working = working_image(xray.pixels, spec.working_size)
    roi = locate_lungs(working, spec, lung_finder, str(name))
    meta = dict(xray.meta) if roi is None else {**xray.meta, "roi": roi.to_dict()}
    seen = working if roi is None else apply_roi(working, roi)
    return PreparedInput(name=str(name), input_sha256=hashlib.sha256(data).hexdigest(), pixels=dequantise(seen),
                         meta=meta, tensor=to_tensor(prepare(working, spec, roi), spec))


def prepare_input(path: str | Path, spec: PreprocessSpec, *, lung_finder: LungFinder | None = None,
                  allow_non_frontal: bool = False, **read_options) -> PreparedInput:
    """Read ``path`` once (safely: no FIFOs, devices or link loops) and :func:`prepare_bytes` it."""
    from covidcxr.data.io import read_file_bytes

    return prepare_bytes(read_file_bytes(path), str(path), spec, lung_finder=lung_finder,
                         allow_non_frontal=allow_non_frontal, **read_options)


def try_prepare(path: str | Path, spec: PreprocessSpec, **options) -> tuple[PreparedInput | None, str | None]:
    """(prepared input, None) or (None, reason) for one file; never raises for bad input."""
    try:
        return prepare_input(path, spec, **options), None
    except CovidCXRError as exc:
        return None, getattr(exc, "reason", str(exc))
    except OSError as exc:
        return None, f"cannot read file ({exc.strerror or exc.__class__.__name__})"
    except Exception as exc:  # a bug below the reader must cost one file, not the batch; say so plainly
        log.exception("unexpected error preparing %s", path)
        return None, f"unexpected error while preparing the image ({exc.__class__.__name__}); please report it"


def predict_inputs(predictor: Predictor, inputs: Sequence[PreparedInput]) -> list[PredictionRecord]:
    """Prepared inputs -> prediction records (one forward pass over the batch)."""
    if not inputs:
        return []
    probs = predictor.predict_tensor(torch.stack([x.tensor for x in inputs]))
    return [PredictionRecord(x, p, lab) for x, p, lab in zip(inputs, probs, predictor.decide(probs))]


def iter_predictions(predictor: Predictor, paths: Sequence[str | Path], *, batch_size: int = 16, workers: int = 2,
                     allow_non_frontal: bool = False, checks: InputChecks | None = DEFAULT_CHECKS,
                     progress: bool = True) -> Iterator[tuple[list[PredictionRecord], list[tuple[str, str]]]]:
    """Yield ``(records, skipped)`` per batch of ``paths``; ``skipped`` holds ``(path, reason)``.

    Decoding runs in ``workers`` threads (the image decoders release the GIL). ``checks`` is the
    plausibility gate (:class:`~covidcxr.data.plausibility.InputChecks`; ``None`` switches it off).
    """
    paths = [str(p) for p in paths]
    with make_progress(disable=not progress) as bar, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        task = bar.add_task("predicting", total=len(paths))
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            loaded = list(pool.map(lambda p: try_prepare(p, predictor.spec, lung_finder=predictor.lung_finder,
                                                         allow_non_frontal=allow_non_frontal, checks=checks), chunk))
            good = [x for x, _ in loaded if x is not None]
            bad = [(p, reason) for p, (x, reason) in zip(chunk, loaded) if x is None]
            yield predict_inputs(predictor, good), bad
            bar.advance(task, len(chunk))


@dataclass
class Predictions:
    """One row per image that was read (``table``) and every file that was not (``skipped``)."""

    table: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def probabilities(self, cls: str) -> np.ndarray:
        return self.table[f"prob_{cls}"].to_numpy()


def prediction_columns(predictor: Predictor) -> list[str]:
    return ["path", *[f"prob_{c}" for c in predictor.classes], "predicted", "threshold", "input_sha256",
            "model_sha256"]


def records_table(predictor: Predictor, records: Sequence[PredictionRecord]) -> pd.DataFrame:
    """Prediction records -> the prediction table (one row per image, ``prediction_columns`` order)."""
    rows = pd.DataFrame({"path": [r.path for r in records]}, dtype=object)
    probs = np.stack([r.probabilities for r in records]) if records else np.zeros((0, len(predictor.classes)))
    for j, cls in enumerate(predictor.classes):
        rows[f"prob_{cls}"] = probs[:, j].astype(float)
    rows["predicted"] = [r.predicted for r in records]
    rows["threshold"] = predictor.threshold
    rows["input_sha256"] = [r.input.input_sha256 for r in records]
    rows["model_sha256"] = predictor.model_sha256
    return rows[prediction_columns(predictor)]


def predict_paths(predictor: Predictor, paths: Sequence[str | Path], *, batch_size: int = 16, progress: bool = True,
                  workers: int = 2, allow_non_frontal: bool = False, checks: InputChecks | None = DEFAULT_CHECKS,
                  on_batch: Callable[[list[PredictionRecord], pd.DataFrame, list[tuple[str, str]]], None] | None = None
                  ) -> Predictions:
    """Predict every file in ``paths``; bad files land in ``Predictions.skipped`` with the reason.

    ``on_batch(records, rows, skipped)`` is called after each batch (e.g. to append to an output file
    so that a killed job loses at most one batch, or to draw heatmaps from the records' inputs).
    ``allow_non_frontal`` accepts DICOMs that say they are CT / lateral.
    """
    frames, skipped = [], []
    for records, bad in iter_predictions(predictor, paths, batch_size=batch_size, workers=workers,
                                         allow_non_frontal=allow_non_frontal, checks=checks, progress=progress):
        rows = records_table(predictor, records)
        frames.append(rows)
        skipped.extend(bad)
        if on_batch is not None:
            on_batch(records, rows, bad)
    table = pd.concat(frames, ignore_index=True) if frames else records_table(predictor, [])
    return Predictions(table=table, skipped=skipped)
