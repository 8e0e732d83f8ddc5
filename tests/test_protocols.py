"""Label decomposition and the recipe protocols (out-of-fold within-source AUC, leave-one-source-out) on real
shared images with tiny models: every image of a mixed source is scored once, by a model that never saw its
patient; a held-out source never trains; finished models are reused."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from covidcxr.errors import ConfigError
from covidcxr.training import load_config
from covidcxr.training.decomposition import LabelDecomposition

pytestmark = pytest.mark.slow

TINY = ["model.name=tf_efficientnet_lite0", "model.weights=${COVIDCXR_WEIGHTS_DIR}/efficientnet_lite0_imagenet_timm.pth",
        "model.weights_sha256=711997994847d2d492117ee702a3aa7f2e37bc1898d00ffe67e7288f16274ac1",
        "preprocess.image_size=64", "preprocess.working_size=128", "preprocess.intensity=none",
        "train.epochs=1", "train.batch_size=16", "train.samples_per_epoch=32", "train.progress=false",
        "train.threads=2", "train.selection_metric=val_loss", "data.validate_images=exists"]
DECOMP = ["data.label_space=3class", "train.objective=label_decomposition", "train.sampler=source_balanced",
          "train.single_class_source_weight=0"]


def test_decomposition_learns_only_within_source_contrasts():
    cells = [("kermany", 0), ("kermany", 1), ("ieee", 1), ("ieee", 2), ("rsna", 0), ("ieee", 0)]
    objective = LabelDecomposition(["normal", "pneumonia", "covid"], cells)
    assert objective.abnormal_cells.tolist() == [True, True, True, False, False, True]
    assert objective.covid_cells.tolist() == [False, False, True, True, False, False]
    # A COVID image and an RSNA normal: the cross-source "COVID vs normal" contrast of the shortcut gets no
    # gradient - the normal image none at all, the COVID image none on its normal logit (only COVID vs pneumonia).
    logits = torch.randn(2, 3, requires_grad=True)
    objective(logits, None, torch.tensor([2, 0]), torch.tensor([3, 4])).backward()
    assert torch.equal(logits.grad[1], torch.zeros(3))
    assert logits.grad[0, 0].abs() < 1e-7 and logits.grad[0, 2] < 0
    # The loss is exactly the two factored binary cross-entropies.
    logits = torch.randn(4, 3)
    targets, groups = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 3, 2])
    p = logits.softmax(1)
    abn = -(torch.log(p[0, 0]) + torch.log(1 - p[1, 0]) + torch.log(1 - p[3, 0])) / 3
    cov = -(torch.log(p[2, 2] / (p[2, 1] + p[2, 2])) + torch.log(p[3, 1] / (p[3, 1] + p[3, 2]))) / 2
    assert objective(logits, None, targets, groups).item() == pytest.approx((abn + cov).item(), rel=1e-5)


def test_decomposition_config_errors_say_what_to_do():
    with pytest.raises(ConfigError, match="3class"):
        LabelDecomposition(["non-covid", "covid"], [("a", 0), ("a", 1)])
    with pytest.raises(ConfigError, match="no training source holds both COVID and pneumonia"):
        LabelDecomposition(["normal", "pneumonia", "covid"], [("a", 0), ("a", 1), ("b", 2)])
    with pytest.raises(ConfigError, match="source_balanced"):
        load_config(None, DECOMP + ["train.sampler=none"])


@pytest.fixture(scope="module")
def small_manifest(shared_manifest):
    """Two mixed sources (ieee8023 and Figure1, patient-complete) and ~40 images of each one-class source."""
    t = shared_manifest.table
    mixed = t[t.source.str.contains("covid-chestxray|Figure1")]
    keep_patients = mixed.patient_id.drop_duplicates().sample(50, random_state=0)
    rows = pd.concat([mixed[mixed.patient_id.isin(keep_patients)],
                      t[~t.source.str.contains("covid-chestxray|Figure1")].groupby(["source", "label"]).head(12)])
    return shared_manifest.replace(rows.reset_index(drop=True))


def test_out_of_fold_scores_every_mixed_image_once_by_a_model_blind_to_its_patient(small_manifest, tmp_path):
    from covidcxr.training.protocols import out_of_fold_within_source

    config = load_config(None, TINY + DECOMP)
    result = out_of_fold_within_source(config, small_manifest, tmp_path, folds=2)
    scores = pd.read_csv(tmp_path / "oof_scores.csv")
    t = small_manifest.table
    t = t[t.label != "other"]
    both = [s for s, g in t.groupby("source") if 0 < (g.label == "covid").sum() < len(g)]
    assert result["sources"] == sorted(both) and any("covid-chestxray" in s for s in both)
    mixed = t[t.source.isin(both)]
    assert sorted(scores.image) == sorted(mixed.image)  # each once
    for k in (0, 1):
        split = pd.read_csv(tmp_path / f"fold_{k}" / "split.csv")
        scored = set(scores.loc[scores.fold == k, "patient_id"])
        trained = set(split.loc[split.run_split.isin(["train", "val"]), "patient_id"])
        assert scored and not scored & trained
    w = result["within_source_auc"]
    assert 0 <= w["value"] <= 1 and w["ci_low"] <= w["value"] <= w["ci_high"]
    assert result["n"] == len(mixed) and result["positives"] == int((mixed.label == "covid").sum())
    assert json.loads((tmp_path / "oof.json").read_text())["within_source_auc"]["value"] == w["value"]
    by = result["within_source_auc_by_negative_label"]  # COVID against each kind of negative alone
    assert set(by) == set(mixed.loc[mixed.label != "covid", "label"])
    paired = [by[k]["negatives_in_pairs"] for k in by if by[k]["value"] is not None]
    assert paired and sum(paired) <= int((mixed.label != "covid").sum())
    weights = tmp_path / "fold_0" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = out_of_fold_within_source(config, small_manifest, tmp_path, folds=2)  # reuses the finished models
    assert weights.stat().st_mtime_ns == before and again["within_source_auc"] == result["within_source_auc"]
    # the command says the same, with the split by kind of negative, and reuses the models as well
    from covidcxr.cli import app

    manifest = tmp_path / "m.csv"
    small_manifest.write(manifest)
    (tmp_path / "cfg.yaml").write_text("{}\n")
    cli = CliRunner().invoke(app, ["crossval", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path), "--folds", "2",
                                   *TINY, *DECOMP, f"data.manifest={manifest}"])
    assert cli.exit_code == 0, cli.output
    assert f"out-of-fold within-source AUC {w['value']:.3f}" in cli.output
    normal = by["normal"]
    if normal["value"] is not None:
        assert f"COVID vs normal only: {normal['value']:.3f}" in cli.output
    assert "COVID vs pneumonia only" in cli.output and weights.stat().st_mtime_ns == before


def test_leave_one_source_out_cli_never_trains_on_the_held_out_source(small_manifest, tmp_path):
    from covidcxr.cli import app

    manifest = tmp_path / "m.csv"
    small_manifest.write(manifest)
    nih = "muhammedtalo/COVID-19"
    from covidcxr.training.protocols import leave_one_source_out

    result = leave_one_source_out(load_config(None, TINY + [f"data.manifest={manifest}"]), small_manifest,
                                  tmp_path / "loso", sources=[nih])
    entry = result["held_out"][nih]
    assert entry["auc"] is None and entry["positives"] == 0 and entry["n"] == 24  # 12 normal + 12 pneumonia
    assert 0 <= entry["false_positive_rate"] <= 1 and 0 <= entry["mean_p_negatives"] <= 1
    split = pd.read_csv(next((tmp_path / "loso").glob("without_*")) / "split.csv")
    assert not (split.loc[split.run_split.isin(["train", "val"]), "source"] == nih).any()
    bad = CliRunner().invoke(app, ["crossval", "cfg.yaml", "--out", str(tmp_path / "x"), "--protocol", "kfold"])
    assert bad.exit_code != 0
    assert np.isfinite(entry["threshold"])
    assert set(entry["mean_p_by_label"]) == {"normal", "pneumonia"} and entry["auc_by_negative_label"] == {}

    # Holding out a COVID source from the command line adds its entry to loso.json beside NIH's, with the
    # held-out images' mean P(covid) and the AUC against each kind of negative.
    ieee = "s-mostafa-a/covid-chestxray-dataset"
    (tmp_path / "cfg.yaml").write_text("{}\n")
    cli = CliRunner().invoke(app, ["crossval", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "loso"),
                                   "--protocol", "loso", "--source", ieee, *TINY, f"data.manifest={manifest}"])
    assert cli.exit_code == 0, cli.output
    saved = json.loads((tmp_path / "loso" / "loso.json").read_text())["held_out"]
    assert set(saved) == {nih, ieee} and saved[nih]["n"] == 24
    scores = pd.read_csv(tmp_path / "loso" / "without_s_mostafa_a_covid_chestxray_dataset" / "protocol_scores.csv")
    assert set(scores.source) == {ieee}
    by = saved[ieee]
    for label, group in scores.groupby("label"):
        assert by["mean_p_by_label"][label] == pytest.approx(group.score.mean())
    from sklearn.metrics import roc_auc_score

    normal = scores[scores.label.isin(["covid", "normal"])]
    assert by["auc_by_negative_label"]["normal"]["value"] == pytest.approx(
        roc_auc_score(normal.label == "covid", normal.score))
    assert f"COVID vs normal {by['auc_by_negative_label']['normal']['value']:.3f}" in cli.output
    wrong = CliRunner().invoke(app, ["crossval", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "y"),
                                     "--source", ieee, *TINY, f"data.manifest={manifest}"])
    assert wrong.exit_code != 0 and "--source applies to --protocol loso only" in str(wrong.exception or wrong.output)


def test_out_of_fold_protocol_trains_the_configs_seed_ensemble_in_every_fold(small_manifest, tmp_path):
    """crossval scores what the config ships: with ensemble.seeds each fold is a seed ensemble whose scores
    are its members' mean; a k-fold ensemble inside the folds is refused with what to do."""
    from covidcxr.evaluation.proxies import predict_files, split_rows
    from covidcxr.models.run import load_run
    from covidcxr.training.protocols import out_of_fold_within_source

    config = load_config(None, TINY + ["ensemble.seeds=[0, 1]"])
    out_of_fold_within_source(config, small_manifest, tmp_path, folds=2)
    scores = pd.read_csv(tmp_path / "oof_scores.csv")
    for k in (0, 1):
        run = load_run(tmp_path / f"fold_{k}")
        assert run.record.members == ["members/seed_0", "members/seed_1"]
        rows = split_rows(run, "test")
        members = [predict_files(m, rows["path"])[0]["score"].to_numpy() for m in run.members]
        assert not np.allclose(members[0], members[1])  # two trainings, not one twice
        np.testing.assert_allclose(np.sort(scores.loc[scores.fold == k, "score"].to_numpy()),
                                   np.sort(np.mean(members, axis=0)), atol=1e-6)
    with pytest.raises(ConfigError, match="ensemble.folds"):
        out_of_fold_within_source(load_config(None, TINY + ["ensemble.folds=2"]), small_manifest, tmp_path / "k",
                                  folds=2)
