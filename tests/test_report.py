"""gradlens report: the page's files, and the page itself in a real headless Chromium (loads, sorts, filters, opens)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pandas as pd
import pytest

from gradlens.demo import run_demo
from tests.test_detector_cli import run


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """A demo work directory after area-curve and report."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("report")
    wd = run_demo(out, num_images=16, top=6, device="cpu", progress=False, workers=0, gradients=False).selection.workdir
    from gradlens.cli.app import main

    for argv in (["area-curve", "--workdir", str(wd), "--device", "cpu", "--workers", "0", "--thresholds", "40",
                  "--bootstrap", "200", "--no-progress"],
                 ["report", "--workdir", str(wd), "--device", "cpu", "--workers", "0", "--no-progress"]):
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code in (0, None), argv
    return wd


def test_the_page_and_its_pictures(report_dir):
    page = (report_dir / "report" / "index.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))
    selection = pd.read_csv(report_dir / "selection.csv")
    assert [r["image_id"] for r in data["rows"]] == selection["image_id"].tolist()
    assert {"quality_a", "quality_b", "improvement", "box_energy_a", "box_energy_b"} <= set(data["columns"])
    linked = [r for r in data["rows"] if r["panel"]]
    assert [r["image_id"] for r in linked] == selection["image_id"].tolist()  # every selected image has its panel
    for r in linked:
        assert (report_dir / "report" / "panels" / r["panel"]).is_file() and (report_dir / "report" / "thumbs" / r["panel"]).is_file()
        assert f'src="thumbs/{r["panel"]}"' in page
    assert (report_dir / "report" / "figure_a2.png").is_file()
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network


def test_report_needs_an_area_curve_first(tmp_path, capsys):
    wd = run_demo(tmp_path, num_images=8, top=3, device="cpu", progress=False, workers=0, gradients=False).selection.workdir
    shutil.rmtree(wd / "maps", ignore_errors=True)
    code, out, err = run(["report", "--workdir", wd, "--device", "cpu"], capsys)
    assert code == 1 and "run 'gradlens area-curve" in err


def _chromium() -> str:
    """Debian's Chromium, installed here if absent (the tests' own setup); skips with the reason if it cannot be."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("no Chromium, and no apt-get run as root to install it (Debian: apt-get install chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"Chromium could not be installed ({' '.join(cmd)}: {done.stderr.strip()[-200:]})")
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("apt-get installed chromium, but no chromium command is on the PATH")
    return path


def test_the_page_in_headless_chromium(report_dir):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency: pip install -e '.[test]'")
    browser_path = _chromium()
    selection = pd.read_csv(report_dir / "selection.csv")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            problems = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto((report_dir / "report" / "index.html").as_uri())
            page.wait_for_load_state("load")
            rows = page.locator("#selection tbody tr")
            assert rows.count() == len(selection)

            def order():
                return [int(v) for v in rows.evaluate_all("rs => rs.map(r => r.dataset.image)")]

            assert order() == selection["image_id"].tolist()  # best first, as selected
            page.click("#selection th[data-col=improvement]")
            assert order() == selection.sort_values(["improvement", "rank"])["image_id"].tolist()
            page.click("#selection th[data-col=improvement]")
            assert order() == selection.sort_values("improvement", ascending=False, kind="stable")["image_id"].tolist()
            page.click("#selection th[data-col=quality_b]")
            assert order() == selection.sort_values(["quality_b", "rank"])["image_id"].tolist()

            one = str(selection["image_id"].iloc[2])
            page.fill("#filter", one)
            assert one in [str(i) for i in order()] and rows.count() < len(selection)
            page.fill("#filter", "miss")  # the filter matches what the cells show (pointing game: hit / miss)
            metrics = pd.read_csv(report_dir / "metrics.csv")
            misses = set(metrics.loc[metrics["pointing_game"] == 0, "image_id"])
            assert set(order()) == misses
            page.fill("#filter", "")
            assert rows.count() == len(selection)

            thumbs = page.locator("#thumbs img")
            assert thumbs.count() == len(selection)
            for k in range(len(selection)):  # every thumbnail opens its full panel, and the panel loads
                name = thumbs.nth(k).get_attribute("data-panel")
                thumbs.nth(k).click()
                viewer = page.locator("#viewer")
                assert "open" in viewer.get_attribute("class")
                page.wait_for_function("() => document.getElementById('viewer-img').complete")
                assert page.locator("#viewer-img").get_attribute("src") == f"panels/{name}"
                assert page.evaluate("() => document.getElementById('viewer-img').naturalWidth") > 100
                page.keyboard.press("Escape")
                assert "open" not in (viewer.get_attribute("class") or "")
            links = page.locator("#selection a.open")
            assert links.count() == len(selection)  # every selected image is linked from the table
            for k in (0, len(selection) - 1):
                links.nth(k).click()
                image_id = links.nth(k).inner_text()
                assert page.locator("#viewer-img").get_attribute("src") == f"panels/figure_a1_{image_id}.png"
                page.keyboard.press("Escape")
            assert page.evaluate("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
            assert problems == []
        finally:
            browser.close()
