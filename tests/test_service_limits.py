"""The service's defences against cheap denial of service and cross-site use, on a real model.

In-process (TestClient): settings validation, Host and Origin checks, what is public without the
token, pixel and decode budgets, the inference queue. On a real uvicorn on 127.0.0.1 (bounded loops,
raw sockets): the token is checked before the body is read, slow bodies and silent connections are
timed out, and uploads / connections per client are capped - and a good request still works after.
"""

from __future__ import annotations

import io
import os
import socket
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving_helpers import DICOM, sample_paths, serving_run

TOKEN = "limits-token-77c1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE_URL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def run_dir(request, tmp_path_factory):
    return serving_run(request, tmp_path_factory)


def _app(run_dir, tmp_path, **settings):
    from covidcxr.serving.app import create_app
    from covidcxr.serving.settings import ServiceSettings

    audit = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    return create_app(run_dir, ServiceSettings(audit_db=audit, heatmaps=False, **settings))


def _post(client, name, data, headers=AUTH, **kw):
    return client.post("/v1/predict", files={"file": (name, data, "application/octet-stream")},
                       headers=headers, params={"heatmap": "false"}, **kw)


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize("values, field", [
    (dict(timeout_s=float("nan")), "timeout_s"), (dict(timeout_s=float("inf")), "timeout_s"),
    (dict(max_pixels=True), "max_pixels"), (dict(workers=0), "workers"), (dict(body_timeout_s=-1), "body_timeout_s"),
    (dict(max_uploads=2, max_uploads_per_client=5), "max_uploads_per_client"), (dict(token=" "), "token"),
    (dict(allowed_hosts=["ev*il.org"]), "allowed_hosts"), (dict(unknown_option=1), "unknown_option"),
])
def test_bad_settings_are_one_clear_config_error(values, field):
    from covidcxr.errors import ConfigError
    from covidcxr.serving.settings import parse_settings

    with pytest.raises(ConfigError, match=field):
        parse_settings(**values)


@pytest.mark.parametrize("mb", [float("nan"), float("inf"), 0, -3, 10**6, True])
def test_max_upload_mb_must_be_a_finite_size(mb):
    from covidcxr.errors import ConfigError
    from covidcxr.serving.settings import upload_bytes

    with pytest.raises(ConfigError, match="max_upload_mb"):
        upload_bytes(mb)
    assert upload_bytes(1.5) == 1572864


def test_serve_cli_refuses_nan_upload_limit_without_traceback(run_dir):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "covidcxr.cli", "serve", str(run_dir), "--max-upload-mb", "nan"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "max_upload_mb" in result.stderr and "Traceback" not in result.stderr + result.stdout


def test_token_comes_from_one_source_and_a_private_file(tmp_path):
    from covidcxr.errors import ConfigError
    from covidcxr.serving.settings import resolve_token

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        resolve_token(None, token_file, environ={})
    token_file.chmod(0o600)
    assert resolve_token(None, token_file, environ={}) == TOKEN
    assert resolve_token(None, None, environ={"COVIDCXR_TOKEN": "from-env"}) == "from-env"
    warnings = []
    assert resolve_token("on-cli", None, environ={}, warn=warnings.append) == "on-cli"
    assert any("ps" in w for w in warnings)  # --token is visible in the process list: the user is told
    with pytest.raises(ConfigError, match="one way"):
        resolve_token("on-cli", token_file, environ={})


# ---------------------------------------------------------------------------- in-process checks


def test_host_origin_and_what_is_public_without_the_token(run_dir, tmp_path, data_root):
    image = sample_paths(data_root, 1)[0].read_bytes()
    with TestClient(_app(run_dir, tmp_path, token=TOKEN), base_url=BASE_URL) as client:
        # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example
        assert client.get("/healthz", headers={"Host": "evil.example"}).status_code == 400
        # a cross-site form post is refused before the token or the body are looked at
        cross = _post(client, "x.jpg", image, headers={**AUTH, "Origin": "https://evil.example"})
        assert cross.status_code == 403 and "cross-origin" in cross.json()["detail"]
        assert _post(client, "x.jpg", image, headers={**AUTH, "Origin": "null"}).status_code == 403
        assert _post(client, "x.jpg", image, headers={**AUTH, "Sec-Fetch-Site": "cross-site"}).status_code == 403
        same = _post(client, "x.jpg", image, headers={**AUTH, "Origin": BASE_URL})  # the service's own page
        assert same.status_code == 200, same.text
        assert "access-control-allow-origin" not in same.headers  # CORS stays off
        # without the token: liveness only; no model id, no schema, no docs
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/healthz", headers=AUTH).json()["model_sha256"] == same.json()["model"]["sha256"]
        assert client.get("/openapi.json").status_code == 401
        assert client.get("/docs", headers=AUTH).status_code == 404  # the docs page cannot send a token
        assert client.get("/v1/model").status_code == 401
        page = client.get("/")
        assert page.status_code == 200 and same.json()["model"]["sha256"] not in page.text


