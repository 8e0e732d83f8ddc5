"""``covidcxr crossval``: score a training recipe by out-of-fold within-source AUC or leave-one-source-out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from covidcxr.cli.console import console

PROTOCOLS = ("oof", "loso")


def crossval(
    config: Path = typer.Argument(..., help="YAML training config (the recipe to score)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for one run directory per fold / held-out source."),
    protocol: str = typer.Option("oof", "--protocol", help="oof: out-of-fold within-source AUC over every image of "
                                 "the sources with both classes; loso: leave one source out"),
    folds: int = typer.Option(5, "--folds", min=2, help="Folds of the oof protocol (patient-grouped)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the folds and of each model's validation cut."),
    sources: Optional[List[str]] = typer.Option(None, "--source", help="loso: hold out only this source "
                                                "(repeatable); loso.json keeps the sources held out before."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides of the config"),
) -> None:
    """Train the recipe once per fold (or per held-out source) and report the protocol's AUCs with 95% CIs.

    Finished models under --out are reused, so an interrupted protocol continues where it stopped.
    """
    from covidcxr.data.manifest import Manifest
    from covidcxr.errors import ConfigError
    from covidcxr.training import load_config
    from covidcxr.training.protocols import leave_one_source_out, out_of_fold_within_source

    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if sources and protocol != "loso":
        raise ConfigError("--source applies to --protocol loso only")
    cfg = load_config(config, list(overrides or []))
    manifest = Manifest.read(cfg.data.manifest)
    if protocol == "oof":
        result = out_of_fold_within_source(cfg, manifest, out, folds=folds, seed=seed)
        w = result["within_source_auc"]
        console.print(f"out-of-fold within-source AUC {w['value']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] over "
                      f"{result['n']} images of {', '.join(result['sources'])} ({folds} folds); {out}/oof.json",
                      highlight=False, soft_wrap=True)
        for label, d in result["within_source_auc_by_negative_label"].items():
            value = "undefined (fewer than 2 in every COVID source)" if d["value"] is None else (
                f"{d['value']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]")
            console.print(f"  COVID vs {label} only: {value} ({d['negatives_in_pairs']} {label} images in pairs)",
                          highlight=False, soft_wrap=True)
        return
    result = leave_one_source_out(cfg, manifest, out, seed=seed, sources=list(sources or []) or None)
    for source, e in result["held_out"].items():
        auc = f"AUC {e['auc']['value']:.3f}" if e["auc"] else "no positives"
        fpr = "n/a" if e["false_positive_rate"] is None else f"{e['false_positive_rate']:.3f}"
        console.print(f"without {source}: {auc}; negatives' mean P {e['mean_p_negatives']:.3f}, "
                      f"false-positive rate {fpr} (n={e['n']})", highlight=False, soft_wrap=True)
        by_label = ", ".join(f"{lab} {p:.2f}" for lab, p in e.get("mean_p_by_label", {}).items())
        vs = ", ".join(f"vs {lab} {a['value']:.3f}" for lab, a in e.get("auc_by_negative_label", {}).items())
        console.print(f"  mean P(covid) by label: {by_label}" + (f"; COVID {vs}" if vs else ""),
                      highlight=False, soft_wrap=True)
    console.print(f"wrote {out}/loso.json ({json.dumps({'models': len(result['held_out'])})})", highlight=False)
