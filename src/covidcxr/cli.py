"""The ``covidcxr`` command line: a thin layer over the library.

Each command parses its options, calls one library function and prints the result. Errors that
covidcxr raises on purpose (``CovidCXRError``) are printed as one line naming the file and the
reason, with exit code 2, never as a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from covidcxr.errors import CovidCXRError

app = typer.Typer(help="Train, validate, explain and serve chest X-ray COVID-19 detectors without shortcut learning.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Import, split, audit and cache chest X-ray datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except CovidCXRError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2)


# ---------------------------------------------------------------- data import / split / audit (manifest engineer)
# (data import / split / audit commands go here)


# ---------------------------------------------------------------- data cache (image-io engineer)
@data_app.command("cache")
def data_cache(
    manifest: Path = typer.Argument(..., help="Manifest CSV; its `image` paths resolve against the CSV's folder."),
    working_size: int = typer.Option(512, "--working-size", help="Longer side of the cached images (px, never enlarged)."),
    workers: int = typer.Option(1, "--workers", help="Decoding threads."),
    allow_non_frontal: bool = typer.Option(False, "--allow-non-frontal", help="Also cache CT / lateral DICOMs."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Decode every image of MANIFEST once and store it at working size ($COVIDCXR_CACHE_DIR)."""
    from covidcxr.data.cache import warm_manifest

    report = warm_manifest(manifest, working_size=working_size, workers=workers,
                           allow_non_frontal=allow_non_frontal, progress=progress)
    for path, reason in report.skipped:
        console.print(f"[yellow]skipped[/yellow] {path}: {reason}", highlight=False, soft_wrap=True)
    console.print(report.summary(), highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- train (issue: training)
# (train command goes here)


# ---------------------------------------------------------------- evaluate / report / compare (issue: evaluation)
# (evaluate, report, compare commands go here)


# ---------------------------------------------------------------- explain (issue: explainability)
# (explain command goes here)


# ---------------------------------------------------------------- predict / export / serve (issue: serving)
# (predict, export, serve commands go here)


if __name__ == "__main__":
    main()