def test_pixel_budget_refuses_a_decompression_bomb_from_its_header(run_dir, tmp_path):
    from PIL import Image

    buf = io.BytesIO()  # 6300 x 6300 black: 40 MP from a few tens of KB
    Image.fromarray(np.zeros((6300, 6300), np.uint8)).save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < 200_000
    with TestClient(_app(run_dir, tmp_path), base_url=BASE_URL) as client:
        started = time.perf_counter()
        response = _post(client, "bomb.png", buf.getvalue(), headers={})
        assert response.status_code == 422 and "max_pixels" in response.json()["detail"]
        assert time.perf_counter() - started < 5  # refused from the header, not after decoding 40 MP


def test_decode_budget_abandons_slow_decodes_with_a_clear_422(run_dir, tmp_path, data_root):
    dicom = (data_root / DICOM).read_bytes()  # a 7 MB native-resolution DICOM: far over 1 ms to decode
    with TestClient(_app(run_dir, tmp_path, decode_timeout_s=0.001), base_url=BASE_URL) as client:
        response = _post(client, "study.dcm", dicom, headers={})
        assert response.status_code == 422 and "decode budget" in response.json()["detail"]
        audit = client.app.state.service.audit.rows()[0]
        assert audit["status_code"] == 422 and audit["error"].startswith("DecodeBudget")


def test_full_inference_queue_answers_503_with_retry_after(run_dir, tmp_path, data_root):
    image = sample_paths(data_root, 1)[0].read_bytes()
    with TestClient(_app(run_dir, tmp_path, workers=1, max_queue=0), base_url=BASE_URL) as client:
        queue = client.app.state.service.queue
        slot = queue.admit()  # one prediction running: the queue (1 thread, 0 waiting) is full
        try:
            busy = _post(client, "x.jpg", image, headers={})
            assert busy.status_code == 503 and busy.headers["retry-after"].isdigit()
        finally:
            slot.close()
        assert _post(client, "x.jpg", image, headers={}).status_code == 200
        assert queue.admitted == 0  # every slot released


# ---------------------------------------------------------------------------- a real server, raw sockets


@pytest.fixture(scope="module")
def live(run_dir, tmp_path_factory):
    from covidcxr.serving.live import LiveServer

    app = _app(run_dir, tmp_path_factory.mktemp("live"), token=TOKEN, body_timeout_s=1.0, header_timeout_s=1.0,
               max_connections_per_client=4, max_uploads_per_client=2, max_uploads=4)
    with LiveServer(app) as server:
        yield server, app


def _connect(server) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=10)
    return sock


def _upload_head(length: int, token: bool = True) -> bytes:
    lines = ["POST /v1/predict?heatmap=false HTTP/1.1", "Host: 127.0.0.1",
             "Content-Type: multipart/form-data; boundary=XyZ", f"Content-Length: {length}"]
    if token:
        lines.append(f"Authorization: Bearer {TOKEN}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _answer(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1") else -1
    return status, data


