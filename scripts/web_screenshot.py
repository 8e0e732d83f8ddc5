"""Screenshot of the covidcxr page after a prediction, for the README (docs/img/web.png).

    .venv/bin/python scripts/web_screenshot.py RUN_DIR [IMAGE] [--out docs/img/web.png]

Starts the service on a free loopback port, opens it in headless Chromium (/usr/bin/chromium),
uploads IMAGE (default: a COVID-19 image from ../shared/data/cxr) and saves the page.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from covidcxr import paths
from covidcxr.serving.app import ServiceSettings, create_app
from covidcxr.serving.live import LiveServer

DEFAULT_IMAGE = "images/figure1/covid/COVID-00001.jpg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("image", type=Path, nargs="?", default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/img/web.png"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    image = args.image or paths.data_root() / DEFAULT_IMAGE
    with tempfile.TemporaryDirectory() as tmp:
        # Audit rows of the screenshot request go to a throwaway database, not the run's log.
        app = create_app(args.run_dir, ServiceSettings(audit_db=f"sqlite:///{Path(tmp) / 'audit.sqlite'}"))
        with LiveServer(app) as live, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                        args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(live.url + "/")
            page.set_input_files("#file-input", str(image))
            page.wait_for_selector("body[data-state=done]", timeout=120_000)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
