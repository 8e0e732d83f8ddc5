"""ONNX export of a run's model, and an ONNX Runtime backend that predicts like :class:`LoadedRun`.

The exported graph takes the *preprocessed* N x C x S x S batch (dynamic N) and outputs class
**probabilities** (softmax is part of the graph; an ensemble's ``log(mean softmax)`` and a flip-TTA
model go through the same softmax and so yield the averaged probabilities). Preprocessing stays in
Python (the one pipeline of :mod:`covidcxr.data.preprocess` with the run's spec), so the PyTorch and
ONNX backends feed the model identical tensors; :class:`OnnxRun` implements the same
:class:`~covidcxr.models.predict.Predictor` protocol as :class:`~covidcxr.models.run.LoadedRun`.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter, default since
torch 2.9; the TorchScript exporter is deprecated). Weights are stored inside the ``.onnx`` file
(``external_data=False``) so one SHA-256 identifies the exported model. Exporting into the run
directory records ``onnx`` in the run record (file, SHA-256, the SHA-256 of the PyTorch weights it
came from, opset and versions) through the record's one writer; :func:`load_onnx_run` refuses an
ONNX file whose hash does not match, or one exported from other weights than the run's model.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from covidcxr.errors import CovidCXRError, WeightsError
from covidcxr.models.record import RunRecord, read_run_record, update_run_record
from covidcxr.models.run import RunView, load_run
from covidcxr.models.weights import sha256_file, verify_recorded_file
from covidcxr.serving.cpu_features import cpu_int8_flags, int8_portability_warning

log = logging.getLogger("covidcxr.onnx")

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"  # written by covidcxr.serving.onnx_quantize
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
#: Largest |p_onnx - p_torch| accepted by the post-export check.
PARITY_TOLERANCE = 1e-4


class ProbabilityModel(nn.Module):
    """Wraps a logit model so that the exported graph ends in softmax."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(dim=1)


def export_onnx(run_dir: str | Path, out: str | Path | None = None, *, opset: int = 18,
                check_batch: int = 3, seed: int = 0) -> Path:
    """Export ``run_dir``'s model to ONNX (dynamic batch, probability output) and check it.

    ``out`` defaults to ``RUN_DIR/model.onnx``; when the file lands inside the run directory its
    SHA-256 is recorded in ``run.json`` so ``--backend onnx`` can verify it. After writing, ONNX
    Runtime and PyTorch are compared on a random batch of ``check_batch`` inputs; a difference
    above :data:`PARITY_TOLERANCE` deletes the file and raises.
    """
    import onnx

    run_dir = Path(run_dir)
    run = load_run(run_dir)  # verifies the PyTorch weights' SHA-256 first
    out = Path(out) if out is not None else run_dir / ONNX_FILE
    if out.suffix != ".onnx":
        raise CovidCXRError(f"{out}: the ONNX output file must end in .onnx")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        diff = export_graph(run.model, tmp, channels=run.spec.channels, image_size=run.spec.image_size, opset=opset,
                            check_batch=check_batch, seed=seed)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if out.resolve().parent == run_dir.resolve():
        update_run_record(run_dir, onnx={
            "file": out.name, "sha256": sha256_file(out), "source_model_sha256": run.model_sha256,
            "opset": opset, "exporter": "torch.onnx.export(dynamo=True)", "torch": torch.__version__,
            "onnx": onnx.__version__, "input": INPUT_NAME, "output": OUTPUT_NAME, "parity_max_abs_diff": diff,
        })
    return out


