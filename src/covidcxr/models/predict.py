"""Model -> predictions: run a loaded model over image files.

The one place where files become class probabilities, shared by ``covidcxr evaluate``,
``covidcxr predict`` and the explainability tools. Unreadable files are reported with the reason
and skipped; the rest go on.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from covidcxr.data.preprocess import preprocess
from covidcxr.errors import CovidCXRError
from covidcxr.models.run import LoadedRun
from covidcxr.progress import make_progress


@dataclass
class Predictions:
    """One row per image that was read (``table``) and every file that was not (``skipped``)."""

    table: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def probabilities(self, cls: str) -> np.ndarray:
        return self.table[f"prob_{cls}"].to_numpy()


def _load(path: str, allow_non_frontal: bool = False) -> tuple[str, np.ndarray | None, str | None, str | None]:
    """(path, pixels, input sha256, error reason) for one file; never raises for bad input."""
    from covidcxr.data import decode_xray

    try:
        data = Path(path).read_bytes()  # hash and decode the same bytes: the file is read once
        pixels = decode_xray(data, path, allow_non_frontal=allow_non_frontal).pixels
        return path, pixels, hashlib.sha256(data).hexdigest(), None
    except CovidCXRError as exc:
        return path, None, None, getattr(exc, "reason", str(exc))
    except OSError as exc:
        return path, None, None, f"cannot open file ({exc.strerror or exc})"


def prediction_columns(run: LoadedRun) -> list[str]:
    return ["path", *[f"prob_{c}" for c in run.classes], "predicted", "threshold", "input_sha256", "model_sha256"]


def predict_paths(run: LoadedRun, paths: Sequence[str | Path], *, batch_size: int = 16, progress: bool = True,
                  workers: int = 2, on_batch: Callable[[pd.DataFrame, list[tuple[str, str]]], None] | None = None,
                  allow_non_frontal: bool = False) -> Predictions:
    """Predict every file in ``paths`` with ``run``; bad files land in ``Predictions.skipped``.

    ``on_batch(rows, skipped)`` is called after each batch (e.g. to append to an output file so
    that a killed job loses at most one batch). Decoding runs in ``workers`` threads, since the
    image decoders release the GIL. ``allow_non_frontal`` accepts DICOMs that say they are CT /
    lateral (refused by default, with the reason, like any unreadable file).
    """
    paths = [str(p) for p in paths]
    frames: list[pd.DataFrame] = []
    skipped: list[tuple[str, str]] = []
    load = partial(_load, allow_non_frontal=allow_non_frontal)
    with make_progress(disable=not progress) as bar, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        task = bar.add_task("predicting", total=len(paths))
        for start in range(0, len(paths), batch_size):
            loaded = list(pool.map(load, paths[start : start + batch_size]))
            good = [(p, px, h) for p, px, h, err in loaded if err is None]
            bad = [(p, err) for p, px, h, err in loaded if err is not None]
            rows = _predict_batch(run, good)
            skipped.extend(bad)
            frames.append(rows)
            if on_batch is not None:
                on_batch(rows, bad)
            bar.advance(task, len(loaded))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=prediction_columns(run))
    return Predictions(table=table, skipped=skipped)


def _predict_batch(run: LoadedRun, good: Iterable[tuple[str, np.ndarray, str]]) -> pd.DataFrame:
    good = list(good)
    if not good:
        return pd.DataFrame(columns=prediction_columns(run))
    batch = torch.stack([preprocess(px, run.spec) for _, px, _ in good])
    probs = run.predict_tensor(batch)
    rows = pd.DataFrame({"path": [p for p, _, _ in good]})
    for j, cls in enumerate(run.classes):
        rows[f"prob_{cls}"] = probs[:, j]
    rows["predicted"] = run.decide(probs)
    rows["threshold"] = run.threshold
    rows["input_sha256"] = [h for _, _, h in good]
    rows["model_sha256"] = run.model_sha256
    return rows
