"""``covidcxr report RUN_DIR``: one self-contained HTML file about a run.

Everything is inlined (PNG figures as base64 ``data:`` URIs, CSS in a ``<style>`` block) and a
Content-Security-Policy forbids any external request, so the file can be mailed, archived with a
paper or opened on an offline hospital machine. What the report shows comes from the run directory;
every part is optional and a missing part is said to be missing:

* ``data_audit.json`` or ``audit.json`` (training: the manifest audit), ``run.json`` info
* ``metrics.jsonl`` (training: one JSON object per epoch) -> training-curve figure
* ``eval/*/metrics.json`` + figures (``covidcxr evaluate``)
* ``MODEL_CARD.md`` (rendered as Markdown, raw HTML disabled)
* ``explain/summary.json`` (``covidcxr explain``) -> heatmap gallery
"""

from __future__ import annotations

import base64
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from markupsafe import Markup, escape

from covidcxr.errors import CovidCXRError
from covidcxr.evaluation.evaluate import read_eval_results
from covidcxr.evaluation.report_audits import render_trust
from covidcxr.evaluation.summary import format_estimate
from covidcxr.files import atomic_write_bytes
from covidcxr.models.record import read_run_record

REPORT_FILE = "report.html"
MAX_TABLE_ROWS = 60
MAX_GALLERY = 48
#: the data audit written by training, under the names it has had
AUDIT_FILES = ("data_audit.json", "audit.json")

