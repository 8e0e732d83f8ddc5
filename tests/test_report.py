"""`covidcxr report`: one self-contained HTML file, rendered in real headless Chromium."""

from __future__ import annotations

import os

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.evaluation.evaluate import evaluate_run
from covidcxr.evaluation.summary import format_estimate
from covidcxr.evaluation.report import build_report, render_markdown

from test_evaluate import small_eval_manifest  # noqa: E402  (tests/ is on sys.path under pytest)

CHROMIUM = Path("/usr/bin/chromium")
#: In CI a missing playwright fails the test instead of skipping it.
CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="module")
def reported(trained_run, split_manifest, tmp_path_factory):
    """A copy of the trained run, evaluated (with a held-out source) and explained, then reported via the CLI."""
    from covidcxr.explain.images import explain_images

    tmp = tmp_path_factory.mktemp("report")
    run_dir = tmp / "run"
    shutil.copytree(trained_run, run_dir)
    manifest = small_eval_manifest(split_manifest, tmp / "m.csv", per_source=6)
    evaluate_run(run_dir, manifest, by="source", prevalence=0.05, n_boot=100, progress=False)
    test_images = pd.read_csv(manifest).query("split == 'test'")["image"].head(2).tolist()
    explain_images(run_dir, test_images)
    result = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(tmp / "report.html")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return {"run_dir": run_dir, "html": tmp / "report.html",
            "metrics": json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())}


def test_report_is_self_contained(reported):
    html = reported["html"].read_text()
    # no external resource of any kind: every image is a data: URI, CSS is inline
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", html)
    assert "<link" not in html and "<script" not in html
    imgs = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert imgs and all(src.startswith("data:image/png;base64,") for src in imgs)
    # every figure evaluate wrote is in the report (ROC, PR, ..., per-source ROC) plus heatmaps
    n_plots = sum(len(v) for v in reported["metrics"]["plots"].values())
    summary = json.loads((reported["run_dir"] / "explain" / "summary.json").read_text())
    assert len(imgs) >= n_plots + len(summary["images"])


def test_report_renders_in_headless_chromium(reported, tmp_path):
    if CI:  # a missing playwright is an ImportError (a failure) in CI, a skip on a laptop
        import playwright.sync_api as playwright
    else:
        playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found; install Debian chromium to test the report")
    m = reported["metrics"]
    external_requests = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("request", lambda r: external_requests.append(r.url)
                if not r.url.startswith(("file:", "data:")) else None)
        page.goto(reported["html"].as_uri())
        page.wait_for_load_state("load")
        headings = page.locator("h2").all_inner_texts()
        text = page.inner_text("body")
        broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length")
        n_images = page.evaluate("document.images.length")
        shot = page.screenshot(full_page=True)
        browser.close()
    (tmp_path / "report.png").write_bytes(shot)
    assert external_requests == []
    for h in ("Summary", "Data summary and audit", "Training curves", "Evaluation", "Model card", "Heatmap gallery"):
        assert h in headings, h
    assert n_images > 5 and broken == 0
    test = m["groups"]["test"]
    # the numbers on the page are the numbers in metrics.json
    assert format_estimate(test["binary"]["auc"]) in text
    assert format_estimate(test["within_source_auc"]) in text
    assert format_estimate(test["binary"]["sensitivity"]) in text
    assert "Internal vs external" in text and "external (held-out)" in text
    # what training wrote into the run directory is shown too
    epochs = [ln for ln in (reported["run_dir"] / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert f"{len(epochs)} epochs from metrics.jsonl" in text
    assert "Model card:" in text and "Intended use" in text
    img = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
    assert img.shape[0] > 2000 and img.shape[1] == 1280
    assert img.std() > 20 and len(np.unique(img.reshape(-1, 3)[::97], axis=0)) > 50  # not blank


def test_report_tolerates_a_bare_run(trained_run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("run.json", "model.safetensors"):
        shutil.copy(Path(trained_run) / name, bare / name)
    html = build_report(bare).read_text()
    assert "No evaluation results yet" in html and "No MODEL_CARD.md" in html and "Heatmap gallery" not in html


def test_model_card_markdown_cannot_inject_html():
    out = str(render_markdown("# Card\n\n<script>alert(1)</script>\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"))
    assert "<h1>Card</h1>" in out and "<table>" in out
    assert "<script>" not in out and "&lt;script&gt;" in out
