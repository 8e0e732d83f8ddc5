"""``covidcxr verify`` and ``covidcxr audit``: is a run what it says, and can it be trusted (docs/audits.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from covidcxr.cli.console import console, err_console

audit_app = typer.Typer(help="Trust audits of a model: shortcut scorecard, backdoor detection.", no_args_is_help=True)


def verify(
    run_dir: Path = typer.Argument(..., help="Run directory (run.json + model)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Data folder the run's image paths resolve against "
                                        "(default: the folder recorded at training time, if it is here)."),
) -> None:
    """Check the run record, weights, split, config and (where the data are at hand) every image's SHA-256.

    Exit status 1 when any check fails; each failing file is named."""
    from covidcxr.models.verify import verify_run

    report = verify_run(run_dir, data_root=data)
    for line in report.lines()[:-1]:
        (console if not line.lstrip().startswith(("mismatch", "missing")) else err_console).print(
            line, highlight=False, markup=False, soft_wrap=True)
    console.print(report.lines()[-1], highlight=False, markup=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)