#: (key in the binary block, label) rows of the metrics table
BINARY_ROWS = (("auc", "AUC"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"), ("ppv", "PPV"),
               ("npv", "NPV"), ("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"), ("f1", "F1"))


# ---------------------------------------------------------------- small HTML helpers


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def html_table(header: list[str], rows: list[list], numeric_from: int = 1) -> Markup:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in rows[:MAX_TABLE_ROWS]:
        cells = "".join(f"<td class='num'>{escape(_fmt(v))}</td>" if i >= numeric_from else f"<td>{escape(_fmt(v))}</td>"
                        for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    more = f"<p class='muted'>{len(rows) - MAX_TABLE_ROWS} more rows not shown.</p>" if len(rows) > MAX_TABLE_ROWS else ""
    return Markup(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}")


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_value(obj, depth: int = 0) -> Markup:
    """Any JSON value as HTML: dicts as key/value tables, lists of dicts as tables (for audit data)."""
    if isinstance(obj, dict):
        if not obj:
            return Markup("<span class='muted'>(empty)</span>")
        if depth >= 3:
            return Markup(escape(json.dumps(obj, default=str)[:400]))
        rows = "".join(f"<tr><th>{escape(k)}</th><td>{render_value(v, depth + 1)}</td></tr>" for k, v in obj.items())
        return Markup(f"<table>{rows}</table>")
    if isinstance(obj, list):
        if not obj:
            return Markup("<span class='muted'>(none)</span>")
        if all(isinstance(x, dict) for x in obj):
            cols: list[str] = []
            for x in obj:
                cols += [k for k in x if k not in cols]
            return html_table(cols, [[_scalar(x.get(c)) for c in cols] for x in obj], numeric_from=len(cols))
        text = ", ".join(_fmt(x) if not isinstance(x, (dict, list)) else json.dumps(x, default=str) for x in obj[:50])
        return Markup(escape(text + (f" ... ({len(obj)} in all)" if len(obj) > 50 else "")))
    return Markup(escape(_fmt(obj)))


def _scalar(v):
    return json.dumps(v, default=str)[:200] if isinstance(v, (dict, list)) else v


def collapsed(title: str, body: Markup) -> Markup:
    """A native <details> block (no script): long tables stay out of the way until opened."""
    return Markup(f"<details><summary>{escape(title)}</summary>{body}</details>")


def render_audit(audit: dict) -> Markup:
    """Audit headline numbers and findings (check, severity, message) up front; the rest collapsed."""
    if not isinstance(audit, dict):
        return render_value(audit)
    head_keys = [k for k in ("manifest", "n_images", "n_patients", "ok", "n_errors", "n_warnings") if k in audit]
    parts = [render_value({k: audit[k] for k in head_keys})] if head_keys else []
    findings = audit.get("findings")
    if isinstance(findings, list) and findings and all(isinstance(f, dict) for f in findings):
        rows = [[f.get("severity"), f.get("check"), f.get("message")] for f in findings]
        parts.append(Markup("<h3>Findings</h3>") + html_table(["severity", "check", "message"], rows, numeric_from=3))
    rest = {k: v for k, v in audit.items() if k not in head_keys}
    if rest:
        parts.append(collapsed("Full audit record", render_value(rest)))
    return Markup("").join(parts)


def render_markdown(text: str) -> Markup:
    """Markdown (CommonMark + tables) to HTML with raw HTML disabled, so a model card cannot inject markup."""
    from markdown_it import MarkdownIt

    return Markup(MarkdownIt("commonmark", {"html": False}).enable("table").render(text))


# ---------------------------------------------------------------- sections


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CovidCXRError(f"{path}: not valid JSON ({exc})") from exc


def read_epochs(path: Path) -> list[dict]:
    """metrics.jsonl rows; a torn last line (killed run) is ignored, other bad lines are an error."""
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    epochs = []
    for i, line in enumerate(lines):
        try:
            epochs.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise CovidCXRError(f"{path}: line {i + 1} is not valid JSON ({exc})") from exc
    return [e for e in epochs if isinstance(e, dict)]


def _training_curves(epochs: list[dict]) -> str | None:
    from covidcxr.evaluation.plots import plot_training_curves

    with tempfile.TemporaryDirectory() as tmp:
        path = plot_training_curves(Path(tmp) / "curves.png", epochs)
        return data_uri(path) if path is not None else None


def _metrics_table(ev: dict) -> Markup:
    groups = list(ev.get("groups", {}))
    rows = []
    rows.append(["Images"] + [ev["groups"][g].get("n_images") for g in groups])
    rows.append(["Patients"] + [ev["groups"][g].get("n_patients") for g in groups])
    rows.append(["Positives (" + str(ev.get("positive_class")) + ")"] +
                [(ev["groups"][g].get("binary") or {}).get("n_positive") for g in groups])
    for key, label in BINARY_ROWS:
        rows.append([label] + [format_estimate((ev["groups"][g].get("binary") or {}).get(key)) for g in groups])
        if key == "auc":
            rows.append(["Within-source AUC"] + [format_estimate(ev["groups"][g].get("within_source_auc")) for g in groups])
    if any((ev["groups"][g].get("binary") or {}).get("at_prevalence") for g in groups):
        for key in ("ppv", "npv"):
            prev = next((ev["groups"][g]["binary"]["at_prevalence"]["prevalence"] for g in groups
                         if (ev["groups"][g].get("binary") or {}).get("at_prevalence")), None)
            rows.append([f"{key.upper()} at prevalence {prev:g}"] +
                        [format_estimate(((ev["groups"][g].get("binary") or {}).get("at_prevalence") or {}).get(key))
                         for g in groups])
    if any("multiclass" in ev["groups"][g] for g in groups):
        rows.append(["Macro AUC (one-vs-rest)"] + [format_estimate((ev["groups"][g].get("multiclass") or {}).get("macro_auc"))
                                                   for g in groups])
        rows.append(["Accuracy (all classes)"] + [format_estimate((ev["groups"][g].get("multiclass") or {}).get("accuracy"))
                                                  for g in groups])
    rows.append(["ECE (10 bins)"] + [_get(ev["groups"][g], "calibration", "ece") for g in groups])
    rows.append(["Brier score"] + [_get(ev["groups"][g], "calibration", "brier") for g in groups])
    if any(_get(ev["groups"][g], "calibration", "temperature_scaled") for g in groups):
        rows.append(["ECE after temperature scaling (fitted on val)"] +
                    [_get(ev["groups"][g], "calibration", "temperature_scaled", "ece") for g in groups])
    return html_table(["metric"] + groups, rows)


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _within_table(w: dict | None) -> Markup | None:
    if not w or not w.get("per_source"):
        return None
    rows = [[r["source"], r["n"], r["n_positive"], r["n_negative"], r["pairs"], format_estimate(r) if r["used"] else "n/a (one class)"]
            for r in w["per_source"]]
    return html_table(["source", "images", "positives", "negatives", "pos-neg pairs", "AUC (95% CI)"], rows)


def _by_table(by: dict | None) -> Markup | None:
    if not by:
        return None
    rows = []
    for key, m in by["groups"].items():
        b = m.get("binary") or {}
        rows.append([key, m.get("n_images"), b.get("n_positive"), format_estimate(b.get("auc")),
                     format_estimate(b.get("sensitivity")), format_estimate(b.get("specificity")),
                     format_estimate(m.get("within_source_auc"))])
    return html_table([by["column"], "images", "positives", "AUC", "sensitivity", "specificity", "within-source AUC"], rows)


def _multiclass_table(mc: dict | None) -> Markup | None:
    if not mc:
        return None
    rows = [[c, format_estimate(e)] for c, e in mc["auc_ovr"].items()]
    return html_table(["class", "AUC one-vs-rest (95% CI)"], rows)


def _gap_table(ev: dict) -> Markup | None:
    ie = ev.get("internal_vs_external")
    if not ie:
        return None
    gi, ge = ev["groups"][ie["internal"]], ev["groups"][ie["external"]]
    rows = []
    for name, gap in ie["gap"].items():
        rows.append([name, format_estimate((gi.get("binary") or {}).get(name)),
                     format_estimate((ge.get("binary") or {}).get(name)), "n/a" if gap is None else f"{gap:+.3f}"])
    return html_table(["metric", f"internal ({ie['internal']})", "external (held-out)", "gap (internal - external)"], rows)


def _readers_table(readers: dict | None) -> Markup | None:
    if not readers:
        return None
    rows = []
    for name, r in readers["readers"].items():
        rows.append([name, r["n"], format_estimate(r["reader"]["sensitivity"]), format_estimate(r["reader"]["specificity"]),
                     format_estimate(r["model_same_images"]["sensitivity"]), format_estimate(r["model_same_images"]["specificity"]),
                     f"{r['mcnemar_model_vs_reader']['p_value']:.3g} ({r['mcnemar_model_vs_reader']['method']})"])
    table = html_table(["reader", "images", "reader sensitivity", "reader specificity", "model sensitivity",
                        "model specificity", "McNemar p"], rows)
    if readers.get("unmatched_reads"):
        table += Markup(f"<p class='muted'>{readers['unmatched_reads']} read(s) named images outside this evaluation.</p>")
    return table


FIGURE_CAPTIONS = {"roc": "ROC with 95% bootstrap band; red dot: operating point at the validation threshold",
                   "pr": "Precision-recall", "histogram": "Score distribution per true class",
                   "reliability": "Reliability diagram", "confusion": "Confusion matrix at the stored threshold",
                   "roc_by": "ROC per group", "confusion_multiclass": "Multi-class confusion matrix (argmax / threshold)"}


def _eval_context(name: str, ev: dict) -> dict:
    folder = Path(ev["_dir"])
    groups = []
    for g, m in ev.get("groups", {}).items():
        figures = []
        for key, file in (ev.get("plots") or {}).get(g, {}).items():
            if (folder / file).is_file():
                figures.append({"src": data_uri(folder / file), "caption": f"{FIGURE_CAPTIONS.get(key, key)} ({g})"})
        by = m.get("by")
        groups.append({"name": g, "within": _within_table(m.get("within_source_auc")), "by": _by_table(by),
                       "by_column": by["column"] if by else None, "multiclass": _multiclass_table(m.get("multiclass")),
                       "figures": figures})
    return {"name": name, "split": ev.get("split"), "manifest": ev.get("manifest"), "created": ev.get("created"),
            "warning": ev.get("warning"), "threshold": _fmt(ev.get("threshold")), "threshold_source": ev.get("threshold_source"),
            "ci_unit": ev.get("ci_unit"), "skipped": ev.get("skipped") or [], "label_space": ev.get("label_space"),
            "excluded": ", ".join(f"{k}: {v}" for k, v in (ev.get("excluded_by_label_space") or {}).items()),
            "gap": _gap_table(ev), "table": _metrics_table(ev), "groups": groups, "readers": _readers_table(ev.get("readers"))}


def _headline(evals: dict[str, dict]) -> list[dict]:
    if not evals:
        return []
    name = "test" if "test" in evals else next(iter(evals))
    ev = evals[name]
    g = ev["groups"].get(ev["split"]) or next(iter(ev["groups"].values()))
    b = g.get("binary") or {}
    cards = []
    for label, est in (("AUC", b.get("auc")), ("Within-source AUC", g.get("within_source_auc")),
                       ("Sensitivity", b.get("sensitivity")), ("Specificity", b.get("specificity"))):
        if est and est.get("value") is not None:
            cards.append({"label": f"{label} ({ev['split']})", "value": f"{est['value']:.3f}",
                          "detail": _ci_text(est)})
    ext = ev["groups"].get("external")
    gap = (ev.get("internal_vs_external") or {}).get("gap", {}).get("auc")
    if ext and (ext.get("binary") or {}).get("auc", {}).get("value") is not None:
        a = ext["binary"]["auc"]
        cards.append({"label": "AUC (external, held-out)", "value": f"{a['value']:.3f}",
                      "detail": _ci_text(a)})
    if gap is not None:
        cards.append({"label": "AUC gap internal - external", "value": f"{gap:+.3f}", "detail": "headline shortcut check"})
    return cards


def _ci_text(est: dict) -> str:
    if est.get("ci_low") is None or est.get("ci_high") is None:
        return "no CI"
    return f"95% CI {est['ci_low']:.3f} to {est['ci_high']:.3f}"


def _gallery(run_dir: Path) -> dict | None:
    path = run_dir / "explain" / "summary.json"
    if not path.is_file():
        return None
    summary = _read_json(path)
    folder = path.parent
    images, missing = [], 0
    if summary.get("contact_sheet") and (folder / summary["contact_sheet"]).is_file():
        images.append({"src": data_uri(folder / summary["contact_sheet"]), "caption": "contact sheet"})
    for entry in (summary.get("images") or [])[:MAX_GALLERY]:
        overlay = entry.get("overlay")
        if not overlay:
            continue
        file = folder / overlay
        if not file.is_file():
            missing += 1
            continue
        lf = entry.get("lung_focus") or {}
        caption = f"{Path(str(entry.get('image', overlay))).name}: predicted {entry.get('predicted_label', '?')}"
        if lf.get("mass_share") is not None:
            caption += f", heat in lungs {lf['mass_share']:.0%} (baseline {lf.get('baseline', 0):.0%})"
        images.append({"src": data_uri(file), "caption": caption})
    focus = summary.get("lung_focus_summary") or {}
    text = ""
    if focus.get("n"):
        text = (f"Lung focus over {focus['n']} images with lung masks: mean share of heat inside the lungs "
                f"{focus['mean_mass_share']:.0%} vs {focus['mean_baseline']:.0%} expected by chance; pointing game "
                f"{focus['pointing_game']:.0%}.")
    return {"method": summary.get("method"), "target": summary.get("target_class"), "images": images, "missing": missing,
            "focus": text, "focus_table": None}


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the self-contained HTML report of ``run_dir``; returns its path (default RUN_DIR/report.html)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    run_dir = Path(run_dir)
    record = read_run_record(run_dir).model_dump(mode="json")
    out = Path(out) if out is not None else run_dir / REPORT_FILE
    evals = read_eval_results(run_dir)
    epochs = read_epochs(run_dir / "metrics.jsonl")
    audit_path = next((run_dir / f for f in AUDIT_FILES if (run_dir / f).is_file()), run_dir / AUDIT_FILES[0])
    card_path = run_dir / "MODEL_CARD.md"
    threshold = record.get("threshold")
    context = {
        "run": {"name": run_dir.resolve().name, "architecture": record.get("architecture"),
                "classes": record.get("classes", []), "positive_class": record.get("positive_class"),
                "threshold_text": "none" if threshold is None else f"{threshold:.4g} (chosen on validation)",
                "sha": record.get("model_sha256", "")},
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "audit": render_audit(_read_json(audit_path)) if audit_path.is_file() else None,
        "run_info": collapsed("run.json info (selection, threshold, data, versions)", render_value(record.get("info")))
        if record.get("info") else None,
        "training_curves": _training_curves(epochs) if epochs else None,
        "n_epochs": len(epochs),
        "evals": [_eval_context(name, ev) for name, ev in evals.items()],
        "headline": _headline(evals),
        "model_card": render_markdown(card_path.read_text()) if card_path.is_file() else None,
        "gallery": _gallery(run_dir),
        "trust": render_trust(record.get("audits")),  # covidcxr audit: shown first
    }
    sections = [("trust", "Trust audits")] if context["trust"] else []
    sections += [("summary", "Summary")] if context["headline"] else []
    sections += [("data", "Data"), ("training", "Training"), ("evaluation", "Evaluation"), ("model-card", "Model card")]
    if context["gallery"]:
        sections.append(("heatmaps", "Heatmaps"))
    context["sections"] = sections
    env = Environment(loader=PackageLoader("covidcxr.evaluation", "templates"), autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(**context)
    atomic_write_bytes(out, html.encode("utf-8"))
    return out
