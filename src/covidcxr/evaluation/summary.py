"""Evaluation results as text: estimates with CIs, the headline table the CLI prints."""

from __future__ import annotations

#: The files ``covidcxr evaluate`` writes into its output folder.
METRICS_JSON = "metrics.json"
PREDICTIONS_CSV = "predictions.csv"


def summary_rows(result: dict) -> list[tuple[str, str, str]]:
    """(group, metric, 'value (low-high)') rows of the headline numbers, for the CLI and report."""
    rows = []
    for g, m in result["groups"].items():
        b = m.get("binary") or {}
        for name in ("auc", "sensitivity", "specificity", "ppv", "npv", "balanced_accuracy", "f1"):
            if name in b:
                rows.append((g, name, format_estimate(b[name])))
        w = m.get("within_source_auc")
        if w:
            rows.append((g, "within_source_auc", format_estimate(w)))
        if "multiclass" in m:
            rows.append((g, "macro_auc", format_estimate(m["multiclass"]["macro_auc"])))
        if "calibration" in m:
            rows.append((g, "ece", f"{m['calibration']['ece']:.3f}"))
    for name, v in (result.get("internal_vs_external") or {}).get("gap", {}).items():
        rows.append(("internal - external", name, "n/a" if v is None else f"{v:+.3f}"))
    return rows


def format_estimate(e: dict | None, digits: int = 3) -> str:
    if not e or e.get("value") is None:
        return "n/a"
    if e.get("ci_low") is None or e.get("ci_high") is None:
        return f"{e['value']:.{digits}f}"
    return f"{e['value']:.{digits}f} ({e['ci_low']:.{digits}f}-{e['ci_high']:.{digits}f})"


def render_summary(result: dict, console) -> None:
    """Print the headline numbers of an evaluation (or a comparison) as a rich table."""
    from rich.table import Table

    for item in result.get("skipped", []):
        console.print(f"[yellow]skipped[/yellow] {item['image']}: {item['reason']}", highlight=False, soft_wrap=True)
    if result.get("warning"):
        console.print(f"[bold yellow]warning:[/bold yellow] {result['warning']}", highlight=False, soft_wrap=True)
    table = Table(title=f"{result.get('split')} - threshold {result.get('threshold'):.4g} ({result.get('threshold_source')})")
    for col in ("group", "metric", "value (95% CI)"):
        table.add_column(col)
    for row in summary_rows(result):
        table.add_row(*row)
    console.print(table)
    if result.get("out"):
        console.print(f"wrote {result['out']}/{METRICS_JSON}, {PREDICTIONS_CSV} and figures")
