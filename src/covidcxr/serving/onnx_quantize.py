"""``covidcxr export --format onnx --quantize int8``: static int8 quantisation, calibrated and measured on validation images.

1. The fp32 graph is exported as for ``--format onnx`` (:func:`covidcxr.serving.onnx.export_graph`,
   parity-checked against PyTorch).
2. ONNX Runtime's static quantisation of Conv / Gemm / MatMul and of the activations after them
   (Clip = ReLU6, Relu) and the residual Adds (QDQ, per-channel weights, uint8 activations; int8 weights -
   the U8S8 kernels of VNNI CPUs - where this CPU has VNNI, uint8 weights where it has not, since U8S8
   saturates on AVX2 alone) is calibrated on up to ``calibration_images`` images of
   the run's own validation split (``val_predictions.csv``, which is what the checkpoint was
   selected on - never test rows), each prepared by the one pipeline
   (:func:`covidcxr.models.predict.prepare_input`).
3. fp32 and int8 are both run on every validation image; the AUC of each, their difference and
   the largest probability difference are recorded. An AUC drop above ``max_auc_drop`` refuses the
   export (nothing is written).

The int8 file becomes the run's ONNX model (``run.json`` ``onnx``: file, SHA-256), so
``predict`` / ``serve --backend onnx`` use it; ``info.onnx_quantization`` records the calibration
set (images, their SHA-256 list digest, split) and the measured AUC difference.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from covidcxr.errors import CovidCXRError
from covidcxr.serving.cpu_features import cpu_int8_flags
from covidcxr.serving.onnx import INT8_FILE

log = logging.getLogger("covidcxr.onnx")
DEFAULT_CALIBRATION_IMAGES = 64
DEFAULT_MAX_AUC_DROP = 0.005
#: The compute-heavy ops, their activations and the residual Adds. Clip and Relu must be listed: only
#: then does ONNX Runtime fold each into the Conv before it and quantise the Conv's output over the
#: activation's range ([0, 6] for ReLU6). Left out, the Conv's output is quantised over its whole
#: pre-activation range and ReLU6 keeps about a dozen of the 256 levels: EfficientNet-Lite0's
#: ImageNet features then keep a cosine of 0.82 with fp32 instead of 0.98, and a trained quick
#: model lost 0.156 validation AUC (bench/results/int8_variants.json). The softmax output stays
#: float: quantised to uint8 probabilities it would tie most scores and cost AUC on its own.
QUANTIZED_OPS = ["Conv", "Clip", "Relu", "Add", "Gemm", "MatMul"]


def validation_images(run_dir: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """``(paths, targets, classes)`` of the run's validation images (``val_predictions.csv``), the
    paths resolved through the run's ``split.csv``."""
    import pandas as pd

    from covidcxr.models.record import read_run_record
    from covidcxr.models.run_split import read_run_split

    table = pd.read_csv(run_dir / "val_predictions.csv", keep_default_na=False)
    record = read_run_record(run_dir)
    val = read_run_split(run_dir, record).subset("val")
    files = [Path(p) for p in val.image_paths()]  # "row" indexes the run's validation rows, in this order
    rows = table["row"].astype(int).to_numpy()
    wrong = [i for i, r in zip(table["image"].astype(str), rows)
             if r >= len(files) or Path(i).name != files[r].name]
    if wrong:
        raise CovidCXRError(f"{run_dir}/val_predictions.csv: {len(wrong)} rows do not match split.csv (e.g. {wrong[0]})")
    classes = list(record.classes)
    targets = table["target"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    return [files[r] for r in rows], targets, classes


def _positive_auc(probs: np.ndarray, targets: np.ndarray, classes: list[str], positive: str | None) -> float:
    from sklearn.metrics import roc_auc_score

    k = classes.index(positive) if positive in classes else 1
    y = (targets == k).astype(int)
    return float(roc_auc_score(y, probs[:, k])) if 0 < y.sum() < len(y) else float("nan")


class _Reader:
    """ONNX Runtime calibration reader: one prepared batch per call."""

    def __init__(self, batches: list[np.ndarray], input_name: str):
        self.batches, self.input_name, self.i = batches, input_name, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


def quantize_run(run_dir: str | Path, *, calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
                 max_auc_drop: float = DEFAULT_MAX_AUC_DROP, opset: int = 18, batch_size: int = 16,
                 ops: Sequence[str] = tuple(QUANTIZED_OPS), calibration: str = "MinMax",
                 weights: str = "auto", reduce_range: bool = False) -> Path:
    """Write ``RUN_DIR/model.int8.onnx`` and record it as the run's ONNX model (see module docstring).

    ``ops`` (operator types to quantise), ``calibration`` (an ONNX Runtime ``CalibrationMethod``
    name; ``Percentile`` keeps the 99.99th percentile) and ``reduce_range`` (7-bit weights, one of ONNX
    Runtime's remedies for saturation) exist for experiments (bench/int8_variants.py). ``weights``:
    ``int8`` (U8S8, the fast kernels of VNNI CPUs), ``uint8`` (U8U8, which never saturates), or ``auto``:
    int8 where this CPU has VNNI, uint8 where it has not (U8S8 would saturate here)."""
    import onnx
    import onnxruntime
    import torch
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from covidcxr.models.predict import prepare_input
    from covidcxr.models.record import read_run_record, update_run_record
    from covidcxr.models.run import load_run
    from covidcxr.models.weights import sha256_file
    from covidcxr.serving.onnx import INPUT_NAME, OUTPUT_NAME, export_graph

    if weights not in ("auto", "int8", "uint8"):
        raise CovidCXRError(f"int8 weights must be 'auto', 'int8' or 'uint8', got {weights!r}")
    weights = ("int8" if cpu_int8_flags() else "uint8") if weights == "auto" else weights
    if not hasattr(CalibrationMethod, calibration):
        raise CovidCXRError(f"calibration {calibration!r} is not an ONNX Runtime CalibrationMethod "
                            f"({', '.join(m.name for m in CalibrationMethod)})")
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    files, targets, classes = validation_images(run_dir)
    tensors = np.stack([prepare_input(f, run.spec, lung_finder=run.lung_finder).tensor.numpy() for f in files])
    # Calibration: an even spread over the validation rows (they are ordered by source and label).
    step = max(1, len(files) // max(1, calibration_images))
    calib = list(range(0, len(files), step))[:calibration_images]
    out = run_dir / INT8_FILE
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".quantize-") as tmp:
        fp32, pre, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        parity = export_graph(run.model, fp32, channels=run.spec.channels, image_size=run.spec.image_size, opset=opset)
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        batches = [tensors[calib[i : i + batch_size]] for i in range(0, len(calib), batch_size)]
        quantize_static(str(pre), str(int8), _Reader(batches, INPUT_NAME), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8 if weights == "int8" else QuantType.QUInt8,
                        calibrate_method=getattr(CalibrationMethod, calibration), op_types_to_quantize=list(ops),
                        extra_options={"CalibPercentile": 99.99} if calibration == "Percentile" else None)
        onnx.checker.check_model(str(int8))
        probs, seconds = {}, {}
        for name, path in (("fp32", fp32), ("int8", int8)):
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            session.run([OUTPUT_NAME], {INPUT_NAME: tensors[:1]})  # warm-up, not timed
            t0 = time.perf_counter()
            probs[name] = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: tensors[i : i + batch_size]})[0]
                                          for i in range(0, len(tensors), batch_size)])
            seconds[name] = time.perf_counter() - t0
        auc = {k: _positive_auc(v, targets, classes, run.positive_class) for k, v in probs.items()}
        drop = auc["fp32"] - auc["int8"]
        if not np.isfinite(drop) or drop > max_auc_drop:
            raise CovidCXRError(f"int8 quantisation loses {drop:.4f} validation AUC (fp32 {auc['fp32']:.4f}, int8 "
                                f"{auc['int8']:.4f}; limit {max_auc_drop}); export refused, keep the fp32 model")
        os.replace(int8, out)
    speedup = seconds["fp32"] / seconds["int8"]
    if speedup < 1.0:  # int8 exists for speed; say so when this CPU has no fast int8 kernels
        log.warning("%s: int8 ran at %.2fx the fp32 ONNX model's speed on this CPU (int8 extensions: %s); for speed "
                    "keep the fp32 ONNX model (covidcxr export --format onnx)", out, speedup,
                    ", ".join(cpu_int8_flags()) or "none")
    with torch.no_grad():
        torch_probs = np.concatenate([run.predict_tensor(torch.from_numpy(tensors[i : i + batch_size]))
                                      for i in range(0, len(tensors), batch_size)])
    record = read_run_record(run_dir)
    names = [str(f) for f in files]
    update_run_record(
        run_dir,
        onnx={"file": out.name, "sha256": sha256_file(out), "source_model_sha256": run.model_sha256, "opset": opset,
              "exporter": "torch.onnx.export(dynamo=True) + onnxruntime.quantization.quantize_static",
              "torch": torch.__version__, "onnx": onnx.__version__, "input": INPUT_NAME, "output": OUTPUT_NAME,
              "parity_max_abs_diff": parity},
        info={**record.info, "onnx_quantization": {
            "mode": f"int8 static (QDQ, per-channel {weights} weights{', 7-bit range' if reduce_range else ''}, "
                    f"uint8 activations, {calibration} calibration)",
            "weights": weights, "reduce_range": reduce_range,
            "onnxruntime": onnxruntime.__version__,
            "calibration": {"split": "val (val_predictions.csv)", "images": len(calib),
                            "images_sha256": hashlib.sha256("\n".join(names[i] for i in calib).encode()).hexdigest(),
                            "first": [names[i] for i in calib[:3]]},
            "measured_on": {"split": "val", "images": len(files), "includes_calibration_images": True,
                            "cpu_int8_flags": cpu_int8_flags()},
            "val_auc_fp32": auc["fp32"], "val_auc_int8": auc["int8"], "auc_difference": auc["int8"] - auc["fp32"],
            "max_abs_prob_diff_int8_vs_fp32": float(np.abs(probs["int8"] - probs["fp32"]).max()),
            # one timed pass over the validation images, batch ``batch_size``, ONNX Runtime's default threads
            "val_pass_img_s": {k: len(tensors) / v for k, v in seconds.items()}, "speedup_int8_over_fp32": speedup,
            "max_abs_prob_diff_fp32_vs_torch": float(np.abs(probs["fp32"] - torch_probs).max()),
            "max_auc_drop": max_auc_drop}})
    return out
