"""``covidcxr predict ... --engine ray``: the Ray Data engine's report (covidcxr.serving.ray_scoring)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import typer
from rich.markup import escape

from covidcxr.cli.console import console, err_console


def predict_with_ray(run_dir: Path, paths: Sequence[str], out: Path, *, actors: int, address: str | None,
                     batch_size: int, partition_size: int, backend: str, resume: bool, overwrite: bool,
                     allow_non_frontal: bool, checks, max_archive_bytes: int, strict: bool) -> None:
    from covidcxr.serving.ray_scoring import score_with_ray

    result = score_with_ray(run_dir, paths, out, actors=actors, address=address, batch_size=batch_size,
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
