"""Patient-grouped, stratified splits on the real shared manifest."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.data.manifest import Manifest
from covidcxr.data.splits import assign_splits, split_summary
from covidcxr.errors import ConfigError


def test_split_manifest_is_patient_grouped_and_stratified(split_manifest):
    t = split_manifest.table
    assert set(t["split"]) == {"train", "val", "test"}
    assert t.groupby("patient_id")["split"].nunique().max() == 1  # no patient spans two splits
    share = t["split"].value_counts(normalize=True)
    assert abs(share["val"] - 0.15) < 0.02 and abs(share["test"] - 0.15) < 0.02
    # Every split sees every source, and each label with about its overall share.
    per_split_sources = t.groupby("split")["source"].nunique()
    assert (per_split_sources == t["source"].nunique()).all()
    overall = t["label"].value_counts(normalize=True)
    for split, rows in t.groupby("split"):
        got = rows["label"].value_counts(normalize=True)
        for label in ("covid", "normal", "pneumonia"):
            assert abs(got[label] - overall[label]) < 0.03, (split, label)
    # Within a big source the label mix is kept too (stratified by label x source).
    nih = t[t["source"] == "muhammedtalo/COVID-19"]
    nih_share = nih.groupby("split")["label"].apply(lambda s: (s == "normal").mean())
    assert nih_share.max() - nih_share.min() < 0.06


def test_same_seed_same_split_other_seed_differs(shared_manifest, split_manifest):
    shuffled = Manifest(shared_manifest.table.sample(frac=1.0, random_state=3), root=shared_manifest.root)
    again = assign_splits(shuffled, seed=0)
    by_image = dict(zip(split_manifest.table["image"], split_manifest.table["split"]))
    assert all(by_image[i] == s for i, s in zip(again.table["image"], again.table["split"]))  # row order does not matter
    other = assign_splits(shared_manifest, seed=1)
    assert (other.table["split"] != split_manifest.table["split"]).mean() > 0.1


def test_folds_and_holdout_source(shared_manifest):
    m = assign_splits(shared_manifest, val=0.15, test=0.15, seed=0, folds=4, holdout_sources=["kermany"])
    t = m.table
    kermany = t["patient_id"].str.startswith("kermany:")
    assert (t.loc[kermany, "split"] == "external").all() and kermany.sum() == 1327
    assert (t.loc[~kermany, "split"] != "external").all()
    dev = t["split"].isin(["train", "val"])
    assert set(t.loc[dev, "fold"]) == {0, 1, 2, 3} and (t.loc[~dev, "fold"] == -1).all()
    assert t[dev].groupby("patient_id")["fold"].nunique().max() == 1
    sizes = t[dev]["fold"].value_counts()
    assert sizes.max() / sizes.min() < 1.1
    summary = split_summary(m)
    assert list(summary.index) == ["train", "val", "test", "external"]
    assert summary.loc["external", "images"] == 1327 and summary["images"].sum() == len(t)


def test_holdout_by_full_source_name_and_typo(shared_manifest):
    small = shared_manifest.filter(lambda t: t.index % 5 == 0)
    m = assign_splits(small, holdout_sources=["rtchanon/Machine-Learning-for-COVID-19-detection-from-chest-X-RAYS"])
    assert set(m.table.loc[m.table["split"] == "external", "patient_id"].str.split(":").str[0]) == {"rsna"}
    with pytest.raises(ConfigError, match="'kermanny' matches no row"):
        assign_splits(small, holdout_sources=["kermanny"])
    with pytest.raises(ConfigError, match="leaves nothing to train on"):
        assign_splits(small, val=0.5, test=0.5)


def test_split_cli_writes_manifest(shared_manifest, tmp_path):
    small = shared_manifest.filter(lambda t: t.index % 7 == 0)
    src = small.write(tmp_path / "in.csv")
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(app, ["data", "split", str(src), "--out", str(out), "--seed", "2", "--folds", "3"])
    assert result.exit_code == 0, result.output
    written = Manifest.read(out)
    assert set(written.table["split"]) == {"train", "val", "test"}
    assert set(np.unique(written.table["fold"])) == {-1, 0, 1, 2}
    expected = assign_splits(Manifest.read(src), seed=2, folds=3).table
    assert written.table["split"].tolist() == expected["split"].tolist()
    assert written.table["fold"].tolist() == expected["fold"].tolist()
    assert "train" in result.output and "patients" in result.output


def test_small_manifest_still_gets_every_requested_split(shared_manifest):
    for n in (3, 6, 12):
        small = shared_manifest.subset(mask=np.arange(len(shared_manifest)) < n)
        for seed in range(4):
            t = assign_splits(small, seed=seed).table
            assert set(t["split"]) == {"train", "val", "test"}, (n, seed)
            assert t.groupby("patient_id")["split"].nunique().max() == 1
    only_train = assign_splits(shared_manifest.subset(mask=np.arange(len(shared_manifest)) < 12), val=0, test=0, folds=3)
    assert set(only_train.table["split"]) == {"train"} and set(only_train.table["fold"]) == {0, 1, 2}
