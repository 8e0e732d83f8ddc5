"""The ``covidcxr`` command line: a thin layer over the library.

Each command parses its options, calls one library function and prints the result. Errors that
covidcxr raises on purpose (``CovidCXRError``) are printed as one line naming the file and the
reason, with exit code 2, never as a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from covidcxr.cli.console import console, err_console
from covidcxr.cli.dicom import dicom_app
from covidcxr.cli.ray_predict import export_run_model, is_worker_rank, predict_with_ray
from covidcxr.cli.audit import audit_app, verify
from covidcxr.cli.crossval import crossval
from covidcxr.cli.segment import segment_app
from covidcxr.cli.synth import synth_app
from covidcxr.errors import CovidCXRError

app = typer.Typer(help="Train, validate, explain and serve chest X-ray COVID-19 detectors without shortcut learning.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Import, split, audit and cache chest X-ray datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(segment_app, name="segment")
app.add_typer(dicom_app, name="dicom")
app.add_typer(synth_app, name="synth")
app.command("verify")(verify)
app.command("crossval")(crossval)
app.add_typer(audit_app, name="audit")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except CovidCXRError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2)


# ---------------------------------------------------------------- data import / split / audit (manifest engineer)
@data_app.command("import")
def data_import(
    format: str = typer.Argument(..., help="Layout: covidcxr, ieee8023 (also Figure1 / Actualmed), folders, covidx, dicom."),
    path: Path = typer.Argument(..., help="Downloaded data set folder (or its metadata / manifest / label file)."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest CSV to write; skipped files go to <out>.skipped.csv."),
    label_map: Optional[Path] = typer.Option(None, "--label-map", help="YAML rules mapping findings to labels (overrides defaults)."),
    source: Optional[str] = typer.Option(None, "--source", help="Source name for the 'source' column (default: folder name)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="dicom: labels CSV (default PATH/labels.csv)."),
    check_images: bool = typer.Option(True, "--check-images/--no-check-images", help="Decode every image (slower, catches bad files)."),
    allow_outside_root: bool = typer.Option(False, "--allow-outside-root", help="Also import images that resolve (after "
                                            "symlinks) outside PATH's folder and $COVIDCXR_DATA_ROOT (refused by default)."),
) -> None:
    """Turn a downloaded data set into a covidcxr manifest; report every skipped file and why."""
    from covidcxr.data.importers import import_dataset

    # Only options given on the command line go to the importer; one it does not take is an error.
    options = {k: v for k, v in {"source": source, "labels": labels}.items() if v is not None}
    result = import_dataset(format, path, out=out, label_map=label_map, check_images=check_images,
                            allow_outside_root=allow_outside_root, **options)
    result.render(console)
    console.print(f"wrote {out}")


@data_app.command("split")
def data_split(
    manifest: Path = typer.Argument(..., help="Manifest CSV."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest CSV to write, with 'split' (and 'fold') filled in."),
    val: float = typer.Option(0.15, "--val", help="Fraction of images for validation."),
    test: float = typer.Option(0.15, "--test", help="Fraction of images for the internal test split."),
    seed: int = typer.Option(0, "--seed"),
    folds: Optional[int] = typer.Option(None, "--folds", help="Add a patient-grouped 'fold' column (0..K-1) over train+val."),
    holdout_source: List[str] = typer.Option([], "--holdout-source", help="Put a whole source in split 'external' (repeatable; "
                                             "source or patient-id prefix, e.g. kermany)."),
) -> None:
    """Patient-grouped, label x source stratified train / val / test (+ folds, + held-out sources)."""
    from covidcxr.data.splits import split_file, split_summary

    result = split_file(manifest, out, val=val, test=test, seed=seed, folds=folds, holdout_sources=holdout_source)
    console.print(split_summary(result).to_string())
    console.print(f"wrote {out}")


@data_app.command("audit")
def data_audit(
    manifest: Path = typer.Argument(..., help="Manifest CSV."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full report as JSON."),
    strict: bool = typer.Option(False, "--strict", help="Near-duplicates across splits / sources and unreadable images are errors."),
    max_distance: int = typer.Option(24, "--max-distance", help="pHash distance (of 256 bits) at or below which images are near-duplicates."),
    duplicates: bool = typer.Option(True, "--duplicates/--no-duplicates", help="Hash images to find near-duplicates."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also save a PNG: label mix per source and split, ages by label."),
    allow_outside_root: bool = typer.Option(False, "--allow-outside-root", help="Also read images that resolve outside "
                                            "the manifest's folder and $COVIDCXR_DATA_ROOT (refused by default)."),
) -> None:
    """Check a manifest for patient leakage, near-duplicates and source / demographic shortcuts. Exit 1 on errors."""
    from covidcxr.data.audit import audit_file

    report = audit_file(manifest, json_out=json_out, plot_out=plot, strict=strict, max_distance=max_distance,
                        duplicates=duplicates, allow_outside_root=allow_outside_root)
    report.render(console)
    if not report.ok:
        raise typer.Exit(1)


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
@app.command(context_settings={"allow_extra_args": False})
def train(
    config: Path = typer.Argument(..., help="YAML training config (see configs/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write (model, run.json, metrics, model card)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. model.name=resnet18 train.epochs=3"),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from RUN_DIR/checkpoints/last.pt."),
    folds: Optional[int] = typer.Option(None, "--folds", min=2, help="Train a K-fold patient-grouped ensemble."),
) -> None:
    """Train a model (or a k-fold ensemble) and write a run directory."""
    import logging

    from covidcxr.training import run_training

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_dir = run_training(config, out, overrides=list(overrides or []), resume=resume, folds=folds)
    if is_worker_rank():
        return  # a torchrun (DDP) job: rank 0 wrote the run and reports it
    from covidcxr.models.record import read_run_record

    record = read_run_record(run_dir)
    selection = record.info.get("selection") or {}
    if selection.get("value") is not None:
        threshold = record.threshold
        decision = (f"decision threshold {threshold:.4g} (chosen on validation)" if threshold is not None
                    else "decision: most probable class")
        console.print(f"selected epoch {selection.get('epoch')} by validation {selection.get('metric')} = "
                      f"{selection['value']:.3f}; {decision}", highlight=False)
    console.print(f"run written to [bold]{run_dir}[/bold] (run.json, model, metrics.jsonl, MODEL_CARD.md)")


# ---------------------------------------------------------------- evaluate / report / compare (issue: evaluation)
@app.command("evaluate")
def evaluate(
    run_dir: Path = typer.Argument(..., help="Run directory (run.json + model)."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", "-m", help="Manifest CSV with a 'split' column (default: the run's own split.csv)."),
    split: str = typer.Option("test", "--split", help="Split to evaluate (test, external, val: val is flagged as optimistic)."),
    by: Optional[str] = typer.Option(None, "--by", help="Also report metrics per value of this column (e.g. source)."),
    prevalence: Optional[float] = typer.Option(None, "--prevalence", help="Add PPV / NPV at this prevalence (e.g. 0.05)."),
    readers: Optional[Path] = typer.Option(None, "--readers", help="CSV with columns image, reader, call: compare readers with the model."),
    patient_bootstrap: bool = typer.Option(False, "--patient-bootstrap", help="CIs by resampling patients instead of images."),
    temperature_scaling: bool = typer.Option(False, "--temperature-scaling", help="Fit temperature on the manifest's val rows (stored in the run), report calibrated ECE."),
    label_space: Optional[str] = typer.Option(None, "--label-space", help="Override the run's label space (name or YAML)."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples for bootstrap CIs."),
    batch_size: int = typer.Option(16, "--batch-size"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default RUN_DIR/eval/<split>)."),
) -> None:
    """Metrics with 95% CIs (DeLong AUC, within-source AUC, Wilson proportions), predictions.csv and plots."""
    from covidcxr.evaluation.evaluate import evaluate_run
    from covidcxr.evaluation.summary import render_summary

    result = evaluate_run(run_dir, manifest, split=split, by=by, prevalence=prevalence, out=out, readers=readers,
                          patient_bootstrap=patient_bootstrap, temperature_scaling=temperature_scaling,
                          label_space=label_space, n_boot=n_boot, batch_size=batch_size)
    render_summary(result, console)


@app.command("compare")
def compare(
    run_a: Path = typer.Argument(..., help="First run directory."),
    run_b: Path = typer.Argument(..., help="Second run directory."),
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Manifest CSV with a 'split' column."),
    split: str = typer.Option("test", "--split"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the comparison as JSON."),
) -> None:
    """Paired DeLong test of the AUC difference and McNemar at each run's stored threshold, on the same images."""
    from covidcxr.evaluation.run_comparison import compare_runs, render_comparison

    render_comparison(compare_runs(run_a, run_b, manifest, split=split, out=out), console)


