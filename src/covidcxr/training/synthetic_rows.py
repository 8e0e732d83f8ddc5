"""Synthetic images in a classifier run: ``data.synthetic_manifest`` rows join the *training* rows only.

Rules (each refusal names the manifest and an example row):

* the file holds only rows flagged ``synthetic`` (real images belong in ``data.manifest``);
* every synthetic image comes from a patient who is a *training* patient of this run (its ``patient_id``
  is its source patient's, :mod:`covidcxr.data.synthetic`): an image made from a val / test / held-out
  patient would show the model that patient's X-ray;
* at most ``data.synthetic_max`` of them (a sample seeded by ``train.seed``) are added; val, test and
  external rows are never touched.

The run records what it added in ``split_info["synthetic"]`` (file, SHA-256, rows available / added,
generators) and every added row appears as ``train`` in ``split.csv``.
"""

from __future__ import annotations

import numpy as np

from covidcxr.data.manifest import Manifest
from covidcxr.data.synthetic import synthetic_mask
from covidcxr.errors import ConfigError


def add_synthetic_rows(manifest: Manifest, train_mask: np.ndarray, val_mask: np.ndarray, held_out: np.ndarray,
                       path: str, cap: int | None, seed: int, info: dict):
    """``manifest`` + the synthetic rows (as ``train``), with the three masks extended to match."""
    synth = Manifest.read(path)
    t = synth.table
    real = ~synthetic_mask(t)
    if real.any():
        raise ConfigError(f"data.synthetic_manifest {path}: {int(real.sum())} row(s) are not flagged synthetic "
                          f"(e.g. {t['image'][real].iloc[0]}); it adds generated images only, real ones go in data.manifest")
    train_patients = set(manifest.table.loc[train_mask, "patient_id"])
    outside = ~t["patient_id"].isin(train_patients).to_numpy()
    if outside.any():
        pid = t["patient_id"][outside].iloc[0]
        where = sorted(set(manifest.table.loc[manifest.table["patient_id"] == pid, "split"])) or ["not in data.manifest"]
        raise ConfigError(f"data.synthetic_manifest {path}: {int(outside.sum())} synthetic image(s) come from patients "
                          f"who are not training patients of this run (e.g. {pid}: {', '.join(where)}); a synthetic "
                          "image follows its source patient, so only training patients' images may be added")
    keep = np.arange(len(t))
    if cap is not None and len(t) > cap:
        keep = np.sort(np.random.default_rng([seed, 13]).choice(len(t), cap, replace=False))
    added = synth.replace(t.iloc[keep].assign(split="train"))
    info["synthetic"] = {"manifest": str(path), "manifest_sha256": synth.sha256(), "rows_available": int(len(t)),
                         "rows_added": int(len(added)), "synthetic_max": cap,
                         "generators": sorted(set(added.table["generator_sha256"])),
                         "labels": {str(k): int(v) for k, v in added.table["label"].value_counts().items()}}
    if not len(added):
        return manifest, train_mask, val_mask, held_out
    merged = Manifest.concat([manifest, added], name=manifest.name)
    pad = lambda mask, value: np.concatenate([mask, np.full(len(added), value, dtype=bool)])  # noqa: E731
    return merged, pad(train_mask, True), pad(val_mask, False), pad(held_out, False)
