"""What a run was made from, by hash: every train / val / test image file, the manifest, the resolved config.

A run already names its weights (``model_sha256``) and its rows (``split.csv``). That does not say
whether the *pixels* it learned from are the ones on disk today: an image can be swapped or
re-encoded under an unchanged manifest. :func:`hash_data_files` writes ``data_hashes.csv`` (one
row per image the run trained, validated or was tested on: manifest ``image`` value, split,
SHA-256, size) and returns the :class:`Provenance` block that the run record stores (and seals),
so ``covidcxr verify`` (:mod:`covidcxr.models.verify`) can name each file that changed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from covidcxr.files import atomic_write_bytes
from covidcxr.models.weights import sha256_file

DATA_HASHES_FILE = "data_hashes.csv"
CONFIG_FILE = "config.yaml"
#: The run splits whose image files are hashed (``unused`` rows, e.g. capped-off val, are not).
HASHED_SPLITS = ("train", "val", "test")
_SHA256 = r"^[0-9a-f]{64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RecordedFile(_Strict):
    """A file of the run directory (or beside it) and its SHA-256 at the time the run was written."""

    file: str
    sha256: str = Field(pattern=_SHA256)


class ManifestHash(_Strict):
    """The training manifest: its file (when it was read from one) and the hash of its table."""

    path: Optional[str] = None  # as configured (data.manifest); None when the table came from memory
    file_sha256: Optional[str] = Field(default=None, pattern=_SHA256)
    table_sha256: str = Field(pattern=_SHA256)  # covidcxr.data.manifest.Manifest.sha256


class ImageHashes(RecordedFile):
    """``data_hashes.csv``: one SHA-256 per image file, and the folder its ``image`` paths resolve against."""

    root: str  # the manifest's folder when the run was trained; `covidcxr verify --data` replaces it
    counts: dict[str, int] = {}


class Provenance(_Strict):
    """``run.json`` field ``provenance``: the data and configuration the run was made from."""

    config: RecordedFile
    manifest: ManifestHash
    images: ImageHashes


def hash_data_files(out_dir: Path, manifest, run_split: np.ndarray, manifest_path: str | Path | None) -> Provenance:
    """Write ``OUT_DIR/data_hashes.csv`` for the train / val / test rows of ``manifest`` and return the
    run's :class:`Provenance` (``OUT_DIR/config.yaml`` must already be written)."""
    out_dir = Path(out_dir)
    keep = np.isin(np.asarray(run_split, dtype=object), HASHED_SPLITS)
    paths = [p for p, k in zip(manifest.image_paths(), keep) if k]
    table = pd.DataFrame({"image": manifest.table["image"].astype(str).to_numpy()[keep],
                          "split": np.asarray(run_split, dtype=object)[keep],
                          "sha256": [sha256_file(p) for p in paths],
                          "bytes": [os.path.getsize(p) for p in paths]})
    atomic_write_bytes(out_dir / DATA_HASHES_FILE, table.to_csv(index=False, lineterminator="\n").encode())
    file_sha = None
    if manifest_path is not None and Path(manifest_path).is_file():
        file_sha = sha256_file(manifest_path)
    counts = table["split"].value_counts().sort_index()
    return Provenance(
        config=RecordedFile(file=CONFIG_FILE, sha256=sha256_file(out_dir / CONFIG_FILE)),
        manifest=ManifestHash(path=str(manifest_path) if file_sha else None, file_sha256=file_sha,
                              table_sha256=manifest.sha256()),
        images=ImageHashes(file=DATA_HASHES_FILE, sha256=sha256_file(out_dir / DATA_HASHES_FILE),
                           root=str(Path(manifest.root).resolve()),
                           counts={str(k): int(v) for k, v in counts.items()}))


def read_data_hashes(run_dir: Path, provenance: Provenance) -> pd.DataFrame:
    """``data_hashes.csv`` as a table (the caller checks its own SHA-256 first)."""
    return pd.read_csv(Path(run_dir) / provenance.images.file, dtype=str, keep_default_na=False)
