"""Leakage-proof splits: patient-grouped, label- and source-stratified train / val / test, grouped
k-fold over the development patients, and whole sources held out as external test data.

A patient never spans two splits (nor two folds): serial studies of one person are near-copies and
would leak. Stratification is by ``label x source`` (scikit-learn ``StratifiedGroupKFold``), so every
split sees every source with roughly its share of each label; fractions are therefore met to within
one fold's granularity (``test=0.15`` -> 1 of 7 folds = 14.3 % of the images, give or take a patient).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from covidcxr.data.manifest import Manifest, patient_prefix
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


def _pick_fold(y: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of one StratifiedGroupKFold fold holding about ``fraction`` of the rows."""
    if fraction <= 0:
        return np.zeros(len(y), dtype=bool)
    n_groups = len(np.unique(groups))
    k = int(min(max(2, round(1.0 / fraction)), n_groups))
    if k < 2:
        raise ManifestError(f"cannot split {n_groups} patient(s) into a {fraction:.0%} part; need at least 2 patients")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # rare label x source strata (< k patients) are expected
        warnings.simplefilter("ignore", UserWarning)
        folds = [test for _, test in splitter.split(np.zeros(len(y)), y, groups)]
    target = fraction * len(y)
    best = min(folds, key=lambda idx: abs(len(idx) - target))
    mask = np.zeros(len(y), dtype=bool)
    mask[best] = True
    return mask


def _strata(table: pd.DataFrame, stratify_source: bool) -> np.ndarray:
    key = table["label"].astype(str)
    if stratify_source:
        key = key + "|" + table["source"].astype(str)
    return key.to_numpy()


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
    sub = table.iloc[dev]
    y = _strata(sub, stratify_source)
    groups = sub["patient_id"].to_numpy()
    is_test = _pick_fold(y, groups, test, seed)
    split[dev[is_test]] = "test"

    rest = dev[~is_test]
    sub = table.iloc[rest]
    val_of_rest = val / (1 - test) if test < 1 else 0
    is_val = _pick_fold(_strata(sub, stratify_source), sub["patient_id"].to_numpy(), val_of_rest, seed + 1)
    split[rest[is_val]] = "val"
    split[rest[~is_val]] = "train"
    table["split"] = split

    if folds is not None:
        fold = np.full(len(table), -1, dtype=int)
        sub = table.iloc[rest]
        groups = sub["patient_id"].to_numpy()
        if len(np.unique(groups)) < folds:
            raise ManifestError(f"{manifest.name}: {len(np.unique(groups))} development patients cannot fill {folds} folds")
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for k, (_, idx) in enumerate(splitter.split(np.zeros(len(sub)), _strata(sub, stratify_source), groups)):
                fold[rest[idx]] = k
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
