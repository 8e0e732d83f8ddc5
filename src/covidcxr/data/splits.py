"""Leakage-proof splits: patient-grouped, label- and source-stratified train / val / test, grouped
k-fold over the development patients, and whole sources held out as external test data.

A patient never spans two splits (nor two folds): serial studies of one person are near-copies and
would leak. Stratification is by ``label x source``: inside every stratum whole patients are dealt out so that
each split gets its fraction of the stratum's images (to within one patient), so every split sees every
source with its share of each label. (scikit-learn's ``StratifiedGroupKFold`` does the same job for
``1/k`` fractions only and takes seconds on 3,000 patients; this is exact and takes milliseconds.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from covidcxr.data.manifest import Manifest, patient_prefix
from covidcxr.data.synthetic import check_split_keeps_synthetic_in_train
from covidcxr.errors import ConfigError, ManifestError


def source_mask(table: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    """Rows whose ``source`` equals one of ``names`` or whose patient-id prefix does (``ieee8023``,
    ``figure1``, ``nih``, ``kermany``, ``rsna``, ...). Case-insensitive. Raises if a name matches
    nothing, so a typo never silently holds out nothing."""
    mask = np.zeros(len(table), dtype=bool)
    sources = table["source"].str.lower()
    prefixes = table["patient_id"].map(patient_prefix).str.lower()
    for name in names:
        key = str(name).strip().lower()
        hit = ((sources == key) | (prefixes == key)).to_numpy()
        if not hit.any():
            known = sorted(set(table["source"]) | set(prefixes[prefixes != ""]))
            raise ConfigError(f"holdout source {name!r} matches no row (neither a 'source' value nor a "
                              f"patient_id prefix); known: {known}")
        mask |= hit
    return mask


def _patient_strata(table: pd.DataFrame, stratify_source: bool) -> pd.DataFrame:
    """One row per patient: ``patient_id``, ``images``, ``stratum`` (its most frequent label [x source])."""
    key = table["label"].astype(str)
    if stratify_source:
        key = key + "|" + table["source"].astype(str)
    frame = pd.DataFrame({"patient_id": table["patient_id"].to_numpy(), "stratum": key.to_numpy()})
    # Most frequent stratum per patient, ties broken by name, so the result does not depend on row order.
    counts = frame.groupby(["patient_id", "stratum"]).size().rename("n").reset_index()
    counts = counts.sort_values(["patient_id", "n", "stratum"], ascending=[True, False, True])
    per_patient = counts.drop_duplicates("patient_id")[["patient_id", "stratum"]]
    sizes = frame.groupby("patient_id").size().rename("images")
    return per_patient.join(sizes, on="patient_id").sort_values("patient_id", ignore_index=True)


def grouped_stratified_parts(patients: pd.DataFrame, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Assign each patient (rows of :func:`_patient_strata`) to a part ``0..len(fractions)-1``.

    Within every stratum the patients are shuffled (seeded) and laid end to end by image count; a
    patient goes to the part whose share of the stratum's images covers the middle of its block. So
    each part receives ``fraction`` of every stratum's images to within one patient (a one-patient
    stratum lands in a part at random, with probability equal to that part's fraction). Deterministic
    for the same patients and seed, and linear time.
    """
    rng = np.random.default_rng(seed)
    bounds = np.cumsum(np.asarray(fractions, dtype=float))
    bounds = bounds / bounds[-1]
    part = np.zeros(len(patients), dtype=int)
    for _, idx in sorted(patients.groupby("stratum").indices.items()):
        idx = idx[rng.permutation(len(idx))]
        sizes = patients["images"].to_numpy()[idx].astype(float)
        middle = (np.cumsum(sizes) - sizes / 2) / sizes.sum()
        # Random offset so the first patients of every stratum are not always in the first part.
        middle = (middle + rng.random()) % 1.0
        part[idx] = np.minimum(np.searchsorted(bounds, middle, side="right"), len(bounds) - 1)
    # Small data: a part asked for (fraction > 0) must not end up empty while another has patients to
    # spare; move one random patient from the fullest part.
    wanted = [k for k, f in enumerate(fractions) if f > 0]
    if len(patients) >= len(wanted):
        for k in wanted:
            if not (part == k).any():
                donor = np.bincount(part, minlength=len(fractions)).argmax()
                part[rng.choice(np.flatnonzero(part == donor))] = k
    return part


