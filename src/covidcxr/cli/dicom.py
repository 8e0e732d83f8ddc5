"""``covidcxr dicom``: the DICOM node (C-STORE in, SR + overlay out) and DICOMweb scoring (see docs/pacs.md)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import List, Optional

import typer

from covidcxr.cli.console import console, err_console

dicom_app = typer.Typer(help="Hospital integration: receive studies over DICOM / DICOMweb, send results as DICOM.",
                        no_args_is_help=True)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@dicom_app.command("listen")
def listen(
    run_dir: Path = typer.Argument(..., help="run directory (run.json + model)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML node settings (see docs/pacs.md)"),
    ae_title: Optional[str] = typer.Option(None, "--ae-title", help="this node's AE title (default COVIDCXR)"),
    host: Optional[str] = typer.Option(None, "--host", help="interface to listen on (default 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, "--port", help="DICOM port (default 11112)"),
    allow_caller: Optional[List[str]] = typer.Option(None, "--allow-caller", help="calling AE title allowed to "
                                                     "send (repeat; replaces the list in --config)"),
    destination: Optional[str] = typer.Option(None, "--destination", help="where results go: AE_TITLE@HOST:PORT"),
    spool: Optional[Path] = typer.Option(None, "--spool", help="queue folder (default RUN_DIR/dicom-spool)"),
    keep_folder: Optional[Path] = typer.Option(None, "--keep-folder", help="keep processed instances here "
                                               "(default: deleted once processed)"),
    audit_db: Optional[str] = typer.Option(None, "--audit-db", help="SQLAlchemy URL of the audit log"),
    allow_non_frontal: Optional[bool] = typer.Option(None, "--allow-non-frontal/--frontal-only",
                                                     help="also analyse CT / lateral-labelled CR / DX"),
    heatmaps: Optional[bool] = typer.Option(None, "--heatmaps/--no-heatmaps", help="send the Grad-CAM overlay"),
) -> None:
    """Run the DICOM node: Storage SCP + C-ECHO; results (SR + overlay) are C-STOREd to the destination."""
    from covidcxr.serving.dicom.node import DicomNode
    from covidcxr.serving.dicom.settings import load_node_settings, parse_destination

    _logging()
    settings = load_node_settings(
        config, ae_title=ae_title, host=host, port=port, allowed_callers=allow_caller,
        destination=parse_destination(destination).model_dump() if destination else None, spool=spool,
        keep_folder=keep_folder, audit_db=audit_db, allow_non_frontal=allow_non_frontal, heatmaps=heatmaps)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with DicomNode(run_dir, settings) as node:
        counts = node.spool.counts()
        console.print(f"listening as {settings.ae_title} on {settings.host}:{node.port}; {counts['queued']} "
                      f"instance(s) queued from before; Ctrl-C stops", highlight=False)
        stop.wait()
        err_console.print("stopping (the instance in hand is finished; queued ones wait for the next start)")


@dicom_app.command("score")
def score(
    run_dir: Path = typer.Argument(..., help="run directory (run.json + model)"),
    dicomweb: str = typer.Option(..., "--dicomweb", help="DICOMweb base URL, e.g. http://pacs:8042/dicom-web"),
    study: str = typer.Option(..., "--study", help="Study Instance UID"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML node settings (audit_db, heatmaps, ...)"),
    store: bool = typer.Option(True, "--store/--no-store", help="STOW-RS the SR and overlay into the study"),
    allow_non_frontal: Optional[bool] = typer.Option(None, "--allow-non-frontal/--frontal-only"),
    heatmaps: Optional[bool] = typer.Option(None, "--heatmaps/--no-heatmaps"),
) -> None:
    """Score one study over DICOMweb: QIDO-RS finds it, WADO-RS fetches it, STOW-RS stores the results."""
    from covidcxr.errors import CovidCXRError
    from covidcxr.serving.dicom.dicomweb import score_study
    from covidcxr.serving.dicom.settings import load_node_settings

    _logging()
    settings = load_node_settings(config, allow_non_frontal=allow_non_frontal, heatmaps=heatmaps)
    result = score_study(run_dir, dicomweb, study, settings=settings, store=store)
    if not result.study_found:
        raise CovidCXRError(f"{dicomweb}: study {study} not found (QIDO-RS)")
    for row in result.processed:
        probs = ", ".join(f"P({c})={p:.4g}" for c, p in row["probabilities"].items())
        console.print(f"instance {row['sop_uid_sha256'][:12]}: {probs} -> {row['predicted']}", highlight=False)
    for sha, reason in result.skipped:
        err_console.print(f"skipped instance {sha[:12]}: {reason}", highlight=False, markup=False)
    console.print(f"{len(result.processed)} instance(s) analysed, {len(result.skipped)} skipped, "
                  f"{result.stored} result object(s) stored", highlight=False)
    if not result.processed:
        raise typer.Exit(1)