def _good_request_works(server, data_root) -> None:
    import httpx

    image = sample_paths(data_root, 1)[0]
    response = httpx.post(f"{server.url}/v1/predict", params={"heatmap": "false"}, headers=AUTH, timeout=60,
                          files={"file": (image.name, image.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text


def test_token_is_checked_before_a_byte_of_the_body_is_read(live, data_root):
    server, app = live
    audited = len(app.state.service.audit.rows())
    with _connect(server) as sock:
        sock.sendall(_upload_head(31 * 2**20, token=False))  # announces 31 MiB, sends none of it
        started = time.monotonic()
        status, raw = _answer(sock)
        assert status == 401 and time.monotonic() - started < 5
        assert b"connection: close" in raw.lower()
    assert len(app.state.service.audit.rows()) == audited  # refusals are counted, not audited
    _good_request_works(server, data_root)


def test_slow_body_gets_408_and_a_silent_connection_is_closed(live, data_root):
    server, _ = live
    with _connect(server) as sock:
        sock.sendall(_upload_head(100_000) + b"--XyZ\r\n")  # then stops sending
        started = time.monotonic()
        status, _ = _answer(sock)
        assert status == 408 and 0.5 < time.monotonic() - started < 8
    with _connect(server) as sock:  # connects and never sends a request line
        started = time.monotonic()
        status, _ = _answer(sock)
        assert status == 408 and time.monotonic() - started < 8
    _good_request_works(server, data_root)


def test_uploads_and_connections_per_client_are_capped(live, data_root):
    server, app = live
    slow = []
    try:
        for _ in range(2):  # two half-sent uploads hold this client's upload allowance
            sock = _connect(server)
            sock.sendall(_upload_head(100_000) + b"--XyZ\r\n")
            slow.append(sock)
        time.sleep(0.3)
        with _connect(server) as third:
            third.sendall(_upload_head(100_000) + b"--XyZ\r\n")
            status, _ = _answer(third)
            assert status == 429
        idle = [_connect(server) for _ in range(2)]  # 2 slow + 2 idle = the 4 connections allowed
        slow += idle
        time.sleep(0.2)
        with _connect(server) as fifth:
            status, _ = _answer(fifth)
            assert status == 429
    finally:
        for sock in slow:
            sock.close()
    time.sleep(1.5)  # the slow uploads' body deadline passes; their slots are freed
    counts = app.state.rejections.total
    assert counts[(429, "uploads per client")] >= 1
    _good_request_works(server, data_root)


def test_file_descriptors_do_not_leak_under_half_sent_uploads(live, data_root):
    server, _ = live
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):  # bounded: rounds of the 1,100-half-sent-uploads attack, at the per-client cap
        socks = []
        for _ in range(4):
            sock = _connect(server)
            sock.sendall(_upload_head(1_000_000) + b"--XyZ\r\n")
            socks.append(sock)
        for sock in socks:
            sock.close()
    time.sleep(1.5)
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 4
    _good_request_works(server, data_root)


# ---------------------------------------------------------------------------- the bad-input corpus


def test_every_corpus_file_is_refused_with_422_or_predicted(run_dir, tmp_path, data_root):
    from badinput import write_corpus

    cases = [c for c in write_corpus(tmp_path / "corpus", data_root) if c.regular_file]
    assert len(cases) > 20
    with TestClient(_app(run_dir, tmp_path), base_url=BASE_URL) as client:
        for case in cases:
            name = os.fsencode(case.path.name).decode("latin-1")  # undecodable names arrive as raw bytes
            response = _post(client, name, case.path.read_bytes(), headers={})
            if case.ok:
                assert response.status_code == 200, (case.name, response.text)
            else:  # a clear 4xx naming the reason, never a 500 and never a confident answer
                assert response.status_code == 422, (case.name, response.status_code, response.text)
                assert case.reason.lower() in response.json()["detail"].lower(), (case.name, response.text)
        errors = [row["error"] for row in client.app.state.service.audit.rows() if row["status_code"] != 200]
        assert len(errors) == sum(not c.ok for c in cases) and all(e and "Traceback" not in e for e in errors)


def test_plausibility_gate_can_be_overridden_for_the_service(run_dir, tmp_path):
    from badinput import phantom
    from PIL import Image

    buf = io.BytesIO()  # a plausible radiograph-like phantom, but only 48 px wide
    Image.fromarray(phantom(96, 48)).save(buf, format="PNG")
    with TestClient(_app(run_dir, tmp_path), base_url=BASE_URL) as strict:
        refused = _post(strict, "thumb.png", buf.getvalue(), headers={})
        assert refused.status_code == 422 and "too small" in refused.json()["detail"]
    (tmp_path / "b").mkdir()
    with TestClient(_app(run_dir, tmp_path / "b", min_side=32), base_url=BASE_URL) as relaxed:
        assert _post(relaxed, "thumb.png", buf.getvalue(), headers={}).status_code == 200
