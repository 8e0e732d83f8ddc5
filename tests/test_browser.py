"""End to end in real headless Chromium: open the page, upload a real X-ray, see overlay + probabilities."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serving_helpers import sample_paths, serving_run


CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    from covidcxr.serving.app import ServiceSettings, create_app
    from covidcxr.serving.live import LiveServer

    run_dir = serving_run(request, tmp_path_factory)
    app = create_app(run_dir, ServiceSettings())
    with LiveServer(app) as live:
        yield live.url, run_dir


def _chromium_path() -> str:
    path = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if path is None:
        pytest.fail("Chromium not found: install Debian's `chromium` package (scripts/test.sh does in CI)")
    return path


def test_page_upload_shows_overlay_probabilities_and_metrics(server, data_root, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from covidcxr.models.run import load_run

    url, run_dir = server
    run = load_run(run_dir)
    image = sample_paths(data_root, 1)[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url + "/")
            expect(page.locator("#disclaimer")).to_contain_text("not a medical device")
            expect(page.locator("#model-id")).to_contain_text(run.model_sha256)
            page.set_input_files("#file-input", str(image))
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            rows = page.locator("#probabilities tbody tr")
            expect(rows).to_have_count(len(run.classes))
            shown = {rows.nth(i).get_attribute("data-class"): float(rows.nth(i).locator("td").nth(1).inner_text())
                     for i in range(len(run.classes))}
            from covidcxr.data import read_xray

            expected = run.predict_arrays([read_xray(image).pixels])[0]
            for cls, p_expected in zip(run.classes, expected):
                assert abs(shown[cls] - p_expected) < 1e-3
            expect(page.locator("#verdict")).to_contain_text(run.decide(expected[None])[0])
            # both layers decoded by the browser, stacked at the same size
            sizes = page.evaluate("""() => ['xray', 'heat'].map(id => {
                const img = document.getElementById(id); const r = img.getBoundingClientRect();
                return [img.complete, img.naturalWidth, Math.round(r.width), Math.round(r.height)]; })""")
            assert all(s[0] and s[1] > 0 for s in sizes) and sizes[0][2:] == sizes[1][2:]
            page.locator("#opacity").fill("75")
            assert page.eval_on_selector("#heat", "el => getComputedStyle(el).opacity") == "0.75"
            shot = page.screenshot(path=str(tmp_path / "web.png"), full_page=True)
            assert len(shot) > 20_000
            # a bad file shows the server's message and the page keeps working
            bad = tmp_path / "notes.png"
            bad.write_text("not an image")
            page.set_input_files("#file-input", str(bad))
            expect(page.locator("#status")).to_contain_text("text file")
            assert not errors, errors
        finally:
            browser.close()
