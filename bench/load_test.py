"""Bounded load test of ``covidcxr serve`` on loopback: N requests from C concurrent clients.

    .venv/bin/python bench/load_test.py RUN_DIR [--requests 300] [--concurrency 8] [--backend torch]

Starts the service as a subprocess on 127.0.0.1 (a free port; never another interface), waits for
``/healthz``, then sends ``--requests`` multipart uploads of real X-rays from ../shared/data/cxr
(cycling through ``--images`` files of several sources) from ``--concurrency`` asyncio clients.
Bounded: stops after the request count or ``--max-seconds``, whichever comes first, then stops the
server. Records status counts (zero errors expected), latency p50 / p95 / max, requests/s and the
server's peak RSS (``VmHWM``), to ``bench/results/load_test.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "load_test.json"
HOST = "127.0.0.1"


def _sample_images(n: int) -> list[Path]:
    import pandas as pd

    from covidcxr import paths

    root = paths.data_root()
    manifest = pd.read_csv(root / "manifest.csv")
    # Evenly spaced over the manifest: every source and label, sizes from 224 to 512 px.
    step = max(1, len(manifest) // n)
    return [root / p for p in manifest["image"].iloc[::step][:n]]


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


async def _load(url: str, images: list[bytes], names: list[str], requests: int, concurrency: int, heatmap: bool,
                max_seconds: float, token: str | None) -> tuple[list[float], Counter, list[str], float]:
    import httpx

    latencies: list[float] = []
    statuses: Counter = Counter()
    errors: list[str] = []
    counter = iter(range(requests))
    deadline = time.monotonic() + max_seconds
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:
            if time.monotonic() > deadline:
                return
            k = i % len(images)
            t = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/predict", params={"heatmap": str(heatmap).lower()}, headers=headers,
                                      files={"file": (names[k], images[k], "application/octet-stream")})
                statuses[r.status_code] += 1
                if r.status_code != 200:
                    errors.append(f"{names[k]}: {r.status_code} {r.text[:200]}")
            except httpx.HTTPError as exc:
                statuses["transport_error"] += 1
                errors.append(f"{names[k]}: {exc.__class__.__name__}: {exc}")
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=120.0, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return latencies, statuses, errors, time.perf_counter() - start


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> float:
    import httpx

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--no-heatmap", action="store_true", help="probabilities only (no Grad-CAM)")
    parser.add_argument("--workers", type=int, default=2, help="server inference threads")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop sending after this long")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    from covidcxr.serving.live import free_port

    from covidcxr.models.record import read_run_record

    record = read_run_record(args.run_dir)
    files = _sample_images(args.images)
    images, names = [f.read_bytes() for f in files], [f.name for f in files]
    port = free_port(HOST)
    url = f"http://{HOST}:{port}"
    token = os.urandom(12).hex()
    with tempfile.TemporaryDirectory() as tmp:
        audit_db = f"sqlite:///{Path(tmp) / 'audit.sqlite'}"
        cmd = [sys.executable, "-c", "from covidcxr.cli import main; main()", "serve", str(args.run_dir),
               "--host", HOST, "--port", str(port), "--backend", args.backend, "--audit-db", audit_db,
               "--workers", str(args.workers), "--timeout", "120"]
        if args.no_heatmap:
            cmd.append("--no-heatmaps")
        log = open(Path(tmp) / "server.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "COVIDCXR_API_TOKEN": token})
        try:
            startup_s = _wait_healthy(url, proc, timeout=300)
            rss_idle = _peak_rss_mb(proc.pid)
            latencies, statuses, errors, wall = asyncio.run(_load(
                url, images, names, args.requests, args.concurrency, not args.no_heatmap, args.max_seconds, token))
            rss_peak = _peak_rss_mb(proc.pid)
            from covidcxr.serving.audit_log import AuditLog

            audit_rows = len(AuditLog(audit_db).rows())
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    lat_ms = 1000 * np.asarray(latencies)
    report = {
        "benchmark": "load_test", "run_dir": str(args.run_dir), "backend": args.backend,
        "model": {"architecture": record.architecture, "model_sha256": record.model_sha256,
                  "classes": record.classes, "image_size": record.preprocess.image_size},
        "heatmap": not args.no_heatmap, "requests_sent": len(latencies), "requests_planned": args.requests,
        "concurrency": args.concurrency, "server_inference_threads": args.workers,
        "distinct_images": len(images), "image_bytes_mean": int(np.mean([len(b) for b in images])),
        "status_counts": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
        "errors": len(errors), "first_errors": errors[:5], "audit_rows_written": audit_rows,
        "latency_ms": {"p50": round(float(np.percentile(lat_ms, 50)), 1),
                       "p95": round(float(np.percentile(lat_ms, 95)), 1),
                       "max": round(float(lat_ms.max()), 1)} if len(lat_ms) else None,
        "requests_per_second": round(len(latencies) / wall, 2), "wall_seconds": round(wall, 1),
        "server_startup_seconds": round(startup_s, 1),
        "server_peak_rss_mb": rss_peak, "server_rss_after_startup_mb": rss_idle,
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": list(os.getloadavg()),
                    "python": platform.python_version(), "platform": platform.platform()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("status_counts", "latency_ms", "requests_per_second",
                                             "server_peak_rss_mb")}))
    print(f"wrote {args.output}")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
