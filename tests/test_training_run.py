"""The shared trained model (``trained_run`` fixture): a real short training on the shared data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from covidcxr.data.io import read_xray
from covidcxr.models.run import load_run
from covidcxr.models.weights import sha256_file

pytestmark = pytest.mark.slow


def test_run_directory_is_complete(trained_run):
    for name in ("run.json", "model.safetensors", "split.csv", "config.yaml", "labels.json", "metrics.jsonl", "metrics.png",
                 "val_predictions.csv", "data_counts.csv", "MODEL_CARD.md", "checkpoints/last.pt",
                 "checkpoints/best.safetensors", "audit.json"):
        assert (trained_run / name).is_file(), name
    record = json.loads((trained_run / "run.json").read_text())
    assert record["classes"] == ["non-covid", "covid"] and record["positive_class"] == "covid"
    assert record["model_sha256"] == sha256_file(trained_run / "model.safetensors")
    assert record["preprocess"]["image_size"] == 128
    assert record["preprocess"]["mean"] == [0.5, 0.5, 0.5]  # EfficientNet-Lite0's own normalisation


def test_selection_is_recorded_and_made_on_validation(trained_run):
    record = json.loads((trained_run / "run.json").read_text())
    sel = record["info"]["selection"]
    history = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert sel["metric"] == "within_source_auc" and sel["split"] == "val"
    # The selected epoch is the best one by the selection metric, and its value is recorded.
    values = [h["val_within_source_auc"] for h in history]
    assert sel["epoch"] == 1 + int(np.argmax(values)) and sel["value"] == pytest.approx(max(values))
    for h in history:
        assert {"train_loss", "val_loss", "val_auc", "lr", "images_per_s", "train_seconds"} <= set(h)
        assert 0.0 <= h["val_auc"] <= 1.0 and np.isfinite(h["train_loss"])
    # Within-source AUC is computed only where a source holds both classes (ieee8023 / Figure1).
    per_source = history[0]["val_auc_per_source"]
    assert set(per_source) <= {"s-mostafa-a/covid-chestxray-dataset", "agchung/Figure1-COVID-chestxray-dataset"}
    assert "s-mostafa-a/covid-chestxray-dataset" in per_source


def test_threshold_is_youden_on_the_validation_predictions(trained_run, split_manifest):
    from covidcxr.evaluation.thresholds import select_threshold

    record = json.loads((trained_run / "run.json").read_text())
    preds = pd.read_csv(trained_run / "val_predictions.csv")
    # The predictions are of validation rows only - never test.
    val_images = set(split_manifest.table.loc[split_manifest.table["split"] == "val", "image"])
    assert set(preds["image"]) <= val_images and len(preds) == record["info"]["data"]["val_images"]
    y = (preds["target"] == "covid").to_numpy().astype(int)
    expected = select_threshold(y, preds["p_covid"].to_numpy(), method="youden")
    assert record["threshold"] == pytest.approx(expected)
    assert record["info"]["threshold"]["chosen_on"] == "val" and record["info"]["threshold"]["method"] == "youden"


def test_loaded_model_reproduces_the_validation_predictions(trained_run, data_root):
    """Inference builds bit-identical inputs to training's, so the only slack left is float
    summation order between batch sizes: the tolerance is 1e-5, not the 2e-3 an input mismatch needs."""
    from covidcxr.models.predict import predict_paths

    run = load_run(trained_run)
    preds = pd.read_csv(trained_run / "val_predictions.csv")
    out = predict_paths(run, [data_root / p for p in preds["image"]], batch_size=7, progress=False)
    assert not out.skipped and len(out.table) == len(preds)
    np.testing.assert_allclose(out.table["prob_covid"].to_numpy(), preds["p_covid"].to_numpy(), rtol=0, atol=1e-5)


def test_full_resolution_originals_are_preprocessed_like_their_512px_copies(trained_run, data_root):
    """The service sees native-resolution files. Before the one pipeline, intensity standardisation
    ran on the full-resolution decode at inference and on the 512 px working image in training: the
    2721 px Kermany original scored 0.49 against 0.0000 for its 512 px copy. Now every input is
    brought to the working size first, so an original and its copy give the same tensor up to the
    copy's own re-encoding (JPEG q90 by another resizer): mean abs difference <= 0.013 measured with
    CLAHE, where the old full-resolution path gave up to 0.064 (NORMAL2 0.037, tpmd 0.064).

    Probabilities are checked only where the issue's reproduction was: how far a model moves under
    the copies' re-encoding is the model's robustness, which depends on the trained weights (this
    small test model moved COVID-00015b from 0.15 to 0.83 on a mean tensor change of 0.0024) and is
    tracked by the compression-invariance proxy (docs/training.md), not by a fixed bound here."""
    from covidcxr.models.predict import prepare_input, predict_paths

    run = load_run(trained_run)
    pairs = pd.read_csv(data_root / "originals" / "originals.csv")
    assert len(pairs) >= 10
    for spec in (run.spec, run.spec.model_copy(update={"intensity": "clahe"})):
        for original, copy in zip(pairs["file"], pairs["image"]):
            a = prepare_input(data_root / original, spec).tensor
            b = prepare_input(data_root / copy, spec).tensor
            assert a.shape == b.shape, (original, a.shape, b.shape)
            assert (a - b).abs().mean().item() < 0.02, (spec.intensity, original, (a - b).abs().mean().item())
    normal = "originals/NORMAL2-IM-1302-0001.jpeg"
    copy = pairs.set_index("file").loc[normal, "image"]
    scores = predict_paths(run, [data_root / normal, data_root / copy], progress=False).table["prob_covid"]
    assert abs(scores.iloc[0] - scores.iloc[1]) < 0.02, scores.tolist()


def test_provenance_and_model_card(trained_run, split_manifest):
    record = json.loads((trained_run / "run.json").read_text())
    info = record["info"]
    assert info["training_manifest"]["sha256"] == split_manifest.sha256()
    counts = pd.read_csv(trained_run / "data_counts.csv")
    assert counts["images"].sum() == len(split_manifest)
    assert set(counts["split"]) == {"train", "val", "test"}
    labels = json.loads((trained_run / "labels.json").read_text())
    assert labels["manifest_label_to_class"]["pneumonia"] == "non-covid"
    card = (trained_run / "MODEL_CARD.md").read_text()
    assert "Research use only" in card and "Not a medical device" in card
    assert "within_source_auc" in card and f"{info['selection']['value']:.3f}" in card
    assert "Source confounding" in card
    # The audit's source-confounding warning for the shared data reaches the card.
    assert "predictable from the source" in card
