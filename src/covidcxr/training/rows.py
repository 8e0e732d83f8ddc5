"""Which manifest rows a run trains and validates on (never ``test``), and what the run records of them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from covidcxr.data.labels import LabelSpace
from covidcxr.data.manifest import Manifest
from covidcxr.errors import ConfigError
from covidcxr.training.config import TrainingConfig


@dataclass
class TrainingData:
    """The manifest a run trains on and which of its rows are train / val."""

    manifest: Manifest
    train_mask: np.ndarray
    val_mask: np.ndarray
    split_info: dict
    held_out: np.ndarray | None = None  # rows of data.holdout_sources (and their patients)

    def run_split(self, column: str) -> np.ndarray:
        """What the run did with every row: train / val / test / external / unused (e.g. capped-off val)."""
        split = self.manifest.table[column].astype(str).to_numpy() if column in self.manifest.table.columns \
            else np.full(len(self.manifest), "", dtype=object)
        out = np.full(len(self.manifest), "unused", dtype=object)
        out[split == "test"] = "test"
        out[split == "external"] = "external"
        if self.held_out is not None:
            out[self.held_out] = "external"
        out[self.train_mask] = "train"
        out[self.val_mask] = "val"
        return out


def _split_values(manifest: Manifest, column: str) -> pd.Series:
    if column not in manifest.table.columns:
        raise ConfigError(f"config key data.split_column: the manifest has no column {column!r}")
    return manifest.table[column].astype(str)


def prepare_training_data(config: TrainingConfig, manifest: Manifest | None = None) -> TrainingData:
    """Read the manifest (or use ``manifest``), split it if needed, and pick train / val rows."""
    d = config.data
    if manifest is None:
        manifest = Manifest.read(d.manifest)
    info: dict = {"split_column": d.split_column}
    split = _split_values(manifest, d.split_column) if d.split_column in manifest.table.columns else None
    if split is None or (split == "").all():
        if d.split_seed is None:
            raise ConfigError(
                f"{manifest.name}: no {d.split_column!r} split assigned. Run `covidcxr data split` first, "
                "or set data.split_seed=N to split here (patient-grouped, stratified by label x source)")
        from covidcxr.data.splits import assign_splits

        manifest = assign_splits(manifest, val=d.val_fraction, test=d.test_fraction, seed=d.split_seed,
                                 holdout_sources=d.holdout_sources)
        info.update(split_created_here=True, split_seed=d.split_seed, val_fraction=d.val_fraction,
                    test_fraction=d.test_fraction, holdout_sources=list(d.holdout_sources))
        split = manifest.table["split"].astype(str)
    else:
        info["split_created_here"] = False
        unassigned = (split == "") | (split == "nan")
        if unassigned.any():
            # e.g. a newly imported source concatenated to a split manifest: training would silently skip it.
            first = manifest.table["image"].iloc[int(np.flatnonzero(unassigned.to_numpy())[0])]
            raise ConfigError(
                f"{manifest.name}: {int(unassigned.sum())} of {len(split)} rows have no {d.split_column!r} value "
                f"(e.g. {first}); they would be left out of training unnoticed. Assign them (`covidcxr data split` "
                "re-splits every row, or fill the column by patient), or drop them from the manifest")
    held_out = np.zeros(len(manifest), dtype=bool)
    if d.holdout_sources:
        from covidcxr.data.splits import source_mask

        held_out = source_mask(manifest.table, d.holdout_sources)
        # A patient with images in a held-out source is held out everywhere (as assign_splits does).
        held_out |= manifest.table["patient_id"].isin(set(manifest.table.loc[held_out, "patient_id"])).to_numpy()
        info["holdout_sources"] = list(d.holdout_sources)
    train_mask = (split == "train").to_numpy() & ~held_out
    val_mask = (split == "val").to_numpy() & ~held_out
    if d.val_max_images and val_mask.sum() > d.val_max_images:
        val_mask = _stratified_cap(manifest.table, val_mask, d.val_max_images, config.train.seed)
        info["val_capped_to"] = int(val_mask.sum())
    if d.synthetic_manifest and train_mask.any():
        from covidcxr.training.synthetic_rows import add_synthetic_rows

        manifest, train_mask, val_mask, held_out = add_synthetic_rows(
            manifest, train_mask, val_mask, held_out, d.synthetic_manifest, d.synthetic_max, config.train.seed, info)
    if not train_mask.any() or not val_mask.any():
        raise ConfigError(f"{manifest.name}: need rows with {d.split_column}=train and =val "
                          f"(found {int(train_mask.sum())} train, {int(val_mask.sum())} val)")
    return TrainingData(manifest, train_mask, val_mask, info, held_out)


def _stratified_cap(table: pd.DataFrame, mask: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Keep about ``cap`` rows of ``mask``, proportionally per label x source (at least 1 per cell)."""
    rng = np.random.default_rng([seed, 7])
    rows = np.flatnonzero(mask)
    cells = table.iloc[rows].groupby(["label", "source"]).indices
    frac = cap / len(rows)
    keep = np.zeros_like(mask)
    for _, idx in sorted(cells.items()):
        n = max(1, int(round(len(idx) * frac)))
        keep[rows[rng.choice(idx, size=min(n, len(idx)), replace=False)]] = True
    return keep



def data_counts(manifest: Manifest, space: LabelSpace, split_column: str = "split") -> pd.DataFrame:
    """Images per class x source x split (the class after the label space; excluded rows as '(excluded)')."""
    t = manifest.table
    cls = space.assign(t).fillna("(excluded)")
    split = t[split_column] if split_column in t.columns else pd.Series([""] * len(t))
    return (pd.DataFrame({"class": cls.to_numpy(), "source": t["source"].to_numpy(), "split": split.to_numpy()})
            .groupby(["class", "source", "split"]).size().rename("images").reset_index())



def split_column_used(config: TrainingConfig, data: TrainingData) -> str:
    """The column the rows were taken from: data.split_column, unless the split was made here ("split")."""
    if data.split_info.get("split_created_here") or config.data.split_column not in data.manifest.table.columns:
        return "split"
    return config.data.split_column