@app.command("report")
def report(
    run_dir: Path = typer.Argument(..., help="Run directory (evaluate it first for metrics and plots)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (default RUN_DIR/report.html)."),
) -> None:
    """One self-contained HTML report: data audit, training curves, metrics with CIs, plots, model card, heatmaps."""
    from covidcxr.evaluation.report import build_report

    console.print(f"wrote {build_report(run_dir, out)}")


# ---------------------------------------------------------------- explain (issue: explainability)
@app.command("explain")
def explain(
    run_dir: Path = typer.Argument(..., help="Run directory (run.json + model; ensembles too)."),
    images: Optional[List[Path]] = typer.Argument(None, help="X-ray files to explain (PNG / JPEG / DICOM ...)."),
    method: str = typer.Option("gradcam", "--method", help="gradcam, gradcam++, hirescam, scorecam, eigencam, layercam, xgradcam, eigengradcam."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default RUN_DIR/explain)."),
    target_class: Optional[str] = typer.Option(None, "--class", help="Class to explain (default: the run's positive class, else the predicted one)."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Target layer by module name (default: the architecture's CAM layer)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="Annotations folder with index.csv (default: DATA_ROOT/annotations) for lung-focus scores."),
    road: bool = typer.Option(False, "--road", help="Also compute ROAD faithfulness scores (slow)."),
    severity: bool = typer.Option(False, "--severity", help="Correlate p(covid) and heatmap lung area with the 92 expert severity scores."),
    patient: Optional[str] = typer.Option(None, "--patient", help="Draw the serial-X-ray progression of this patient_id (needs --manifest)."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", "-m", help="Manifest CSV for --patient."),
    feature_maps: Optional[List[str]] = typer.Option(None, "--feature-maps", help="Layer name(s): grid of activation maps for the first image."),
    sanity: Optional[str] = typer.Option(None, "--sanity", help="Model-randomisation sanity check: 'full' or 'cascading'; --method may list several methods, comma-separated."),
    allow_non_frontal: bool = typer.Option(False, "--allow-non-frontal", help="Also explain DICOMs that say they are CT / lateral / not the chest."),
) -> None:
    """Grad-CAM family heatmaps, lung-focus scores, sanity checks, severity correlation, progression and feature maps."""
    from covidcxr.errors import ConfigError

    out_dir = out if out is not None else run_dir / "explain"
    if severity:
        from covidcxr.explain.severity import severity_study

        r = severity_study(run_dir, method=method, target_class=target_class, layer=layer, batch_size=batch_size, out=out_dir)
        for pred, by_score in r["correlations"].items():
            for score, c in by_score.items():
                console.print(f"{pred} vs {score}: Spearman {c['rho']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}] (n={c['n']})")
    elif patient is not None:
        from covidcxr.explain.progression import plot_progression

        if manifest is None:
            raise ConfigError("--patient needs --manifest (the manifest CSV that lists the patient's images)")
        r = plot_progression(run_dir, manifest, patient, method=method, target_class=target_class, layer=layer, out=out_dir)
        console.print(f"wrote {out_dir / r['figure']} ({len(r['studies'])} studies)")
    elif feature_maps:
        from covidcxr.explain.features import feature_maps as draw_feature_maps

        if not images:
            raise ConfigError("--feature-maps needs one image")
        r = draw_feature_maps(run_dir, images[0], feature_maps, out=out_dir)
        console.print(f"wrote {out_dir / r['figure']}")
    elif sanity is not None:
        from covidcxr.explain.sanity import sanity_check

        r = sanity_check(run_dir, images or [], methods=method.split(","), mode=sanity, target_class=target_class,
                         layer=layer, batch_size=batch_size, out=out_dir, allow_non_frontal=allow_non_frontal)
        for m, e in r["methods"].items():
            console.print(f"{m}: mean |rho| trained vs randomised = {e['mean_abs_rho']:.2f}"
                          + ("  [red]FLAGGED: maps barely depend on the weights[/red]" if e["flagged"] else "  ok"))
    else:
        from covidcxr.explain.images import explain_images

        r = explain_images(run_dir, images or [], method=method, out=out_dir, target_class=target_class, layer=layer,
                           batch_size=batch_size, annotations=annotations, road=road,
                           allow_non_frontal=allow_non_frontal)
        lf = r["lung_focus_summary"]
        console.print(f"wrote {len(r['images'])} overlays + summary.json to {out_dir}; skipped {len(r['skipped'])}")
        for s in r["skipped"]:
            console.print(f"  skipped {s['image']}: {s['reason']}", highlight=False)
        if lf.get("n"):
            console.print(f"lung focus (n={lf['n']}): mass share {lf['mean_mass_share']:.2f} vs uniform {lf['mean_baseline']:.2f}; "
                          f"pointing game {lf['pointing_game']:.2f}")


# ---------------------------------------------------------------- predict / export / serve (issue: serving)
@app.command("predict")
def predict(
    run_dir: Path = typer.Argument(..., help="run directory (run.json + model)"),
    paths: List[str] = typer.Argument(..., help="image files, folders (recursive), globs, .zip / .tar archives"),
    out: Path = typer.Option(Path("predictions.csv"), "--out", "-o", help="output file: .csv, .json, .jsonl or .parquet"),
    batch_size: int = typer.Option(16, min=1, help="images per batch (one flush to disk per batch)"),
    backend: str = typer.Option("torch", help="torch or onnx (run `covidcxr export` first)"),
    resume: bool = typer.Option(False, "--resume", help="skip inputs already in --out (continue a killed job)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out (when the new one is done)"),
    heatmaps: Optional[Path] = typer.Option(None, "--heatmaps", help="folder for one Grad-CAM overlay PNG per image"),
    workers: int = typer.Option(2, min=1, help="image decoding threads"),
    allow_non_frontal: bool = typer.Option(False, "--allow-non-frontal",
                                           help="also predict DICOMs that say they are CT / lateral (refused by default)"),
    strict: bool = typer.Option(False, "--strict", help="exit with status 1 if any input was skipped or ignored"),
    min_side: int = typer.Option(64, min=1, help="plausibility gate: smallest side in pixels"),
    max_aspect: float = typer.Option(4.0, min=1.0, help="plausibility gate: largest longer / shorter side"),
    content_checks: bool = typer.Option(True, "--content-checks/--no-content-checks",
                                        help="plausibility gate: refuse near-constant and noise-like images"),
    max_archive_gb: float = typer.Option(4.0, min=0.0, help="most GiB unpacked from archives per job (members past "
                                                            "it are skipped)"),
    engine: str = typer.Option("local", help="local, or ray (Ray Data actors; --out is a folder of partitions)"),
    actors: int = typer.Option(2, min=1, help="--engine ray: scoring actors (a cluster: set RAY_ADDRESS)"),
):
    """Predict class probabilities for many images; inputs not predicted are listed in <out>.skipped.csv.

    Exit status: 0 when at least one image was predicted (or was already, with --resume); 1 when
    nothing was, or with --strict when any input was skipped; 2 for usage errors; 143 on SIGTERM.
    """
    from rich.markup import escape

    from covidcxr.data.plausibility import InputChecks
    from covidcxr.serving.batch import display_name, predict_run

    if engine != "local":
        return predict_with_ray(engine, run_dir, paths, out, actors=actors, batch_size=batch_size,
                                backend=backend, resume=resume, overwrite=overwrite, allow_non_frontal=allow_non_frontal,
                                max_archive_bytes=int(max_archive_gb * 2**30), strict=strict,
                                checks=InputChecks(min_side=min_side, max_aspect=max_aspect, content=content_checks))
    result = predict_run(run_dir, paths, out, backend=backend, heatmaps=heatmaps, batch_size=batch_size,
                         resume=resume, overwrite=overwrite, workers=workers, allow_non_frontal=allow_non_frontal,
                         max_archive_bytes=int(max_archive_gb * 2**30),
                         checks=InputChecks(min_side=min_side, max_aspect=max_aspect, content=content_checks))
    for path, reason in result.skipped[:20]:
        err_console.print(f"[yellow]skipped[/yellow] {escape(path)}: {escape(reason)}", highlight=False, soft_wrap=True)
    listed, written = display_name(result.skipped_file), display_name(result.out)
    if len(result.skipped) > 20:
        err_console.print(f"... and {len(result.skipped) - 20} more (see {listed})", highlight=False, markup=False)
    console.print(f"{result.predicted} images predicted, {result.already_done} already done (--resume), "
                  f"{len(result.skipped)} skipped (listed in {listed}), {result.ignored} non-image files "
                  f"ignored -> {written} ({result.total_rows} rows)", highlight=False, markup=False)
    if result.predicted == 0 and result.already_done == 0:
        err_console.print(f"[bold red]error:[/bold red] nothing was predicted ({result.inputs} inputs found, none "
                          f"readable as an image; reasons in {escape(listed)})", highlight=False)
        raise typer.Exit(1)
    if strict and result.total_skipped:
        err_console.print(f"[bold red]error:[/bold red] --strict: {result.total_skipped} inputs were skipped or "
                          f"ignored (listed in {escape(listed)})", highlight=False)
        raise typer.Exit(1)


@app.command("export")
def export(
    run_dir: Path = typer.Argument(..., help="run directory (run.json + model)"),
    format: str = typer.Option("onnx", "--format", help="export format (onnx)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output file (default RUN_DIR/model.onnx, recorded in run.json)"),
    opset: int = typer.Option(18, help="ONNX opset"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: static, calibrated on 64 validation images"),
):
    """Export the model with a dynamic batch size and probability outputs; checked against PyTorch."""
    path = export_run_model(run_dir, quantize, format=format, out=out, opset=opset)
    console.print(f"exported {path}", highlight=False)


@app.command("serve")
def serve(
    run_dir: Path = typer.Argument(..., help="run directory (run.json + model)"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (0.0.0.0 exposes the service to the network)"),
    port: int = typer.Option(8000, help="TCP port"),
    backend: str = typer.Option("torch", help="torch or onnx (run `covidcxr export` first)"),
    token: Optional[str] = typer.Option(None, help="API token (visible in `ps`: prefer COVIDCXR_TOKEN or --token-file)"),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="read the API token from this file (chmod 600)"),
    audit_db: Optional[str] = typer.Option(None, "--audit-db", help="SQLAlchemy URL of the audit log (default sqlite in RUN_DIR)"),
    max_upload_mb: float = typer.Option(32.0, help="largest accepted upload in MiB (413 above)"),
    max_pixels: Optional[int] = typer.Option(None, help="largest width x height decoded (default 25,000,000)"),
    timeout: float = typer.Option(30.0, help="seconds per prediction, queueing included, before 504"),
    decode_timeout: Optional[float] = typer.Option(None, help="decode budget in seconds (default 10; 422 above)"),
    body_timeout: Optional[float] = typer.Option(None, help="seconds for the whole request body (default 60; 408)"),
    header_timeout: Optional[float] = typer.Option(None, help="seconds for the request headers (default 10)"),
    keep_alive: Optional[int] = typer.Option(None, help="idle keep-alive seconds (default 5)"),
    heatmaps: bool = typer.Option(True, "--heatmaps/--no-heatmaps", help="Grad-CAM overlays in responses"),
    workers: int = typer.Option(2, min=1, help="inference threads"),
    max_queue: Optional[int] = typer.Option(None, help="predictions waiting for a thread (default 16; 503 above)"),
    max_connections: Optional[int] = typer.Option(None, help="open connections (default 128; 503 above)"),
    max_connections_per_client: Optional[int] = typer.Option(None, help="per client address (default 32)"),
    max_uploads: Optional[int] = typer.Option(None, help="uploads in flight (default 32; 503 above)"),
    max_uploads_per_client: Optional[int] = typer.Option(None, help="per client address (default 8; 429 above)"),
    allowed_host: Optional[List[str]] = typer.Option(None, "--allowed-host", help="accepted Host name (repeat; "
                                                     "default localhost, 127.0.0.1, [::1] and --host)"),
    allowed_origin: Optional[List[str]] = typer.Option(None, "--allowed-origin", help="extra Origin that may POST "
                                                       "(repeat; e.g. https://cxr.example.org)"),
    forwarded_allow_ips: Optional[str] = typer.Option(None, help="trust X-Forwarded-For from these proxy addresses"),
    allow_non_frontal: bool = typer.Option(False, "--allow-non-frontal",
                                           help="accept DICOMs that say they are CT / lateral (422 by default)"),
    min_side: Optional[int] = typer.Option(None, help="plausibility gate: smallest side in pixels (default 64)"),
    max_aspect: Optional[float] = typer.Option(None, help="plausibility gate: largest aspect ratio (default 4)"),
    content_checks: bool = typer.Option(True, "--content-checks/--no-content-checks",
                                        help="plausibility gate: refuse near-constant and noise-like images"),
):
    """Serve the model: web page at /, API at /v1/predict and /v1/model (token from COVIDCXR_TOKEN, --token-file)."""
    from covidcxr.serving.server import serve_run

    optional = dict(max_pixels=max_pixels, decode_timeout_s=decode_timeout, body_timeout_s=body_timeout,
                    header_timeout_s=header_timeout, keep_alive_s=keep_alive, max_queue=max_queue,
                    max_connections=max_connections, max_connections_per_client=max_connections_per_client,
                    max_uploads=max_uploads, max_uploads_per_client=max_uploads_per_client,
                    allowed_hosts=allowed_host or None, allowed_origins=allowed_origin or None,
                    forwarded_allow_ips=forwarded_allow_ips, min_side=min_side, max_aspect=max_aspect)
    serve_run(run_dir, host=host, port=port, backend=backend, token=token, token_file=token_file, audit_db=audit_db,
              max_upload_mb=max_upload_mb, timeout_s=timeout, heatmaps=heatmaps, workers=workers,
              allow_non_frontal=allow_non_frontal, content_checks=content_checks, **{k: v for k, v in optional.items() if v is not None},
              warn=lambda message: err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False))
