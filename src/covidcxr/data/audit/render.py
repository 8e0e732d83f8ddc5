"""Showing an :class:`~covidcxr.data.audit.report.AuditReport`: rich tables on a console and the
audit figure (label mix per source and split, known ages by label)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.plotting import pyplot, save_figure

# AuditReport (data.audit.report) calls these renderers; it is named only as a string annotation so
# that nothing imports back.


def plot_report(report: "AuditReport", path: str | Path, table: pd.DataFrame | None = None) -> Path:
    """One PNG: label mix of every source per split (stacked bars; a one-colour bar is a source
    that alone predicts the label) and, if ``table`` (the manifest table) is given, known ages by
    label. Returns ``path``."""
    plt = pyplot()

    sxl = report.tables["source_x_label"].drop(columns="total")
    labels = list(sxl.columns)
    colours = dict(zip(["covid", "normal", "pneumonia", "other"], ["#d62728", "#2ca02c", "#1f77b4", "#7f7f7f"]))
    has_age = table is not None and table["age_years"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_age else 1, figsize=(13 if has_age else 8, 0.32 * len(sxl) + 1.8),
                             squeeze=False, gridspec_kw={"width_ratios": [2, 1]} if has_age else None)
    ax = axes[0, 0]
    names = [f"{split}: {_short(source)}" for split, source in sxl.index]
    left = np.zeros(len(sxl))
    for lab in labels:
        ax.barh(names, sxl[lab].to_numpy(), left=left, label=lab, color=colours.get(lab))
        left += sxl[lab].to_numpy()
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.set_title("label mix per source and split")
    ax.legend(loc="lower right", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    if has_age:
        ax = axes[0, 1]
        groups = [(lab, table.loc[table["label"] == lab, "age_years"].dropna()) for lab in labels]
        groups = [(lab, a) for lab, a in groups if len(a)]
        ax.boxplot([a.to_numpy() for _, a in groups], showfliers=False)
        ax.set_xticks(range(1, len(groups) + 1),
                      [f"{lab}\n{len(a)}/{int((table['label'] == lab).sum())} known" for lab, a in groups], fontsize=7)
        ax.set_ylabel("age (years)")
        ax.set_title("known ages by label")
    return save_figure(fig, path, dpi=110)


def render_report(report: "AuditReport", console=None, max_pairs: int = 20) -> None:
    """Print the report as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.rule(f"data audit: {report.manifest} ({report.n_images} images, {report.n_patients} patients)")
    for name, t in report.tables.items():
        table = Table(title=name.replace("_", " "), title_justify="left", show_lines=False)
        index_name = " / ".join(str(n) for n in t.index.names if n is not None) or ""
        table.add_column(index_name)
        for c in t.columns:
            table.add_column(str(c), justify="right")
        for idx, row in t.iterrows():
            key = " / ".join(map(str, idx)) if isinstance(idx, tuple) else str(idx)
            table.add_row(key or "(unknown)", *[_fmt(v) for v in row])
        console.print(table)
    if len(report.duplicates):
        table = Table(title=f"near-duplicate pairs (pHash distance <= {report.settings['max_distance']}), "
                            f"{len(report.duplicates)} in all", title_justify="left")
        for c in ("distance", "kind", "image_a", "split_a", "source_a", "image_b", "split_b", "source_b"):
            table.add_column(c, overflow="fold")
        for _, r in report.duplicates.head(max_pairs).iterrows():
            table.add_row(str(r["distance"]), r["kind"], r["image_a"], r["split_a"], r["source_a"],
                          r["image_b"], r["split_b"], r["source_b"])
        console.print(table)
    style = {"error": "bold red", "warning": "yellow", "info": "dim"}
    table = Table(title="findings", title_justify="left")
    table.add_column("severity")
    table.add_column("check")
    table.add_column("message", overflow="fold")
    for f in sorted(report.findings, key=lambda f: ("error", "warning", "info").index(f.severity)):
        table.add_row(f"[{style[f.severity]}]{f.severity}[/]", f.check, f.message)
    console.print(table)
    verdict = "[bold green]OK[/]" if report.ok else f"[bold red]{len(report.errors)} error(s)[/]"
    console.print(f"{verdict}, {len(report.warnings)} warning(s)")


def _short(source: str, width: int = 28) -> str:
    return source if len(source) <= width else source[: width - 1] + "\u2026"


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "-" if not np.isfinite(v) else (f"{v:.3f}" if abs(v) < 1 else f"{v:.1f}" if not float(v).is_integer() else f"{int(v)}")
    return str(v)
