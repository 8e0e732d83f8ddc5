"""The report's first section: the trust audits stored in ``run.json`` (``audits``, written by ``covidcxr audit``).

A backdoor warning or a failed / warned shortcut check is shown as a coloured banner above
everything else, with the audit's own one-sentence reason; a clean audit says it passed and what
it cannot rule out. Everything else of an audit is collapsed.
"""

from __future__ import annotations

import json

from markupsafe import Markup, escape

VERDICT_CLASS = {"pass": "ok", "warn": "warn", "fail": "fail"}


def _table(header: list[str], rows: list[list]) -> Markup:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape('' if v is None else v)}</td>" for v in row) + "</tr>" for row in rows)
    return Markup(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _details(title: str, obj) -> Markup:
    text = json.dumps(obj, indent=1, default=str)
    return Markup(f"<details><summary>{escape(title)}</summary><pre>{escape(text)}</pre></details>")


def _banner(verdict: str, title: str, sentence: str) -> Markup:
    cls = VERDICT_CLASS.get(verdict, "warn")
    return Markup(f"<div class='{cls} verdict' data-verdict='{escape(verdict)}'><b>{escape(title)}: "
                  f"{escape(verdict.upper())}</b> {escape(sentence)}</div>")


def _scorecard_table(checks: list[dict]) -> Markup:
    rows = []
    for c in checks:
        ci = "" if c.get("ci_low") is None or c.get("ci_high") is None else f"{c['ci_low']:.3f}-{c['ci_high']:.3f}"
        value = c.get("value")
        rows.append([c.get("name"), "n/a" if value is None else f"{value:.3f}", ci, c.get("verdict"),
                     c.get("sentence")])
    return _table(["check", "value", "95% CI", "verdict", "what it means"], rows)


def render_trust(audits: dict | None) -> Markup | None:
    """HTML of the ``audits`` field of a run record (None when no audit was run)."""
    if not audits:
        return None
    parts = []
    card = audits.get("shortcuts")
    if isinstance(card, dict):
        parts.append(_banner(card.get("verdict", "warn"), "Shortcut scorecard", card.get("sentence", "")))
        if isinstance(card.get("checks"), list):
            parts.append(_scorecard_table(card["checks"]))
    bd = audits.get("backdoor")
    if isinstance(bd, dict):
        parts.append(_banner(bd.get("verdict", "warn"), "Backdoor audit", bd.get("sentence", "")))
        parts.append(_details("Backdoor audit details (activation clustering, spectral signatures, trigger test)",
                              {k: v for k, v in bd.items() if k not in ("verdict", "sentence")}))
    for name, audit in audits.items():
        if name not in ("shortcuts", "backdoor"):
            parts.append(_details(f"{name} audit", audit))
    return Markup("").join(parts)