def export_graph(model: nn.Module, path: str | Path, *, channels: int, image_size: int, opset: int = 18,
                 check_batch: int = 3, seed: int = 0) -> float:
    """Export a logit model as an ONNX graph ``input`` (N x C x S x S, dynamic N) -> ``probabilities``.

    Checks the file with ``onnx.checker`` and compares ONNX Runtime with PyTorch on a random batch;
    returns the largest absolute difference of probabilities, raising above :data:`PARITY_TOLERANCE`.
    """
    import onnx
    import onnxruntime

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # From an NCHW copy: traced from a channels-last model (as load_run keeps it) the graph gains
    # Shape / Gather / Range / Reshape nodes and a decomposed softmax, which int8 quantisation then mangles.
    wrapped = ProbabilityModel(copy.deepcopy(model).to(memory_format=torch.contiguous_format)).eval()
    example = torch.zeros(2, channels, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter narrates each step on stdout; keep the CLI's output to what the user asked for.
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(wrapped, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamo=True, external_data=False, opset_version=opset,
                          dynamic_shapes={"x": {0: batch}}, verbose=False)
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(check_batch, channels, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = wrapped(x).numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    if diff > PARITY_TOLERANCE:
        raise CovidCXRError(f"{path}: ONNX Runtime and PyTorch disagree by {diff:.2e} (> {PARITY_TOLERANCE}); "
                            "export refused")
    return diff


@dataclass
class OnnxRun(RunView):
    """A run whose predictions come from ONNX Runtime (the ``onnx`` backend); nothing PyTorch is loaded.

    ``model_sha256`` stays the run's model id (the PyTorch weights the ONNX file was exported from), so
    outputs of both backends carry the same model identity; ``onnx_sha256`` names the exact ONNX file.
    """

    run_dir: Path
    record: RunRecord = field(repr=False)
    session: Any = field(repr=False)
    onnx_path: Path
    onnx_sha256: str
    backend: str = "onnx"

    def predict_tensor(self, batch: torch.Tensor) -> np.ndarray:
        x = batch.detach().cpu().float().numpy()
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].astype(np.float32)


def load_onnx_run(run_dir: str | Path, onnx_path: str | Path | None = None, *, threads: int | None = None) -> OnnxRun:
    """Open ``RUN_DIR/model.onnx`` (or ``onnx_path``) with ONNX Runtime, checking the record and the file's SHA-256."""
    import onnxruntime

    run_dir = Path(run_dir)
    record = read_run_record(run_dir)
    meta = record.onnx
    if meta is None:
        raise WeightsError(f"{run_dir}/run.json: no ONNX export recorded; run `covidcxr export {run_dir} --format onnx`")
    path = Path(onnx_path) if onnx_path is not None else run_dir / meta.file
    verify_recorded_file(path, meta.sha256, what="ONNX file", remedy="Refusing to use it; export again.",
                         missing=f"no ONNX model; create it with `covidcxr export {run_dir} --format onnx`")
    if meta.source_model_sha256 != record.model_sha256:
        raise WeightsError(f"{path}: exported from model {meta.source_model_sha256}, but the run's model is "
                           f"now {record.model_sha256}; export again.")
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    run = OnnxRun(run_dir=run_dir, record=record, session=session, onnx_path=path, onnx_sha256=meta.sha256)
    if meta.file == INT8_FILE and (warning := int8_portability_warning(record.info.get("onnx_quantization"),
                                                                       cpu_int8_flags())):
        log.warning("%s: %s", path, warning)
    run.lung_finder  # noqa: B018 - roi: lungs runs bring their (PyTorch) segmenter; check it at load time
    return run


#: How each ``--backend`` opens a run directory (registry, not an if-chain).
BACKENDS = {"torch": lambda run_dir, **kw: load_run(run_dir), "onnx": load_onnx_run}


def open_run(run_dir: str | Path, backend: str = "torch", **kwargs):
    """The run's :class:`~covidcxr.models.predict.Predictor` on ``backend``."""
    if backend not in BACKENDS:
        raise CovidCXRError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return BACKENDS[backend](run_dir, **kwargs)


#: Export formats by name (``covidcxr export --format``).
EXPORTERS = {"onnx": export_onnx}


def export_model(run_dir: str | Path, *, format: str = "onnx", **kwargs) -> Path:
    """``covidcxr export``: write the run's model in ``format``."""
    if format not in EXPORTERS:
        raise CovidCXRError(f"export format {format!r}: choose one of {', '.join(EXPORTERS)}")
    return EXPORTERS[format](run_dir, **kwargs)
