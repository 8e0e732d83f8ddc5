"""``predict --engine ray``: Ray Data with 2 local actors on real shared images, against ``covidcxr predict``."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from serving_helpers import sample_paths, truncated_jpeg

pytestmark = pytest.mark.slow
import ray  # noqa: E402  (a dev dependency: the test never skips)

TINY_RUN = ["model.name=tf_efficientnet_lite0", "model.weights=none", "preprocess.image_size=48",
            "preprocess.intensity=percentile", "train.epochs=1", "train.batch_size=8", "train.samples_per_epoch=16",
            "train.threads=1", "train.progress=false", "train.selection_metric=auc", "data.validate_images=exists",
            "data.val_max_images=24"]


@pytest.fixture(scope="module")
def tiny_run(split_manifest, tmp_path_factory):
    from covidcxr.training import load_config
    from covidcxr.training.loop import fit

    t = split_manifest.table
    keep = np.zeros(len(t), dtype=bool)
    for (_, _, split), idx in t.groupby(["label", "source", "split"]).indices.items():
        keep[idx[:3]] = split in ("train", "val")
    folder = tmp_path_factory.mktemp("ray_tiny")
    path = split_manifest.subset(mask=keep).write(folder / "manifest.csv")
    return fit(load_config(None, TINY_RUN + [f"data.manifest={path}"]), folder / "run")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_two_actors_score_like_predict_and_resume_without_duplicates(tiny_run, split_manifest, data_root,
                                                                    tmp_path, ray_local):
    from covidcxr.data.manifest import Manifest
    from covidcxr.serving.batch import predict_run
    from covidcxr.serving.ray_scoring import score_with_ray

    # Inputs: a folder (real JPEGs, a truncated JPEG, a text file) and a manifest CSV of 20 more images.
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sample_paths(data_root):
        shutil.copy(p, folder / p.name)
    (folder / "cut.jpg").write_bytes(truncated_jpeg(data_root))
    (folder / "notes.txt").write_text("not an image")
    test = split_manifest.subset("test")
    manifest = test.subset(mask=np.arange(len(test)) < 20).write(tmp_path / "more.csv")
    inputs = [folder, manifest]

    out = tmp_path / "scored"
    first = score_with_ray(tiny_run, inputs, out, actors=2, batch_size=4, partition_size=8, stop_after_partitions=1)
    assert first.partitions_written == 1 and not (out / "predictions.csv").exists()  # a job killed after one part
    again = score_with_ray(tiny_run, inputs, out, actors=2, batch_size=4, partition_size=8, resume=True)
    # The one prediction path: the same rows as `covidcxr predict` on the same inputs.
    paths = [str(folder)] + [str(p) for p in Manifest.read(manifest).image_paths()]
    ref = predict_run(tiny_run, paths, tmp_path / "ref.csv", progress=False)
    want = pd.read_csv(ref.out).sort_values("path").reset_index(drop=True)
    assert len(want) == 25  # 5 + 20 images; the truncated JPEG is skipped

    assert again.already_done == 8 and first.predicted + again.predicted == 25
    parts = pd.concat([pd.read_csv(f) for f in sorted(out.glob("part-?????.csv"))], ignore_index=True)
    assert len(parts) == parts["path"].nunique() == 25  # no image scored twice across the two invocations
    got = pd.read_csv(out / "predictions.csv").sort_values("path").reset_index(drop=True)
    assert list(got["path"]) == list(want["path"])
    prob = [c for c in want.columns if c.startswith("prob_")]
    assert np.allclose(got[prob].to_numpy(), want[prob].to_numpy(), atol=1e-6)
    assert list(got["predicted"]) == list(want["predicted"]) and list(got["input_sha256"]) == list(want["input_sha256"])

    # Skipped as in predict: the truncated JPEG (unreadable) and the text file (ignored), with reasons.
    skipped = pd.read_csv(out / "skipped.csv")
    ref_skipped = pd.read_csv(ref.skipped_file)
    assert sorted(skipped["path"]) == sorted(ref_skipped["path"]) and len(skipped) == 2
    assert sorted(skipped["reason"]) == sorted(ref_skipped["reason"])

    # A finished job is protected without --resume; resuming it scores nothing again.
    from covidcxr.errors import CovidCXRError

    with pytest.raises(CovidCXRError, match="--resume"):
        score_with_ray(tiny_run, inputs, out, actors=2)
    done = score_with_ray(tiny_run, inputs, out, actors=2, resume=True)
    assert done.predicted == 0 and done.already_done == 26 and done.total_rows == 25
