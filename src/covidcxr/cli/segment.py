"""``covidcxr segment``: train a lung segmenter, predict lung masks (see docs/segmentation.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from covidcxr.cli.console import console, err_console

segment_app = typer.Typer(help="Lung segmentation: train a U-Net on lung masks, predict masks.", no_args_is_help=True)


@segment_app.command("train")
def segment_train(
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write (model, run.json, scores)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML mapping of SegmentConfig fields."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. image_size=128 epochs=4"),
) -> None:
    """Train a lung segmenter on the v7labs + lungVAE masks; held-out Dice / HD95 with 95% patient-bootstrap CIs."""
    from covidcxr.training.segment import train_segmenter_command

    console.print(train_segmenter_command(out, config, list(overrides or [])), highlight=False, soft_wrap=True)


@segment_app.command("predict")
def segment_predict(
    run_dir: Path = typer.Argument(..., help="Segmenter run directory."),
    images: List[Path] = typer.Argument(..., help="X-ray files (PNG / JPEG / DICOM ...)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for masks/*.png, lungs.csv, skipped.csv."),
) -> None:
    """One lung-mask PNG per image in its own geometry + lungs.csv (box, area); the rest in skipped.csv.

    Exit status 1 when no mask was written (every image skipped), as for ``covidcxr predict``.
    """
    from covidcxr.serving.segment import segment_images

    result = segment_images(run_dir, images, out)
    console.print(result.summary(), highlight=False, soft_wrap=True, markup=False)
    if not result.rows:
        err_console.print("[bold red]error:[/bold red] no lung mask was written (reasons in skipped.csv)",
                          highlight=False)
        raise typer.Exit(1)
