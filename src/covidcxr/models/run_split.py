"""The rows a run was trained, validated and tested on (``split.csv``), wherever the run and its data now lie.

``split.csv`` names each image relative to the run directory. That holds while the run and the data
keep their places (a clone beside ``../shared``), but not for a run copied to another machine or
moved to another folder. So each row also names its file relative to the data root the run was
trained with (column ``image_in_data_root``; blank for images outside it, such as a manifest's own
stamped copies). :func:`read_run_split` uses that column for the rows whose file is not where
``split.csv`` says, resolved against the data root here (``data_root=``, else
``$COVIDCXR_DATA_ROOT``). The column is part of ``split.csv``, so the file's recorded SHA-256 covers it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.data.manifest import SPLITS, Manifest
from covidcxr.errors import CovidCXRError
from covidcxr.models.record import SPLIT_FILE, RunRecord, RunSplit
from covidcxr.models.weights import sha256_file
from covidcxr.paths import data_root as configured_data_root

#: The column of ``split.csv`` that says what the run did with each row.
RUN_SPLIT_COLUMN = "run_split"
#: The column of ``split.csv`` that names each image relative to the training data root.
IMAGE_IN_DATA_ROOT = "image_in_data_root"


def _inside(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or ``""`` when it lies outside it."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return Path(os.path.relpath(real, base)).as_posix() if real.startswith(base + os.sep) else ""


def write_run_split(out_dir: Path, manifest: Manifest, run_split: np.ndarray) -> RunSplit:
    """Store the rows the run was trained, validated and tested on (``split.csv``, column
    ``run_split``), so ``covidcxr evaluate RUN`` evaluates the run's own test split unprompted."""
    path = Path(out_dir) / SPLIT_FILE
    root = configured_data_root()
    in_root = [_inside(p, root) for p in manifest.image_paths()]
    manifest.replace(manifest.table.assign(**{RUN_SPLIT_COLUMN: run_split, IMAGE_IN_DATA_ROOT: in_root})).write(path)
    counts = pd.Series(run_split).value_counts().sort_index()
    return RunSplit(sha256=sha256_file(path), column=RUN_SPLIT_COLUMN,
                    counts={str(k): int(v) for k, v in counts.items()},
                    image_roots=[str(r) for r in manifest.allowed_roots()])


def read_run_split(run_dir: str | Path, record: RunRecord, data_root: str | Path | None = None) -> Manifest:
    """The rows the run in ``run_dir`` was trained, validated and tested on, checked against its ``record``.

    Its ``split`` column is what the run did with each row (train / val / test / external; rows it
    did not use are blank), so evaluating it can never score an image the run trained on. Rows whose
    file is missing where ``split.csv`` points are looked up under ``data_root`` (default: the
    configured data root) by their ``image_in_data_root``; any still missing are left for the caller
    to report by name.
    """
    rec = record.split
    if rec is None:
        raise CovidCXRError(f"{run_dir}: the run records no split; pass --manifest with a 'split' column")
    path = Path(run_dir) / rec.file
    if not path.is_file() or sha256_file(path) != rec.sha256:
        raise CovidCXRError(f"{path}: missing or changed since training (SHA-256 differs from run.json); "
                            "pass --manifest explicitly")
    manifest = Manifest.read(path)
    table = manifest.table.copy()
    roots = [manifest.root, *(Path(r) for r in rec.image_roots)]
    if IMAGE_IN_DATA_ROOT in table.columns:
        root = Path(data_root).resolve() if data_root is not None else configured_data_root()
        relocated = _relocate(manifest, table[IMAGE_IN_DATA_ROOT], root)
        if relocated is not None:
            table["image"] = relocated
            roots.append(root)
    table["split"] = table[rec.column].astype(str).where(table[rec.column].astype(str).isin(SPLITS), "")
    return Manifest(table, root=manifest.root, name=manifest.name, data_roots=tuple(dict.fromkeys(roots)))


def _relocate(manifest: Manifest, in_root: pd.Series, root: Path) -> list[str] | None:
    """Image values with each missing file replaced by its copy under ``root``; ``None`` if none moved."""
    images = manifest.table["image"].astype(str).tolist()
    names = in_root.fillna("").astype(str).tolist()
    moved = False
    for k, p in enumerate(manifest.image_paths()):
        if names[k] and not p.exists() and (root / names[k]).is_file():
            images[k] = str(root / names[k])
            moved = True
    return images if moved else None