def assign_splits(manifest: Manifest, *, val: float = 0.15, test: float = 0.15, seed: int = 0,
                  folds: int | None = None, holdout_sources: Sequence[str] = (),
                  stratify_source: bool = True) -> Manifest:
    """Return a copy of ``manifest`` with ``split`` (train / val / test / external) filled in.

    * ``holdout_sources``: whole sources (``source`` value or patient-id prefix) go to ``external``.
    * ``test`` then ``val``: fractions of the remaining images, patient-grouped, stratified by
      ``label x source``.
    * ``folds=K``: adds ``fold`` 0..K-1 over the development (train + val) patients, grouped by patient
      and stratified the same way; ``-1`` for test / external rows.

    Deterministic for the same table and seed. Any previous ``split`` / ``fold`` is replaced.
    """
    for name, frac in (("val", val), ("test", test)):
        if not 0 <= frac < 1:
            raise ConfigError(f"{name}={frac}: must be a fraction in [0, 1)")
    if val + test >= 1:
        raise ConfigError(f"val + test = {val + test}: leaves nothing to train on; use fractions that sum to < 1")
    if folds is not None and folds < 2:
        raise ConfigError(f"folds={folds}: need at least 2 folds (or leave it out)")

    if len(manifest) == 0:
        raise ManifestError(f"{manifest.name}: the manifest is empty; nothing to split")
    table = manifest.table.copy()
    split = np.full(len(table), "", dtype=object)
    external = source_mask(table, holdout_sources) if holdout_sources else np.zeros(len(table), dtype=bool)
    # A patient seen in a held-out source is external everywhere, otherwise they would leak.
    ext_patients = set(table.loc[external, "patient_id"])
    external |= table["patient_id"].isin(ext_patients).to_numpy()
    split[external] = "external"

    dev = np.flatnonzero(~external)
    if len(dev) == 0:
        raise ManifestError(f"{manifest.name}: every row is in a held-out source; nothing left to train on")
    patients = _patient_strata(table.iloc[dev], stratify_source)
    parts = grouped_stratified_parts(patients, [test, val, 1.0 - test - val], seed)
    part_of = dict(zip(patients["patient_id"], np.array(["test", "val", "train"])[parts]))
    split[dev] = table["patient_id"].iloc[dev].map(part_of).to_numpy()
    check_split_keeps_synthetic_in_train(table, split, manifest.name)
    table["split"] = split

    if folds is not None:
        fold = np.full(len(table), -1, dtype=int)
        rest = np.flatnonzero(np.isin(split, ["train", "val"]))
        patients = _patient_strata(table.iloc[rest], stratify_source)
        if len(patients) < folds:
            raise ManifestError(f"{manifest.name}: {len(patients)} development patients cannot fill {folds} folds")
        parts = grouped_stratified_parts(patients, [1.0] * folds, seed + 1)
        fold_of = dict(zip(patients["patient_id"], parts))
        fold[rest] = table["patient_id"].iloc[rest].map(fold_of).to_numpy()
        table["fold"] = fold
    elif "fold" in table.columns:
        table = table.drop(columns=["fold"])
    return manifest.replace(table)


def split_summary(manifest: Manifest) -> pd.DataFrame:
    """Images / patients / labels per split (rows: splits in a fixed order)."""
    t = manifest.table
    order = [s for s in ("train", "val", "test", "external", "") if s in set(t["split"])]
    labels = t.groupby("split")["label"].value_counts().unstack(fill_value=0)
    out = pd.DataFrame({"images": t.groupby("split").size(), "patients": t.groupby("split")["patient_id"].nunique()})
    return out.join(labels).reindex(order).fillna(0).astype(int)


def split_file(manifest_path, out, **kwargs) -> Manifest:
    """Read a manifest, :func:`assign_splits` it (``kwargs``) and write the result to ``out``."""
    manifest = assign_splits(Manifest.read(manifest_path), **kwargs)
    manifest.write(out)
    return manifest
