"""Grad-CAM family on real X-rays: methods, targets, layers, ensembles, output layout, CLI, ROAD.

These tests check the mechanics with small (64 px) models built from the shared ImageNet weights;
tests that need a model trained on the shared data are in test_explain_trained.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from covidcxr.data.io import read_xray
from covidcxr.data.preprocess import PreprocessSpec, preprocess
from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.explain.cam import METHODS, cam_models, compute_cams
from covidcxr.explain.faithfulness import road_scores
from covidcxr.explain.images import explain_images
from covidcxr.models.registry import create_model, get_architecture
from covidcxr.models.run import load_run, save_ensemble, save_model

ANNOTATED = [
    "images/ieee8023/covid/01E392EE-69F9-4E33-BFCE-E5C968654078.jpg",
    "images/ieee8023/covid/1-s2.0-S0140673620303706-fx1_lrg.jpg",
]
CLASSES = ["non-covid", "covid"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, weights_dir):
    root = tmp_path_factory.mktemp("explain-runs")
    torch.manual_seed(0)
    spec = PreprocessSpec(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    eff = create_model("tf_efficientnet_lite0", 2, weights=str(weights_dir / "efficientnet_lite0_imagenet_timm.pth"))
    save_model(root / "eff", eff, architecture="tf_efficientnet_lite0", classes=CLASSES, preprocess_spec=spec, threshold=0.5)
    save_model(root / "res", create_model("resnet18", 2), architecture="resnet18", classes=CLASSES, preprocess_spec=spec)
    save_ensemble(root / "ens", [root / "eff", root / "res"])
    letterbox = PreprocessSpec(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, resize="letterbox")
    save_model(root / "lb", eff, architecture="tf_efficientnet_lite0", classes=CLASSES, preprocess_spec=letterbox)
    return root


@pytest.fixture(scope="module")
def inputs(data_root):
    spec = PreprocessSpec(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    return torch.stack([preprocess(read_xray(data_root / p).pixels, spec) for p in ANNOTATED])


def test_every_registered_method_gives_a_map_per_image(runs, inputs):
    run = load_run(runs / "eff")
    for method in METHODS:
        # blocks.4 (112 channels): ScoreCAM makes one forward pass per channel, so keep it small here.
        cams = compute_cams(run, inputs, method=method, layer="blocks.4", batch_size=2 if method != "scorecam" else 64)
        assert cams.shape == (2, 64, 64), method
        assert cams.dtype == np.float32 and cams.min() >= 0 and cams.max() <= 1 + 1e-6, method
        assert all(np.ptp(c) > 0 for c in cams), method
    with pytest.raises(ConfigError, match="choose one of"):
        compute_cams(run, inputs, method="smoothgrad")


def test_target_class_and_layer_choice(runs, inputs):
    run = load_run(runs / "eff")
    default = compute_cams(run, inputs)  # positive class "covid"
    named = compute_cams(run, inputs, target_class="covid")
    other = compute_cams(run, inputs, target_class="non-covid")
    np.testing.assert_allclose(default, named, atol=1e-6)
    # For two classes the other logit's gradient has the opposite sign: a different map.
    assert np.abs(default - other).mean() > 0.05
    arch_layer = get_architecture("tf_efficientnet_lite0").cam_layer(run.model)
    assert run.model.get_submodule(cam_models(run)[0].layer) is arch_layer
    shallow = compute_cams(run, inputs, layer="blocks.3")
    assert np.abs(default - shallow).mean() > 0.01
    with pytest.raises(ConfigError, match="not a module"):
        compute_cams(run, inputs, layer="blocks.99")
    with pytest.raises(ConfigError, match="classes are"):
        compute_cams(run, inputs, target_class="pneumonia")


def test_ensemble_map_is_the_average_of_its_members(runs, inputs):
    ens = load_run(runs / "ens")
    members = cam_models(ens)
    assert [m.architecture for m in members] == ["tf_efficientnet_lite0", "resnet18"]
    assert [m.weight for m in members] == [0.5, 0.5]
    for m, member in zip(members, ens.model.members):
        assert member.get_submodule(m.layer) is get_architecture(m.architecture).cam_layer(member)
    a = compute_cams(load_run(runs / "eff"), inputs)
    b = compute_cams(load_run(runs / "res"), inputs)
    mean = (a + b) / 2
    lo, hi = mean.min(axis=(1, 2), keepdims=True), mean.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(compute_cams(ens, inputs), (mean - lo) / (hi - lo), atol=1e-5)


def test_explain_images_writes_the_documented_layout(runs, data_root, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    images = [data_root / p for p in ANNOTATED] + [bad, data_root / "images/rsna/normal/" / sorted(
        (data_root / "images/rsna/normal").iterdir())[0].name]
    out = tmp_path / "explain"
    summary = explain_images(runs / "lb", images, method="gradcam++", out=out)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["method"] == "gradcam++" and on_disk["target_class"] == "covid"
    assert [s["image"] for s in on_disk["skipped"]] == [str(bad)] and "not" in on_disk["skipped"][0]["reason"]
    assert len(on_disk["images"]) == 3 and (out / "contact_sheet.png").stat().st_size > 10_000
    run = load_run(runs / "lb")
    expected = run.predict_arrays([read_xray(p).pixels for p in images if p != bad])
    for entry, probs in zip(on_disk["images"], expected):
        assert (out / entry["overlay"]).is_file() and entry["overlay"].endswith("_gradcam++.png")
        per_image = json.loads((out / entry["json"]).read_text())
        assert per_image["probabilities"] == entry["probabilities"]
        np.testing.assert_allclose([entry["probabilities"][c] for c in CLASSES], probs, atol=1e-5)
        assert entry["predicted_label"] == run.decide(probs[None])[0]
    focus = [e["lung_focus"] for e in on_disk["images"]]
    assert focus[0]["region"] == "v7labs" and 0 <= focus[0]["mass_share"] <= 1 and focus[2] is None
    assert on_disk["lung_focus_summary"]["n"] == 2
    assert summary["images"] == on_disk["images"]


def test_same_stem_images_do_not_overwrite_each_other(runs, data_root, tmp_path):
    src = data_root / ANNOTATED[0]
    (tmp_path / "a").mkdir()
    copy = tmp_path / "a" / src.name
    copy.write_bytes(src.read_bytes())
    summary = explain_images(runs / "eff", [src, copy], out=tmp_path / "out")
    assert len({e["overlay"] for e in summary["images"]}) == 2
    assert summary["images"][1]["lung_focus"] is None  # the copy is outside the data root: no annotation


def test_cli_explain_and_one_line_errors(runs, data_root, tmp_path):
    from typer.testing import CliRunner

    from covidcxr.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["explain", str(runs / "eff"), str(data_root / ANNOTATED[0]), "--method", "eigencam",
                              "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "lung focus (n=1)" in res.output
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["method"] == "eigencam"
    res = runner.invoke(app, ["explain", str(tmp_path / "nope"), str(data_root / ANNOTATED[0])])
    assert isinstance(res.exception, CovidCXRError) and "not a covidcxr run directory" in str(res.exception)
    res = runner.invoke(app, ["explain", str(runs / "eff"), "--patient", "ieee8023:205"])
    assert isinstance(res.exception, CovidCXRError) and "--manifest" in str(res.exception)


class _LeftTextureModel(nn.Module):
    """Logit of class 1 grows with the texture (std) of the left half; the right half is irrelevant by construction."""

    def forward(self, x):
        texture = x[..., : x.shape[-1] // 2].std(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(texture), 8 * (texture - 0.25)], dim=1)


def test_road_rewards_the_map_that_marks_what_the_model_uses(data_root):
    img = torch.from_numpy(read_xray(data_root / ANNOTATED[0]).pixels)
    x = torch.nn.functional.interpolate(img[None, None], size=(32, 32), mode="area").expand(-1, 3, -1, -1).clone()
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 1.0 - 0.5
    x[..., :16] += checker[:, :16]  # texture on the left half: what the model responds to
    x = x.repeat(2, 1, 1, 1)
    rank = np.random.default_rng(0).random((32, 32)).astype(np.float32) * 0.5
    left = np.zeros((32, 32), dtype=np.float32)
    left[:, :16] = 0.5
    cams = np.stack([left + rank, 0.5 - left + rank])  # image 0: the true map; image 1: the mirrored, wrong one
    scores = road_scores(_LeftTextureModel(), x, cams, [1, 1], percentiles=(50, 70, 90))
    assert scores["combined"][0] > 0.05 > -0.05 > scores["combined"][1]
    assert scores["morf"][0] < scores["morf"][1]
    again = road_scores(_LeftTextureModel(), x, cams, [1, 1], percentiles=(50, 70, 90))
    np.testing.assert_allclose(again["combined"], scores["combined"])  # seeded: reproducible


def test_multiclass_run_without_positive_class_explains_the_predicted_class(tmp_path, inputs):
    torch.manual_seed(1)
    spec = PreprocessSpec(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    save_model(tmp_path / "three", create_model("resnet18", 3), architecture="resnet18",
               classes=["normal", "pneumonia", "other"], preprocess_spec=spec)
    run = load_run(tmp_path / "three")
    assert run.positive_class is None
    predicted = [int(k) for k in run.predict_tensor(inputs).argmax(1)]
    np.testing.assert_allclose(compute_cams(run, inputs), compute_cams(run, inputs, class_indices=predicted), atol=1e-6)
    other = [(k + 1) % 3 for k in predicted]
    assert np.abs(compute_cams(run, inputs) - compute_cams(run, inputs, class_indices=other)).mean() > 0.01


def test_dicom_input_and_sanity_cli(runs, data_root, tmp_path):
    from typer.testing import CliRunner

    from covidcxr.cli import app

    dicom = data_root / "dicom" / "RG1_UNCR.dcm"
    summary = explain_images(runs / "eff", [dicom], out=tmp_path / "dcm")
    assert not summary["skipped"] and summary["images"][0]["lung_focus"] is None
    assert (tmp_path / "dcm" / "RG1_UNCR_gradcam.png").stat().st_size > 10_000
    res = CliRunner().invoke(app, ["explain", str(runs / "res"), *[str(data_root / p) for p in ANNOTATED],
                                   "--sanity", "full", "--method", "gradcam,eigencam", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    methods = json.loads((tmp_path / "s" / "sanity.json").read_text())["methods"]
    assert set(methods) == {"gradcam", "eigencam"} and "mean |rho|" in res.output


def test_flip_tta_run_map_is_the_mean_of_image_and_mirrored_back_mirror(runs, inputs, tmp_path):
    # k-fold ensembles record tta: [hflip]; Grad-CAM must explain the wrapped network on both views
    import shutil

    from covidcxr.models.run import update_run_record

    tta_dir = shutil.copytree(runs / "res", tmp_path / "res_tta")
    update_run_record(tta_dir, tta=["hflip"])
    tta = load_run(tta_dir)
    members = cam_models(tta)
    assert [(m.weight, m.hflip) for m in members] == [(0.5, False), (0.5, True)]
    assert members[0].model.get_submodule(members[0].layer) is get_architecture("resnet18").cam_layer(members[0].model)
    plain = load_run(runs / "res")
    a = compute_cams(plain, inputs)
    b = compute_cams(plain, torch.flip(inputs, dims=[3]))[..., ::-1]
    mean = (a + b) / 2
    lo, hi = mean.min(axis=(1, 2), keepdims=True), mean.max(axis=(1, 2), keepdims=True)
    got = compute_cams(tta, inputs)
    np.testing.assert_allclose(got, (mean - lo) / (hi - lo), atol=1e-5)
    assert not np.allclose(got, a, atol=1e-3)  # the mirrored view really contributes
