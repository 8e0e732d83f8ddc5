"""Why int8 loses validation AUC: ``covidcxr export --quantize int8`` variants on one run, side by side.

    .venv/bin/python bench/int8_variants.py --run-dir RUN [--out bench/results/int8_variants.json]

Each variant quantises a copy of the run beside it with :func:`covidcxr.serving.onnx_quantize.quantize_run`
and no AUC limit, changing only which operators are quantised (``ops``), how activations are
calibrated (``calibration``: ONNX Runtime's MinMax, or Percentile 99.99) and the weights' type
(``weights``: int8 = U8S8 kernels, uint8 = U8U8; ``reduce_range``: 7-bit weights). It records fp32 and int8
validation AUC, the largest probability change and the CPU's int8 extensions (U8S8 saturates without VNNI).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from inference_baselines import sibling_copy  # noqa: E402

RESULTS = REPO / "bench" / "results" / "int8_variants.json"
SHIPPED_OPS = ["Conv", "Clip", "Relu", "Add", "Gemm", "MatMul"]
VARIANTS = {
    "before (stop 19): Conv+Gemm+MatMul, MinMax": {"ops": ["Conv", "Gemm", "MatMul"]},
    "Conv+Clip+Relu+Gemm+MatMul (activations folded), MinMax": {"ops": ["Conv", "Clip", "Relu", "Gemm", "MatMul"]},
    "shipped: Conv+Clip+Relu+Add+Gemm+MatMul, MinMax": {"ops": SHIPPED_OPS},
    "shipped ops, Percentile 99.99": {"ops": SHIPPED_OPS, "calibration": "Percentile"},
    "shipped ops, 7-bit int8 weights (reduce_range)": {"ops": SHIPPED_OPS, "reduce_range": True},
    "shipped ops, uint8 weights (U8U8)": {"ops": SHIPPED_OPS, "weights": "uint8"},
}


def quantize_variant(run_dir: Path, options: dict) -> dict:
    from covidcxr.models.record import read_run_record
    from covidcxr.serving.onnx_quantize import quantize_run

    copy = sibling_copy(run_dir, "int8-variant")
    t0 = time.perf_counter()
    try:
        quantize_run(copy, max_auc_drop=float("inf"), **options)
        info = read_run_record(copy).info["onnx_quantization"]
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return {**options, "mode": info["mode"], "seconds": round(time.perf_counter() - t0, 1),
            **{k: info[k] for k in ("val_auc_fp32", "val_auc_int8", "auc_difference", "max_abs_prob_diff_int8_vs_fp32")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    from covidcxr.models.record import read_run_record
    from covidcxr.serving.cpu_features import cpu_int8_flags

    record = read_run_record(a.run_dir)
    results = {}
    for name, options in VARIANTS.items():
        results[name] = quantize_variant(a.run_dir, options)
        print(name, json.dumps(results[name]), flush=True)
    out = {"benchmark": "int8_variants", "run_dir": str(a.run_dir), "model_sha256": record.model_sha256,
           "objective": record.info.get("objective"),
           "variants": results, "cpu_int8_flags": cpu_int8_flags(), "load_average": os.getloadavg()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
