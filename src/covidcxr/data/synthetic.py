"""Synthetic (generated) images in a manifest: how they are flagged and the rule that they train only.

A generated image (``covidcxr synth generate``) is a manifest row with ``synthetic = true`` and its
provenance: ``generator_sha256`` (the generator file that made it), ``source_image`` and
``source_patient_id`` (the real image and patient it was translated from). Its ``patient_id`` *is* the
source patient's, so a patient-grouped split keeps it with its patient and nothing leaks.

The rule: a synthetic image may only ever be a training image. A manifest with a synthetic row in
``val``, ``test`` or ``external`` is refused when it is validated (every read, split and audit goes
through that), and :func:`covidcxr.data.splits.assign_splits` refuses to put the patient of a synthetic
image anywhere but ``train``. Evaluating on generated images would measure the generator, not the model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from covidcxr.errors import ManifestError

SYNTHETIC_COLUMN = "synthetic"
#: Provenance columns every synthetic row carries.
PROVENANCE_COLUMNS = ("generator_sha256", "source_image", "source_patient_id")
TRUE_VALUES = ("true", "1", "yes")
#: Splits a synthetic image may be in ("" = not assigned yet).
ALLOWED_SPLITS = ("train", "")


def synthetic_mask(table: pd.DataFrame) -> np.ndarray:
    """Rows flagged ``synthetic`` (``true`` / ``1`` / ``yes``, any case); all False without the column."""
    if SYNTHETIC_COLUMN not in table.columns:
        return np.zeros(len(table), dtype=bool)
    return table[SYNTHETIC_COLUMN].map(lambda v: str(v).strip().lower() in TRUE_VALUES).to_numpy(dtype=bool)


def check_synthetic_rows(table: pd.DataFrame, name: str = "manifest") -> None:
    """Refuse synthetic rows outside ``train``, without provenance, or with a patient other than their source's."""
    synth = synthetic_mask(table)
    if not synth.any():
        return
    bad = synth & ~table["split"].isin(ALLOWED_SPLITS).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ManifestError(f"{name} row {row + 1}, column 'split': synthetic image {table['image'].iloc[row]!r} is in "
                            f"{table['split'].iloc[row]!r} ({int(bad.sum())} synthetic row(s) outside train); synthetic "
                            "images are for training only, never val / test / external")
    missing = [c for c in PROVENANCE_COLUMNS if c not in table.columns]
    if missing:
        raise ManifestError(f"{name}: synthetic rows need the provenance column(s) {missing}")
    for column in PROVENANCE_COLUMNS:
        empty = synth & (table[column].astype(str).str.strip() == "").to_numpy()
        if empty.any():
            row = int(np.flatnonzero(empty)[0])
            raise ManifestError(f"{name} row {row + 1}, column {column!r}: a synthetic image needs its {column}")
    moved = synth & (table["patient_id"].astype(str) != table["source_patient_id"].astype(str)).to_numpy()
    if moved.any():
        row = int(np.flatnonzero(moved)[0])
        raise ManifestError(f"{name} row {row + 1}, column 'patient_id': synthetic image has patient "
                            f"{table['patient_id'].iloc[row]!r} but was made from patient "
                            f"{table['source_patient_id'].iloc[row]!r}; it must keep its source patient's id so "
                            "that a patient-grouped split keeps them together")


def check_split_keeps_synthetic_in_train(table: pd.DataFrame, split: np.ndarray, name: str = "manifest") -> None:
    """Refuse a split that puts the patient of a synthetic image in val / test / external."""
    synth = synthetic_mask(table)
    bad = synth & ~np.isin(split, ALLOWED_SPLITS)
    if bad.any():
        patients = sorted(set(table.loc[bad, "patient_id"]))
        raise ManifestError(f"{name}: this split puts {len(patients)} patient(s) with synthetic images in "
                            f"val / test / external (e.g. {patients[0]}, {int(bad.sum())} synthetic image(s)); "
                            "synthetic images are training-only and follow their source patient. Split the real "
                            "manifest first, generate from its train rows, and add them with data.synthetic_manifest")
