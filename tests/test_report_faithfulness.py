"""gradlens report's Faithfulness section: what a faithfulness record adds to the page, and what it may not.

One small demo work directory, with ``gradlens faithfulness --randomise`` run on it, is reported; copies of it
(without maps: the page is drawn with ``--thumbnails 0``) lose the record, have a table changed behind the
record's back, or are planted with markup in the record's sentences and its tables' labels.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from gradlens.fileio import sha256_file
from gradlens.report import CONTENT_SECURITY_POLICY, escape_html
from tests.test_hostile import one_sentence
from tests.test_report import _chromium

SECTION = '<h2 id="faithfulness">Faithfulness: does each detector need its important region?</h2>'
PWN = "document.title='PWNED'"
HOSTILE_SENTENCE = f"<img src=x onerror=alert(1)> and </script><script>{PWN}</script>"
HOSTILE_FLAG = f'<svg onload="{PWN}"> flagged <!--'
HOSTILE_LABEL = f"<img src=x onerror=\"{PWN}\">'b'"


def _report(wd, *extra):
    from tests.test_report_security import _cli

    _cli(["report", "--workdir", wd, "--device", "cpu", "--workers", 0, "--no-progress", *extra])
    return (wd / "report" / "index.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def faithful(tmp_path_factory):
    """A demo work directory after area-curve, faithfulness (with the randomisation check) and report."""
    from gradlens.demo import run_demo
    from gradlens.faithfulness.run import run_faithfulness
    from gradlens.runner import DetectorRun

    out = tmp_path_factory.mktemp("report_faithfulness")
    wd = run_demo(out, num_images=24, top=8, device="cpu", progress=False, workers=0, gallery=1,
                  faithfulness=False).selection.workdir
    run_faithfulness(wd, fractions=(0, 0.05, 0.2), bootstrap=100, randomise=True,
                     detector_run=DetectorRun.recorded(wd, device="cpu", workers=0), progress=False)
    _report(wd, "--thumbnails", 1)
    return wd


def _copy(wd, target):
    """The work directory without its maps, stored results or report (the page is drawn with --thumbnails 0)."""
    shutil.copytree(wd, target, ignore=shutil.ignore_patterns("maps", "report", "figures", "faithfulness"))
    return target


def _section(page: str) -> str:
    start = page.index(SECTION)
    return page[start:page.index("<h2>Selection</h2>", start)]


def test_the_section_shows_the_record(faithful):
    page = (faithful / "report" / "index.html").read_text(encoding="utf-8")
    record = json.loads((faithful / "faithfulness.json").read_text())
    assert page.count(SECTION) == 1
    # after Figure A2 and its companion, before the selection table
    assert page.index('src="figure_a2.png"') < page.index('src="mass_area.png"') < page.index(SECTION)
    assert page.index(SECTION) < page.index("<h2>Selection</h2>") < page.index('id="selection"')
    section = _section(page)
    assert record["sentences"] and len(record["sentences"]) == len(record["models"])
    for sentence in record["sentences"]:
        assert f'<p class="verdict">{escape_html(sentence)}</p>' in section
    for flag in record["flags"]:
        assert f'<p class="flag"><strong>Randomisation check:</strong> {escape_html(flag)}</p>' in section
    if not record["flags"]:
        assert "Randomisation check: no model" in section
    # the figures, beside the page and the very files the record lists
    for source, copy in (("faithfulness.png", "faithfulness.png"),
                         ("faithfulness_randomisation.png", "faithfulness_randomisation.png")):
        assert source in record["outputs"]["figure"] and f'src="{copy}"' in section
        assert sha256_file(faithful / "report" / copy) == record["sha256"][source]
    # every area row (q missing) with its numbers; no row at a single q
    paired = pd.read_parquet(faithful / "faithfulness_paired.parquet")
    areas = paired[paired["q"].isna()]
    assert len(areas) and len(areas) < len(paired)
    table = section[section.index("<h3>Areas under the curves"):section.index("<h3>Model-parameter randomisation")]
    body = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>", 1)[1], re.S)
    assert len(body) == len(areas)
    for cells, row in zip(body, areas.itertuples(index=False)):
        cells = re.findall(r"<td>(.*?)</td>", cells)
        assert cells[0] == row.comparison and cells[1] == f"{row.label} ({row.role})"
        assert cells[2] == ("random order" if row.comparison == "map - random" else f"{row.versus_label} ({row.versus})")
        assert cells[3:6] == [row.mode, row.order, row.metric]
        assert cells[6] == f"{row.estimate:.4f}" and cells[7] == f"[{row.low:.4f}, {row.high:.4f}]"
        assert cells[8] == f"{row.p_value:.3g}" and cells[9] == str(row.num_images)
    # the randomisation summary, folded
    summary = pd.read_parquet(faithful / "faithfulness_randomisation_summary.parquet")
    folded = section[section.index("<details>"):section.index("</details>")]
    assert len(re.findall(r"<tr><td>", folded)) == len(summary)
    assert f"{summary['spearman_median'].iloc[0]:.4f}" in folded
    # the page's own style and script only, allowed by their hashes
    policy = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', page).group(1)
    assert policy == CONTENT_SECURITY_POLICY
    for text in re.findall(r"<style>(.*?)</style>", page, re.S) + re.findall(r"<script>(.*?)</script>", page, re.S):
        assert "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'" in policy


def test_without_a_record_the_page_is_as_before(faithful, tmp_path):
    with_record = _report(_copy(faithful, tmp_path / "with"), "--thumbnails", 0)
    bare = _copy(faithful, tmp_path / "without")
    (bare / "faithfulness.json").unlink()
    without = _report(bare, "--thumbnails", 0)
    assert "Faithfulness" not in without and "faithfulness" not in without and "class=\"flag\"" not in without
    assert not (bare / "report" / "faithfulness.png").exists()
    assert with_record.replace(_section(with_record), "") == without  # the section is all the record adds


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda wd: (wd / "faithfulness_curves.csv").open("a").write("a,x,deletion,map,0.5,1,1,1,1,1,1,3\n"),
         "(faithfulness_curves.csv was written by another run or changed since); run 'gradlens faithfulness' again."),
        (lambda wd: (wd / "faithfulness_paired.parquet").unlink(), "(faithfulness_paired.parquet is missing)"),
        (lambda wd: (wd / "faithfulness.json").write_text('{"sentences": "<b>"}'), "sentences is '<b>'"),
    ],
    ids=["table changed", "table missing", "record mistyped"],
)
def test_a_damaged_record_refuses_the_page_in_one_sentence(faithful, tmp_path, damage, says, capsys):
    """As for a damaged area-curve record: one sentence, exit code 1, no traceback, nothing written."""
    wd = _copy(faithful, tmp_path / "wd")
    damage(wd)
    line = one_sentence(capsys, ["report", "--workdir", wd, "--device", "cpu", "--workers", 0, "--thumbnails", 0])
    assert says in line
    assert not (wd / "report").exists()


@pytest.fixture(scope="module")
def hostile(faithful, tmp_path_factory):
    """A copy whose record and tables (their hashes recomputed, as anyone can) carry markup everywhere shown."""
    wd = _copy(faithful, tmp_path_factory.mktemp("hostile_faithfulness") / "wd")
    record = json.loads((wd / "faithfulness.json").read_text())
    record["sentences"] = [HOSTILE_SENTENCE, *record["sentences"][1:]]
    record["flags"] = [HOSTILE_FLAG]
    # (settings.fill and settings.fractions holding markup are refused when the record is read: test_faithfulness)
    for stem in ("faithfulness_paired", "faithfulness_randomisation_summary"):
        table = pd.read_parquet(wd / f"{stem}.parquet")
        table["label"] = HOSTILE_LABEL
        if "versus_label" in table:
            table["versus_label"] = HOSTILE_LABEL
            table["comparison"] = table["comparison"].astype(object)
            table.loc[table.index[-1], "comparison"] = HOSTILE_SENTENCE
        table.to_parquet(wd / f"{stem}.parquet", index=False)
        table.to_csv(wd / f"{stem}.csv", index=False)
        for file in (f"{stem}.parquet", f"{stem}.csv"):
            record["sha256"][file] = sha256_file(wd / file)
    (wd / "faithfulness.json").write_text(json.dumps(record))
    page = _report(wd, "--thumbnails", 0)
    return wd, page


def test_planted_markup_is_text_in_the_html(hostile):
    wd, page = hostile
    for planted in (HOSTILE_SENTENCE, HOSTILE_FLAG, HOSTILE_LABEL):
        assert planted not in page and escape_html(planted) in page
    assert "<img src=x" not in page and "<svg" not in page and page.count("<script") == 2
    assert page.count("<!--") == 0 and not re.search(r"<[^>]*\son[a-z]+\s*=", page)
    section = _section(page)
    assert f'<p class="verdict">{escape_html(HOSTILE_SENTENCE)}</p>' in section
    assert f'<p class="flag"><strong>Randomisation check:</strong> {escape_html(HOSTILE_FLAG)}</p>' in section
    assert f"<td>{escape_html(HOSTILE_LABEL)} (a)</td>" in section  # the model column of the area table
    assert f"<td>{escape_html(HOSTILE_LABEL)}</td>" in section  # the randomisation summary's label column


def test_planted_markup_runs_nothing_in_chromium(hostile):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency: pip install -e '.[test]'")
    wd, _ = hostile
    browser_path = _chromium()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            dialogs, problems = [], []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto((wd / "report" / "index.html").as_uri())
            page.wait_for_load_state("load")
            page.wait_for_timeout(300)
            assert dialogs == [] and "PWNED" not in page.title()
            assert page.locator("img[src=x]").count() == 0 and page.locator("svg").count() == 0
            assert page.evaluate("() => [...document.querySelectorAll('*')].every("
                                 "n => ![...n.attributes].some(a => a.name.startsWith('on')))")
            verdicts = page.locator("#faithfulness ~ p.verdict").all_inner_texts()
            assert HOSTILE_SENTENCE in verdicts  # shown as exactly what the record holds
            assert page.locator("p.flag").all_inner_texts() == [f"Randomisation check: {HOSTILE_FLAG}"]
            for src in ("faithfulness.png", "faithfulness_randomisation.png"):  # beside the page, loaded under img-src 'self'
                assert page.evaluate("s => [...document.images].some(i => i.getAttribute('src') === s "
                                     "&& i.complete && i.naturalWidth > 0)", src)
            assert page.evaluate("() => getComputedStyle(document.querySelector('p.flag')).borderLeftStyle") == "solid"
            assert page.locator("#shown").inner_text().endswith("images")  # the page's own script ran
            assert problems == []
        finally:
            browser.close()


def test_area_rows_of_a_hand_made_table_are_escaped_and_formatted():
    """The area table straight from _page's helper: NaN q only, numbers formatted, anything else as text."""
    from gradlens.report import _faithfulness_html

    paired = pd.DataFrame({
        "comparison": ["map - random", "a - baseline", "map - random"], "role": ["a", "a", "b"],
        "label": ["<b>x</b>", "x", None], "versus": ["a", "b", "b"], "versus_label": ["<b>x</b>", "<i>y</i>", None],
        "mode": ["deletion"] * 3, "order": ["map"] * 3, "metric": ["quality"] * 3, "q": [np.nan, np.nan, 0.1],
        "estimate": [-0.25, "<u>", 0.5], "low": [-0.5, 0.1, 0.0], "high": [np.nan, "<s>", 1.0],
        "p_value": [0.0123, np.nan, 0.5], "num_images": [8, 8, 8],
    })  # fmt: skip
    html_text = _faithfulness_html({"record": {"sentences": [], "flags": [], "settings": {}}, "paired": paired})
    rows = re.findall(r"<tr>(.*?)</tr>", html_text.split("<tbody>", 1)[1])
    assert len(rows) == 2 and "<b>" not in html_text and "<u>" not in html_text
    assert re.findall(r"<td>(.*?)</td>", rows[0]) == ["map - random", "&lt;b&gt;x&lt;/b&gt; (a)", "random order", "deletion",
                                                      "map", "quality", "-0.2500", "[-0.5000, ]", "0.0123", "8"]
    assert re.findall(r"<td>(.*?)</td>", rows[1])[1:3] == ["x (a)", "&lt;i&gt;y&lt;/i&gt; (b)"]
    assert "<td>&lt;u&gt;</td>" in rows[1] and "[0.1000, &lt;s&gt;]" in rows[1]
    assert "No randomisation check" in html_text and "(no sentences in the faithfulness record)" in html_text


def test_odd_values_in_a_rehashed_table_are_text(faithful, tmp_path):
    """Lists where words and numbers belong, in a table whose hash was recomputed: shown as text, no traceback."""
    wd = _copy(faithful, tmp_path / "wd")
    paired = pd.read_parquet(wd / "faithfulness_paired.parquet")
    for column in ("comparison", "label", "estimate", "low"):
        paired[column] = [["<b>", "1"]] * len(paired)
    paired.to_parquet(wd / "faithfulness_paired.parquet", index=False)
    record = json.loads((wd / "faithfulness.json").read_text())
    record["sha256"]["faithfulness_paired.parquet"] = sha256_file(wd / "faithfulness_paired.parquet")
    (wd / "faithfulness.json").write_text(json.dumps(record))
    section = _section(_report(wd, "--thumbnails", 0))
    assert "<b>" not in section and "&lt;b&gt;" in section  # each list as text, whatever its repr
    assert section.count("<td>random order</td>") == 0  # a list is no comparison, so versus is the model
