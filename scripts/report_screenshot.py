"""Evaluate + explain + report a run, then screenshot the report in headless Chromium.

    .venv/bin/python scripts/report_screenshot.py RUN_DIR MANIFEST [--out docs/img/report.png]

MANIFEST needs a 'split' column (test rows; optional 'external' rows = a held-out source). Used to
make the README screenshot (docs/img/report.png).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from covidcxr.data.manifest import Manifest
from covidcxr.evaluation.evaluate import evaluate_run
from covidcxr.evaluation.summary import render_summary
from covidcxr.evaluation.report import build_report


def screenshot(html: Path, png: Path, width: int = 1280, height: int | None = None) -> Path:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": height or 900})
        page.goto(html.resolve().as_uri())
        png.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(png), full_page=height is None)
        browser.close()
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/img/report.png"))
    ap.add_argument("--explain", type=int, default=6, help="test images to explain for the heatmap gallery")
    ap.add_argument("--no-evaluate", action="store_true", help="reuse RUN_DIR/eval/ from an earlier run")
    ap.add_argument("--height", type=int, default=2600, help="screenshot height in px (0: full page)")
    args = ap.parse_args()
    from rich.console import Console

    if not args.no_evaluate:
        result = evaluate_run(args.run_dir, args.manifest, by="source", prevalence=0.05)
        render_summary(result, Console(width=120))
    if args.explain:
        from covidcxr.explain.images import explain_images

        m = Manifest.read(args.manifest)
        test = m.subset("test")
        t = test.table.reset_index(drop=True)
        pick = pd.concat([t[t["label"] == "covid"].head(args.explain // 2), t[t["label"] != "covid"].head(args.explain)])
        paths = test.image_paths()
        explain_images(args.run_dir, [paths[i] for i in pick.index[: args.explain]])
    html = build_report(args.run_dir)
    print(f"wrote {html}")
    print(f"wrote {screenshot(html, args.out, height=args.height or None)}")


if __name__ == "__main__":
    main()
