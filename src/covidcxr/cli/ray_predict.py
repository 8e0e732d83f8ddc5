"""The scale-out paths of the CLI: ``predict --engine ray`` (covidcxr.serving.ray_scoring), ``export``
with ``--quantize int8`` (covidcxr.serving.onnx_quantize) and the torchrun rank check of ``train``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import typer
from rich.markup import escape

from covidcxr.cli.console import console, err_console


def is_worker_rank() -> bool:
    """A torchrun (DDP) process other than rank 0: rank 0 alone reports."""
    return os.environ.get("RANK", "0") != "0"


def predict_with_ray(engine: str, run_dir: Path, paths: Sequence[str], out: Path, *, actors: int, batch_size: int, backend: str, resume: bool, overwrite: bool,
                     allow_non_frontal: bool, checks, max_archive_bytes: int, strict: bool,
                     partition_size: int = 256) -> None:
    if engine != "ray":
        raise typer.BadParameter(f"--engine {engine!r}: choose local or ray")
    from covidcxr.serving.ray_scoring import score_with_ray

    result = score_with_ray(run_dir, paths, out, actors=actors, address=os.environ.get("RAY_ADDRESS"),
                            batch_size=batch_size,
                            partition_size=partition_size, backend=backend, resume=resume, overwrite=overwrite,
                            allow_non_frontal=allow_non_frontal, checks=checks, max_archive_bytes=max_archive_bytes)
    for path, reason in result.skipped[:20]:
        err_console.print(f"[yellow]skipped[/yellow] {escape(path)}: {escape(reason)}", highlight=False, soft_wrap=True)
    console.print(f"{result.predicted} images predicted by {result.actors} Ray actors "
                  f"({result.images_per_second:.1f} img/s), {result.already_done} already done (--resume), "
                  f"{len(result.skipped)} skipped (listed in {out / 'skipped.csv'}) -> {out}/part-*.csv and "
                  f"{out / 'predictions.csv'} ({result.total_rows} rows, {result.partitions_total} partitions)",
                  highlight=False, markup=False)
    if result.total_rows == 0:
        err_console.print("[bold red]error:[/bold red] nothing was predicted", highlight=False)
        raise typer.Exit(1)
    if strict and result.skipped:
        raise typer.Exit(1)


def export_run_model(run_dir: Path, quantize: Optional[str], *, format: str, out: Optional[Path], opset: int,
                     images: int = 64) -> Path:
    """``covidcxr export``; with ``--quantize int8`` the int8 model becomes the run's ONNX model."""
    from covidcxr.serving.onnx import export_model

    if quantize is None:
        return export_model(run_dir, format=format, out=out, opset=opset)
    if quantize != "int8" or format != "onnx" or out is not None:
        raise typer.BadParameter("--quantize int8 works with --format onnx into the run directory (no --out)")
    from covidcxr.models.record import read_run_record
    from covidcxr.serving.onnx_quantize import quantize_run

    path = quantize_run(run_dir, opset=opset, calibration_images=images)
    q = read_run_record(run_dir).info["onnx_quantization"]
    console.print(f"int8 model calibrated on {q['calibration']['images']} validation images; validation AUC "
                  f"fp32 {q['val_auc_fp32']:.4f} -> int8 {q['val_auc_int8']:.4f} (recorded in run.json)",
                  highlight=False)
    return path
