"""CPU latency and throughput: eager PyTorch vs ONNX Runtime for the served architecture.

    .venv/bin/python bench/onnx_latency.py [--run-dir RUN] [--sizes 224] [--threads 2]

For each input size (the run's ``image_size`` when ``--run-dir`` is given, and 224) and backend:
batch-1 latency (p50 / p95 over ``--iters`` calls after warm-up) and batch-32 throughput
(images/s). Each (backend, size) is measured in a fresh subprocess so its peak RSS is its own.
The ONNX graphs are made with the same exporter as ``covidcxr export`` (dynamic batch, softmax
output); export time and the parity check's max |p_onnx - p_torch| are recorded too.

Writes ``bench/results/onnx_latency.json``. Numbers come from whatever machine runs this; on the
shared 2-core development machine other jobs compete for the CPU, so compare the backends' ratio
more than the absolute values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "onnx_latency.json"
ARCHITECTURE = "tf_efficientnet_lite0"
NUM_CLASSES = 2
THROUGHPUT_BATCH = 32


def _peak_rss_mb() -> float:
    # VmHWM is this process image's own high-water mark; getrusage's ru_maxrss would carry over the
    # parent's peak across fork + exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _build(architecture: str, channels: int):
    from covidcxr.models.registry import create_model

    return create_model(architecture, NUM_CLASSES, channels=channels).eval()


def measure(backend: str, architecture: str, channels: int, size: int, threads: int, iters: int, onnx_path: str | None) -> dict:
    """One (backend, size) measurement in this process."""
    import torch

    torch.set_num_threads(threads)
    import onnxruntime  # both children import both libraries, so RSS differences are the models'

    rss_start = _peak_rss_mb()
    if backend == "torch":
        model = _build(architecture, channels)

        def infer(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x)).softmax(dim=1).numpy()
    else:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(onnx_path, sess_options=options, providers=["CPUExecutionProvider"])

        def infer(x: np.ndarray) -> np.ndarray:
            return session.run(["probabilities"], {"input": x})[0]

    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, channels, size, size), dtype=np.float32)
    many = rng.standard_normal((THROUGHPUT_BATCH, channels, size, size), dtype=np.float32)
    for _ in range(5):
        infer(one)
    latencies = []
    for _ in range(iters):
        t = time.perf_counter()
        infer(one)
        latencies.append(time.perf_counter() - t)
    infer(many)
    rounds = max(3, iters // 10)
    t = time.perf_counter()
    for _ in range(rounds):
        infer(many)
    seconds = time.perf_counter() - t
    return {
        "backend": backend, "image_size": size, "threads": threads,
        "batch1_latency_ms": {"p50": round(1000 * float(np.percentile(latencies, 50)), 2),
                              "p95": round(1000 * float(np.percentile(latencies, 95)), 2),
                              "mean": round(1000 * float(np.mean(latencies)), 2), "calls": iters},
        f"batch{THROUGHPUT_BATCH}_images_per_second": round(rounds * THROUGHPUT_BATCH / seconds, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1), "rss_before_model_mb": round(rss_start, 1),
    }


def _child(args_list: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args_list], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": args_list[args_list.index("--threads") + 1]})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, help="take architecture, channels and image size from this run")
    parser.add_argument("--sizes", type=int, nargs="*", default=[224])
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of both backends (1: a fair share of a busy machine)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=["torch", "onnx"])
    parser.add_argument("--architecture", default=ARCHITECTURE)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--onnx-path")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.architecture, args.channels, args.sizes[0], args.threads,
                                 args.iters, args.onnx_path)))
        return

    sizes = list(args.sizes)
    architecture, channels, source = args.architecture, args.channels, "random init (weights do not change latency)"
    if args.run_dir is not None:
        from covidcxr.models.record import read_run_record

        record = read_run_record(args.run_dir)
        architecture, channels = record.architecture, record.channels
        sizes = sorted({record.preprocess.image_size, *sizes})
        source = f"architecture / channels / size of {args.run_dir}"
    from covidcxr.serving.onnx import export_graph

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            onnx_path = Path(tmp) / f"model_{size}.onnx"
            t = time.perf_counter()
            parity = export_graph(_build(architecture, channels), onnx_path, channels=channels, image_size=size)
            export_s = time.perf_counter() - t
            common = ["--sizes", str(size), "--threads", str(args.threads), "--iters", str(args.iters),
                      "--architecture", architecture, "--channels", str(channels)]
            for backend in ("torch", "onnx"):
                extra = ["--onnx-path", str(onnx_path)] if backend == "onnx" else []
                row = _child(["--child", backend, *common, *extra])
                if backend == "onnx":
                    row.update(export_seconds=round(export_s, 1), parity_max_abs_diff=parity,
                               onnx_file_mb=round(onnx_path.stat().st_size / 1e6, 2))
                results.append(row)
                print(json.dumps(row), flush=True)
    speedup = {}
    for size in sizes:
        t, o = [next(r for r in results if r["backend"] == b and r["image_size"] == size) for b in ("torch", "onnx")]
        speedup[str(size)] = {
            "batch1_p50": round(t["batch1_latency_ms"]["p50"] / o["batch1_latency_ms"]["p50"], 2),
            f"batch{THROUGHPUT_BATCH}_throughput": round(o[f"batch{THROUGHPUT_BATCH}_images_per_second"]
                                                         / t[f"batch{THROUGHPUT_BATCH}_images_per_second"], 2),
        }
    report = {
        "benchmark": "onnx_latency", "architecture": architecture, "channels": channels, "model": source,
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": list(os.getloadavg()),
                    "python": platform.python_version(), "platform": platform.platform()},
        "note": "each row measured in a fresh process; onnx speed-up = torch time / onnx time",
        "results": results, "onnx_speedup": speedup,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
