"""``covidcxr compare RUN_A RUN_B``: two runs scored on the same manifest rows, compared pairwise.

Scoring comes from :mod:`covidcxr.evaluation.evaluate`, the statistics from
:mod:`covidcxr.evaluation.compare`; this module only joins them (so neither imports the other).
"""

from __future__ import annotations

from pathlib import Path

from covidcxr.errors import CovidCXRError
from covidcxr.evaluation.compare import compare_predictions
from covidcxr.evaluation.evaluate import _as_manifest, _threshold, run_label_space, score_manifest
from covidcxr.evaluation.metrics import DEFAULT_LEVEL
from covidcxr.files import write_json
from covidcxr.models.run import load_run


def compare_runs(run_a: str | Path, run_b: str | Path, manifest, *, split: str = "test", out: str | Path | None = None,
                 label_space: str | Path | None = None, level: float = DEFAULT_LEVEL, batch_size: int = 16,
                 progress: bool = True) -> dict:
    """Score the same manifest rows with two runs; paired DeLong on AUC and McNemar at each stored threshold.

    Both runs must share the positive class. Only images both runs could read are compared.
    """
    manifest = _as_manifest(manifest)
    part = manifest.subset(split)
    if len(part) == 0:
        raise CovidCXRError(f"{manifest.name}: no rows in split {split!r} to compare on")
    runs = [load_run(run_a), load_run(run_b)]
    if runs[0].positive_class is None or runs[0].positive_class != runs[1].positive_class:
        raise CovidCXRError(f"{run_a} and {run_b} must share a positive class to be compared "
                            f"({runs[0].positive_class!r} vs {runs[1].positive_class!r})")
    scored = []
    skipped = []
    for r in runs:
        table, skip, _ = score_manifest(r, part, run_label_space(r, label_space), batch_size=batch_size,
                                        progress=progress)
        scored.append(table.set_index("image"))
        skipped.extend(skip)
    common = scored[0].index.intersection(scored[1].index)
    a, b = scored[0].loc[common], scored[1].loc[common]
    if (a["y_true"] != b["y_true"]).any():
        raise CovidCXRError("the two runs' label spaces disagree on the positive class of some images")
    result = compare_predictions(a["y_true"].to_numpy(), a["score"].to_numpy(), b["score"].to_numpy(),
                                 a["y_pred"].to_numpy(), b["y_pred"].to_numpy(), level=level)
    result.update({
        "format": "covidcxr-compare/1", "split": split, "manifest": manifest.name, "n_images": int(len(common)),
        "run_a": {"dir": str(run_a), "model_sha256": runs[0].model_sha256, "threshold": _threshold(runs[0])[0]},
        "run_b": {"dir": str(run_b), "model_sha256": runs[1].model_sha256, "threshold": _threshold(runs[1])[0]},
        "skipped": skipped,
    })
    if split == "val":
        result["warning"] = "compared on the VALIDATION split, which chose the thresholds"
    if out is not None:
        write_json(Path(out), result)
    return result


def render_comparison(result: dict, console) -> None:
    """Print a model comparison (CLI)."""
    d, m = result["delong"], result["mcnemar"]
    for item in result.get("skipped", []):
        console.print(f"[yellow]skipped[/yellow] {item['image']}: {item['reason']}", highlight=False, soft_wrap=True)
    if result.get("warning"):
        console.print(f"[bold yellow]warning:[/bold yellow] {result['warning']}")
    console.print(f"{result['n_images']} images ({result['split']}): AUC A {d['auc_a']:.3f} vs B {d['auc_b']:.3f}, "
                  f"difference {d['difference']:+.3f} (95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}), "
                  f"DeLong p = {d['p_value']:.3g}", highlight=False)
    console.print(f"McNemar at stored thresholds: only A correct {m['only_a_correct']}, only B correct "
                  f"{m['only_b_correct']}, p = {m['p_value']:.3g} ({m['method']})", highlight=False)
