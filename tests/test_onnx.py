"""ONNX export: parity with PyTorch on real X-rays, dynamic batch, SHA-256 checks, ONNX backend in predict + serve."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from serving_helpers import sample_paths, serving_run



@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """A private copy of the trained run with model.onnx exported into it (one export for the module)."""
    from covidcxr.cli import app
    from typer.testing import CliRunner

    run_dir = serving_run(request, tmp_path_factory)
    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture(scope="module")
def real_batch(exported, data_root):
    from covidcxr.data import read_xray
    from covidcxr.data.preprocess import preprocess
    from covidcxr.models.run import load_run

    spec = load_run(exported).spec
    return torch.stack([preprocess(read_xray(p).pixels, spec) for p in sample_paths(data_root)])


def test_export_records_hash_and_matches_pytorch_on_real_images(exported, real_batch):
    from covidcxr.models.run import load_run
    from covidcxr.models.weights import sha256_file
    from covidcxr.serving.onnx import load_onnx_run

    record = json.loads((exported / "run.json").read_text())
    assert record["onnx"]["sha256"] == sha256_file(exported / "model.onnx")
    torch_run, onnx_run = load_run(exported), load_onnx_run(exported)
    assert record["onnx"]["source_model_sha256"] == torch_run.model_sha256 == onnx_run.model_sha256
    expected = torch_run.predict_tensor(real_batch)
    got = onnx_run.predict_tensor(real_batch)  # batch of 5: the batch axis is dynamic
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # the graph outputs probabilities
    assert np.abs(got - expected).max() < 1e-4
    single = np.concatenate([onnx_run.predict_tensor(real_batch[i : i + 1]) for i in range(len(real_batch))])
    assert np.abs(single - got).max() < 1e-5
    assert onnx_run.decide(got) == torch_run.decide(expected)


def test_predict_cli_onnx_backend_matches_torch(exported, data_root, tmp_path):
    from covidcxr.cli import app
    from typer.testing import CliRunner

    images = [str(p) for p in sample_paths(data_root, 3)]
    runner = CliRunner()
    for backend in ("torch", "onnx"):
        result = runner.invoke(app, ["predict", str(exported), *images, "--out", str(tmp_path / f"{backend}.csv"),
                                     "--backend", backend])
        assert result.exit_code == 0, result.output
    t, o = pd.read_csv(tmp_path / "torch.csv"), pd.read_csv(tmp_path / "onnx.csv")
    probs = [c for c in t.columns if c.startswith("prob_")]
    assert (o["backend"] == "onnx").all() and (t["backend"] == "torch").all()
    assert np.abs(t[probs].to_numpy() - o[probs].to_numpy()).max() < 1e-4
    assert (t["predicted"] == o["predicted"]).all() and (t["model_sha256"] == o["model_sha256"]).all()


def test_onnx_file_tampering_and_stale_exports_are_refused(exported, tmp_path):
    import shutil

    from covidcxr.errors import WeightsError
    from covidcxr.models.run import update_run_record
    from covidcxr.serving.onnx import load_onnx_run

    copy = tmp_path / "run"
    shutil.copytree(exported, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-100] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match the recorded"):
        load_onnx_run(copy)
    shutil.copy(exported / "model.onnx", copy / "model.onnx")
    record = json.loads((copy / "run.json").read_text())
    update_run_record(copy, onnx={**record["onnx"], "source_model_sha256": "0" * 64})
    with pytest.raises(WeightsError, match="export again"):
        load_onnx_run(copy)


def test_service_onnx_backend(exported, data_root, tmp_path):
    from fastapi.testclient import TestClient

    from covidcxr.data import read_xray
    from covidcxr.models.run import load_run
    from covidcxr.serving.app import ServiceSettings, create_app

    image = sample_paths(data_root, 1)[0]
    app = create_app(exported, ServiceSettings(backend="onnx", heatmaps=False,
                                               audit_db=f"sqlite:///{tmp_path / 'audit.sqlite'}"))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        response = client.post("/v1/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["backend"] == "onnx" and body["model"]["onnx_sha256"]
    assert body["heatmap"] is None
    run = load_run(exported)
    expected = run.predict_arrays([read_xray(image).pixels])[0]
    got = np.array([body["probabilities"][c] for c in run.classes])
    assert np.abs(got - expected).max() < 1e-4


def test_channels_last_prediction_path_matches_nchw_and_exports_a_plain_graph(exported, real_batch):
    """load_run keeps the model NHWC (faster depthwise convolutions on CPU); that changes float rounding
    only, and the ONNX graph is traced from an NCHW copy, so it has no shape-juggling or decomposed softmax."""
    import collections

    import onnx

    from covidcxr.models.run import load_run

    run = load_run(exported)
    conv_weights = [m.weight for m in run.model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.ndim == 4]
    assert conv_weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    nhwc = run.predict_tensor(real_batch)
    with torch.no_grad():
        nchw = run.model.to(memory_format=torch.contiguous_format)(real_batch).softmax(dim=1).numpy()
    assert np.abs(nhwc - nchw).max() < 1e-5
    ops = collections.Counter(n.op_type for n in onnx.load(str(exported / "model.onnx")).graph.node)
    assert ops["Softmax"] == 1 and not {"Shape", "Gather", "Range"} & set(ops), ops
