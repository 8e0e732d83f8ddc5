"""``covidcxr synth``: train a CycleGAN between two manifest domains, generate synthetic training images,
measure their realism (see docs/synth.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from covidcxr.cli.console import console

synth_app = typer.Typer(help="CycleGAN between two image domains: train, generate synthetic training images, "
                             "measure realism.", no_args_is_help=True)


@synth_app.command("train")
def synth_train(
    config: Optional[Path] = typer.Argument(None, help="YAML mapping of SynthConfig fields (e.g. configs/synth_normal_covid.yaml)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (generators, run.json, losses, contact sheets)."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", help="key=value override (repeatable), e.g. --set steps=500."),
    resume: bool = typer.Option(False, "--resume", help="Continue the unfinished run in --out from its last checkpoint."),
) -> None:
    """Train a CycleGAN (ResNet generator, 70x70 PatchGAN, LSGAN + cycle + identity, image buffer)."""
    from covidcxr.training.synth.train import train_synth_command

    console.print(train_synth_command(config, out, list(overrides or []), resume), highlight=False, soft_wrap=True)


@synth_app.command("generate")
def synth_generate(
    run_dir: Path = typer.Argument(..., help="CycleGAN run directory."),
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Manifest whose rows are translated."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for images/, manifest.csv, skipped.csv, generation.json."),
    filter: Optional[List[str]] = typer.Option(None, "--filter", help="column=value (repeatable; a column repeated = any "
                                               "of). Default: the generator's source domain. Rows must be split=train."),
    direction: str = typer.Option("a2b", "--direction", help="a2b (domain A -> B) or b2a."),
    max_images: Optional[int] = typer.Option(None, "--max", help="Translate at most N rows (seeded sample)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Translate manifest images into synthetic training images (manifest rows flagged synthetic=true)."""
    from covidcxr.training.synth.generate import generate_synthetic, parse_filters

    s = generate_synthetic(run_dir, manifest, out, filters=parse_filters(list(filter or [])), direction=direction,
                           max_images=max_images, seed=seed)
    console.print(f"{s['images']} synthetic image(s) ({s['label'] or 'source labels'}), {s['skipped']} skipped, "
                  f"generator {s['generator_sha256'][:12]}; manifest written to {out / 'manifest.csv'}",
                  highlight=False, soft_wrap=True)


@synth_app.command("counterfactual")
def synth_counterfactual(
    classifier_run: Path = typer.Argument(..., help="Classifier run directory (binary, with a threshold)."),
    generator_run: Path = typer.Argument(..., help="Source -> source CycleGAN run (e.g. configs/synth_nih_rsna_normals.yaml)."),
    direction: str = typer.Option("a2b", "--direction"),
    split: str = typer.Option("test", "--split", help="Rows of the classifier's split.csv to translate."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full result as JSON."),
) -> None:
    """Counterfactual shortcut test: change only the source look of held-out images, report how P(covid) moves."""
    from covidcxr.evaluation.counterfactual import counterfactual_shift, scorecard_line
    from covidcxr.files import write_json

    result = counterfactual_shift(classifier_run, generator_run, direction=direction, split=split)
    if json_out is not None:
        write_json(json_out, result)
    console.print(scorecard_line(result), highlight=False, soft_wrap=True, markup=False)
