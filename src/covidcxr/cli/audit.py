"""``covidcxr verify`` and ``covidcxr audit``: is a run what it says, and can it be trusted (docs/audits.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

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


@audit_app.command("backdoor")
def audit_backdoor_command(
    run_dir: Path = typer.Argument(..., help="Run directory of any classifier (yours or one you were given)."),
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Manifest of the data the model was trained on."),
    split: str = typer.Option("train", "--split", help="Rows of the manifest's 'split' column to look at."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Class-stratified sample of that many rows."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for backdoor.json / backdoor_scores.csv "
                                       "(default RUN_DIR/audit)."),
    silhouette: float = typer.Option(0.30, help="Activation clustering: silhouette of a class's two clusters at "
                                     "or above which the class is suspicious."),
    max_share: float = typer.Option(0.35, help="... if its smaller cluster is at most this share of the class."),
    flag_margin: float = typer.Option(1.5, min=0.0, help="In a suspicious class, flag this many times the smaller "
                                      "cluster's size: the images nearest its side (backdoor_scores.csv)."),
    trigger_flip: float = typer.Option(0.30, help="Known-trigger test: share of negative decisions flipped that warns."),
    trigger_test: bool = typer.Option(True, "--trigger-test/--no-trigger-test",
                                      help="Stamp the Matsuo & Takemoto trigger on the run's own test negatives."),
    record: bool = typer.Option(True, "--record/--no-record", help="Write the verdict into run.json (audits.backdoor)."),
) -> None:
    """Activation clustering, spectral signatures and a known-trigger test; exit 1 when a backdoor is suspected."""
    from covidcxr.audit.backdoor import BackdoorThresholds, audit_backdoor

    result = audit_backdoor(run_dir, manifest, out=out, split=split, max_images=max_images, trigger_test=trigger_test,
                            thresholds=BackdoorThresholds(silhouette=silhouette, max_share=max_share,
                                                          flag_margin=flag_margin, trigger_flip=trigger_flip),
                            write_record=record)
    for c in result["activation_clustering"]["classes"]:
        sil = "n/a" if c["silhouette"] is None else f"{c['silhouette']:.2f}"
        console.print(f"activation clustering, class {c['class']}: {c['images']} images, silhouette {sil}, smaller "
                      f"cluster {c['smaller_share']:.0%}{'  SUSPICIOUS' if c['suspicious'] else ''}",
                      highlight=False, markup=False)
    n_flagged = result["activation_clustering"]["flagged"]
    if n_flagged:
        console.print(f"{n_flagged} training images to inspect first: ac_flagged in "
                      f"{result['_out'] / 'backdoor_scores.csv'}", highlight=False, markup=False)
    t = result["trigger_test"]
    if t.get("value") is not None:
        where = "inside the lungs" if t.get("placement") == "lungs" else "near the corner"
        console.print(f"known trigger ({where}): flips {t['value']:.0%} of {t['images']} negative test decisions",
                      highlight=False)
    (err_console if result["verdict"] == "warn" else console).print(
        f"{result['verdict'].upper()}: {result['sentence']}", highlight=False, markup=False, soft_wrap=True)
    if result["verdict"] == "warn":
        raise typer.Exit(1)


@audit_app.command("shortcuts")
def audit_shortcuts_command(
    run_dir: Path = typer.Argument(..., help="Run directory (run.json + model)."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", "-m", help="Manifest with a 'split' column "
                                            "(default: the run's own split.csv)."),
    split: str = typer.Option("test", "--split", help="Rows to score (never the ones trained on)."),
    threshold: Optional[List[str]] = typer.Option(None, "--threshold", help="Override a check's thresholds: "
                                                  "NAME=WARN,FAIL (repeatable; names in docs/audits.md)."),
    limit_per_source: Optional[int] = typer.Option(None, "--limit-per-source", help="Seeded sample of that many "
                                                   "images per source and class (quick look)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for shortcuts.json (default RUN_DIR/audit)."),
    record: bool = typer.Option(True, "--record/--no-record", help="Write the card into run.json (audits.shortcuts)."),
) -> None:
    """Shortcut scorecard: source probe, lungs removed / only, border only, heatmaps, markers, perturbations, subgroups."""
    from covidcxr.audit.scorecard import audit_shortcuts, parse_overrides

    card = audit_shortcuts(run_dir, manifest, out=out, split=split, thresholds=parse_overrides(list(threshold or [])),
                           limit_per_source=limit_per_source, write_record=record)
    for c in card["checks"]:
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        ci = "" if c.get("ci_low") is None or c.get("ci_high") is None else f" [{c['ci_low']:.3f}, {c['ci_high']:.3f}]"
        console.print(f"{c['verdict']:>5}  {c['name']}: {value}{ci}  {c['sentence']}", highlight=False,
                      markup=False, soft_wrap=True)
    console.print(f"{card['verdict'].upper()}: {card['sentence']}", highlight=False, markup=False)
