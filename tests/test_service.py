"""The FastAPI service on a real model: predictions, bad input, limits, token, audit log, model card."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving_helpers import (DICOM, ct_dicom, dicom_identifiers, sample_paths,
                             serving_run, truncated_jpeg)


TOKEN = "test-token-3f9a"
MAX_UPLOAD = 8 * 1024 * 1024  # the shared 7.2 MB DICOM fits; 9 MB does not
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE_URL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def run_dir(request, tmp_path_factory):
    run_dir = serving_run(request, tmp_path_factory)
    card = run_dir / "MODEL_CARD.md"
    if not card.is_file():  # training writes one; make sure the endpoint has one to serve either way
        card.write_text("# Test model card\n\nIntended use: research.\n")
    return run_dir


@pytest.fixture(scope="module")
def service(run_dir, tmp_path_factory):
    from covidcxr.serving.app import ServiceSettings, create_app

    audit_url = f"sqlite:///{tmp_path_factory.mktemp('audit') / 'audit.sqlite'}"
    app = create_app(run_dir, ServiceSettings(token=TOKEN, audit_db=audit_url, max_upload_bytes=MAX_UPLOAD))
    with TestClient(app, base_url=BASE_URL) as client:  # the Host header must be a local name
        yield client, app


def _post(client, name: str, data: bytes, headers=AUTH, **params):
    return client.post("/v1/predict", files={"file": (name, data, "application/octet-stream")}, headers=headers,
                       params=params)


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _assert_good(client, data_root):
    image = sample_paths(data_root, 1)[0]
    response = _post(client, "good.jpg", image.read_bytes(), heatmap="false")
    assert response.status_code == 200, response.text


def test_predict_returns_probabilities_label_and_heatmap(service, data_root):
    from covidcxr.data import read_xray
    from covidcxr.models.run import load_run

    client, app = service
    image = sample_paths(data_root, 1)[0]
    response = _post(client, image.name, image.read_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    run = load_run(app.state.service.run_dir)
    pixels = read_xray(image).pixels
    expected = run.predict_arrays([pixels])[0]
    got = np.array([body["probabilities"][c] for c in run.classes])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert body["predicted"] == run.decide(expected[None])[0]
    assert body["threshold"] == run.threshold and body["model"]["sha256"] == run.model_sha256
    assert body["input_sha256"] == __import__("hashlib").sha256(image.read_bytes()).hexdigest()
    assert "not a medical device" in body["disclaimer"]
    # the layers are real PNGs in the image's aspect ratio, and the heatmap is not flat
    grey, heat, overlay = (_png(body["image"]["image_png"]), _png(body["heatmap"]["heatmap_png"]),
                           _png(body["heatmap"]["overlay_png"]))
    h, w = pixels.shape
    assert grey.shape == (body["image"]["height"], body["image"]["width"])
    assert abs(grey.shape[1] / grey.shape[0] - w / h) < 0.02
    assert heat.shape[:2] == grey.shape and overlay.shape[:2] == grey.shape
    assert heat[..., :3].std() > 5
    assert np.abs(overlay[..., 0].astype(int) - grey.astype(int)).mean() > 1


@pytest.mark.parametrize("case", ["zero_bytes", "text_as_png", "truncated_jpeg", "ct_dicom", "oversized"])
def test_bad_input_gets_4xx_and_service_stays_up(service, data_root, case):
    client, _ = service
    data, name, status, words = {
        "zero_bytes": (b"", "empty.png", 422, "empty file"),
        "text_as_png": (b"patient notes, not pixels\n" * 10, "scan.png", 422, "text file"),
        "truncated_jpeg": (truncated_jpeg(data_root), "cut.jpg", 422, "truncated"),
        "ct_dicom": (ct_dicom(data_root), "ct.dcm", 422, "CT"),
        "oversized": (b"\0" * (MAX_UPLOAD + 1024 * 1024), "huge.png", 413, "too large"),
    }[case]
    response = _post(client, name, data)
    assert response.status_code == status, response.text
    assert words.lower() in response.json()["detail"].lower()
    if status == 422:
        assert response.json()["detail"].startswith(name)  # the message names the file
    _assert_good(client, data_root)


def test_pixel_bomb_and_chunked_oversized_upload_are_refused(service, data_root):
    from PIL import Image

    client, _ = service
    buf = io.BytesIO()
    Image.new("L", (7000, 7000)).save(buf, format="PNG")  # 49 megapixels in a few kB
    assert len(buf.getvalue()) < 100_000
    response = _post(client, "bomb.png", buf.getvalue())
    assert response.status_code == 422 and "max_pixels" in response.json()["detail"]

    def chunked_body():  # no Content-Length: the limit must hold while streaming
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        for _ in range(MAX_UPLOAD // (1 << 20) + 2):
            yield b"\0" * (1 << 20)
        yield b"\r\n--b--\r\n"

    response = client.post("/v1/predict", content=chunked_body(), headers={
        **AUTH, "content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and "too large" in response.json()["detail"]
    _assert_good(client, data_root)


def test_timeout_gives_504_and_next_request_works(service, data_root):
    client, app = service
    settings = app.state.service.settings
    image = sample_paths(data_root, 1)[0]
    original = settings.timeout_s
    settings.timeout_s = 1e-4
    try:
        response = _post(client, image.name, image.read_bytes())
    finally:
        settings.timeout_s = original
    assert response.status_code == 504 and "longer than" in response.json()["detail"]
    _assert_good(client, data_root)


def test_token_is_enforced(service, data_root):
    client, _ = service
    image = sample_paths(data_root, 1)[0]
    assert _post(client, image.name, image.read_bytes(), headers={}).status_code == 401
    wrong = _post(client, image.name, image.read_bytes(), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "token" in wrong.json()["detail"]
    ok = _post(client, image.name, image.read_bytes(), headers={"X-API-Token": TOKEN}, heatmap="false")
    assert ok.status_code == 200
    assert client.get("/v1/model").status_code == 401
    assert client.get("/healthz").json() == {"status": "ok"}  # liveness needs no token, and tells nothing else


def dump_of(rows) -> str:
    return json.dumps(rows, default=str)


def test_audit_log_has_every_request_and_no_patient_data(service, data_root):
    from covidcxr.serving.audit_log import AuditLog

    client, app = service
    audit: AuditLog = app.state.service.audit
    before = len(audit.rows())
    dicom = (data_root / DICOM).read_bytes()
    identifiers = dicom_identifiers(data_root)
    assert identifiers and all(v.encode() in dicom for v in identifiers[:2])  # the file does carry them
    ok = _post(client, "study.dcm", dicom, heatmap="false")
    assert ok.status_code == 200, ok.text
    assert not any(v in ok.text for v in identifiers)
    bad = _post(client, "DOE^JANE_MRN4711.png", b"not an image")  # file names often carry patient ids
    assert bad.status_code == 422 and "DOE^JANE_MRN4711.png" in bad.json()["detail"]  # the user is told which file
    refused_before = sum(n for (status, _), n in app.state.rejections.total.items() if status == 401)
    assert _post(client, "study.dcm", dicom, headers={}).status_code == 401
    assert _post(client, "big.png", b"\0" * (MAX_UPLOAD + 1)).status_code == 413
    rows = audit.rows()
    # a 401 is answered from the headers and only counted (a flood of them must not flood the log)
    assert len(rows) == before + 3
    assert sum(n for (status, _), n in app.state.rejections.total.items() if status == 401) == refused_before + 1
    too_big, last_bad, last_ok = rows[:3]
    assert last_ok["status_code"] == 200 and last_ok["predicted"] == ok.json()["predicted"]
    assert last_ok["input_sha256"] == __import__("hashlib").sha256(dicom).hexdigest()
    assert last_ok["input_bytes"] == len(dicom)
    assert json.loads(last_ok["probabilities_json"]) == ok.json()["probabilities"]
    assert last_ok["model_sha256"] == ok.json()["model"]["sha256"] and last_ok["latency_ms"] > 0
    assert last_bad["status_code"] == 422 and "text file" in last_bad["error"]
    assert last_bad["error"].startswith("ImageReadError: ")  # the reason's class and message, nothing else
    assert "DOE^JANE" not in last_bad["error"] and "MRN4711" not in dump_of(rows)
    assert too_big["status_code"] == 413 and "too large" in too_big["error"]
    dump = json.dumps(rows, default=str)
    db_file = audit.url.removeprefix("sqlite:///")
    raw = open(db_file, "rb").read()
    for value in identifiers:
        assert value not in dump and value.encode() not in raw


def test_model_endpoint_and_page(service):
    client, app = service
    record = json.loads((app.state.service.run_dir / "run.json").read_text())
    card = client.get("/v1/model", headers=AUTH).json()
    assert card["model_card"] == (app.state.service.run_dir / "MODEL_CARD.md").read_text()
    assert card["classes"] == record["classes"] and card["threshold"] == record["threshold"]
    assert card["metrics"]["val_metrics"] == record["info"]["val_metrics"]  # validation, as stored at training
    assert card["metrics"]["threshold"]["chosen_on"] == "val"
    page = client.get("/")
    assert page.status_code == 200 and "not a medical device" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert "/v1/predict" in client.get("/openapi.json", headers=AUTH).json()["paths"]
