"""The report page runs no script from a work directory (issue 22, items 1 and 2).

A work directory received from someone else is planted with markup in every place the page shows
(a column name and cells of selection.parquet, the manifest's name and a label, the area-curve
record); the page is opened as a file: URL in Debian's headless Chromium and its DOM after the
scripts ran is read back: the table renders, the markup is there as text, no planted element or
handler exists, and a planted script that escaping missed is still stopped by the page's
Content-Security-Policy. ``report --name`` reads no record from outside the work directory.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from gradlens.errors import GradlensError
from gradlens.report import CONTENT_SECURITY_POLICY, escape_html, json_for_script, write_report
from tests.test_hostile import one_sentence

PWN = "document.title='PWNED'"
HOSTILE_COLUMN = f'<img src=x onerror="{PWN}">'
HOSTILE_CELLS = ["<!--<script>", f"</script><script>{PWN}</script>", "line\u2028break\u2029end", "&amp;"]
HOSTILE_NAME = f"</title><script>{PWN}</script>"
HOSTILE_LABEL = f"<svg onload=\"{PWN}\">'b'\u2028"
HOSTILE_VERSION = "<!--<script>"
HOSTILE = [HOSTILE_COLUMN, *HOSTILE_CELLS, HOSTILE_NAME, HOSTILE_LABEL, "]]>", "\u2028", "'\"", "<\\/script>", ""]


# --- the escaping functions -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_html_escaping_leaves_no_markup(value):
    escaped = escape_html(value)
    assert not set("<>\"'") & set(escaped)  # safe as text and inside a quoted attribute
    assert html.unescape(escaped) == value  # and shown as exactly what the file holds


@pytest.mark.parametrize("value", [12, 0.5, None, True, ["<b>"], {"<k>": "</script>"}], ids=str)
def test_html_escaping_takes_any_value(value):
    escaped = escape_html(value)
    assert not set("<>\"'") & set(escaped) and html.unescape(escaped) == str(value)


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_json_in_a_script_element_cannot_end_it(value):
    data = {"columns": [value], "rows": [{value: value, "n": 1.5}], "sort": {"col": value, "asc": True}}
    text = json_for_script(data)
    assert not set("<>&\u2028\u2029") & set(text)  # no </script>, <!--, <script, entity or JS line break
    assert json.loads(text) == data  # the very same value comes back in the page


def test_lone_surrogates_do_not_break_the_page():
    assert escape_html("a\ud800b") == "a?b"
    assert json.loads(json_for_script(["a\ud800b"])) == ["a\ud800b"]


def test_the_policy_allows_only_the_page_itself():
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'none'" and directives["img-src"] == "'self'"
    assert directives["base-uri"] == "'none'" and directives["form-action"] == "'none'"
    assert re.fullmatch(r"'sha256-[A-Za-z0-9+/]{43}='", directives["script-src"])
    assert re.fullmatch(r"'sha256-[A-Za-z0-9+/]{43}='", directives["style-src"])
    assert "unsafe" not in CONTENT_SECURITY_POLICY and '"' not in CONTENT_SECURITY_POLICY


@pytest.mark.parametrize("planted", [HOSTILE_COLUMN, HOSTILE_NAME, "<!--<script>"], ids=["img", "script", "comment"])
def test_every_value_the_page_writes_as_html_is_escaped(planted):
    """Whatever a record holds where a number or a word belongs (every setting, the version, labels, the
    statistics tables), the HTML Python writes carries it as text: no element, comment or script from it."""
    from gradlens.report import _page

    manifest = {"name": planted, "models": [{"role": "a", "label": planted}, {"role": "b", "label": None}]}
    keys = ("num_images", "thresholds", "scale", "bootstrap", "confidence_level")
    meta = {"gradlens_version": planted, "settings": {k: planted for k in keys}}
    selection = pd.DataFrame({"rank": [1], "image_id": [7], planted: [planted], "panel": [None]})
    summary = pd.DataFrame({"role": [planted], "label": [planted], "metric": [planted], "mean": [planted],
                            "low": [0.1], "high": [[planted]], "num_images": [planted]})
    paired = pd.DataFrame({"role": [planted], "versus": [planted], "quantity": [planted], "difference": [planted],
                           "low": [0.1], "high": [0.2], "p_value": [planted], "num_images": [3]})
    page = _page(manifest, meta, selection, summary, paired, {7: "figure_a1_7.png"})
    assert planted not in page  # not once, raw
    assert page.count("<script") == 2 and page.count("<!--") == 0 and "<img src=x" not in page
    assert page.count(escape_html(planted)) >= 2 + len(keys)  # and shown, as text, wherever it stands


# --- a hostile work directory, through the real CLI ----------------------------------------------------------


def _cli(argv):
    from gradlens.cli.app import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        with pytest.raises(SystemExit) as done:
            main([str(a) for a in argv])
    assert done.value.code in (0, None), (argv, err.getvalue())


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A demo work directory after area-curve, then planted with markup everywhere the report shows, then reported."""
    from gradlens.demo import run_demo

    out = tmp_path_factory.mktemp("hostile_report")
    wd = run_demo(out, num_images=8, top=3, device="cpu", progress=False, workers=0, gradients=False).selection.workdir
    _cli(["area-curve", "--workdir", wd, "--device", "cpu", "--workers", 0, "--thresholds", 20, "--bootstrap", 100,
          "--no-progress"])
    selection = pd.read_parquet(wd / "selection.parquet")
    selection[HOSTILE_COLUMN] = [HOSTILE_CELLS[k % len(HOSTILE_CELLS)] for k in range(len(selection))]
    selection["note"] = [HOSTILE_CELLS[(k + 1) % len(HOSTILE_CELLS)] for k in range(len(selection))]
    selection.to_parquet(wd / "selection.parquet", index=False)
    manifest = json.loads((wd / "manifest.json").read_text())
    manifest["name"] = HOSTILE_NAME
    manifest["models"][1]["label"] = HOSTILE_LABEL
    (wd / "manifest.json").write_text(json.dumps(manifest))
    record = json.loads((wd / "area_curve.json").read_text())
    record["gradlens_version"] = HOSTILE_VERSION
    (wd / "area_curve.json").write_text(json.dumps(record))
    _cli(["report", "--workdir", wd, "--device", "cpu", "--workers", 0, "--thumbnails", 1, "--no-progress"])
    return wd, selection


def test_the_written_page_holds_no_markup_from_disk(hostile):
    wd, selection = hostile
    page = (wd / "report" / "index.html").read_text(encoding="utf-8")
    assert page.count("<script") == 2 and "<img src=x" not in page and "<svg" not in page  # only the page's own
    assert "innerHTML" not in page and not re.search(r"<[^>]*\son[a-z]+\s*=", page)  # no markup sink, no inline handler
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    styles = re.findall(r"<style>(.*?)</style>", page, re.S)
    policy = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', page).group(1)
    assert policy == CONTENT_SECURITY_POLICY and page.index(policy) < page.index("<style>")
    for text in scripts + styles:  # the hashes allow exactly the inline script and style the page holds
        assert "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'" in policy
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))
    assert {HOSTILE_COLUMN, "note"} <= set(data["columns"])
    assert [r[HOSTILE_COLUMN] for r in data["rows"]] == selection[HOSTILE_COLUMN].tolist()


# --- the page in headless Chromium ---------------------------------------------------------------------------


def _chromium() -> str:
    """Debian's Chromium: the report test's own finder, which installs it with apt-get if absent."""
    from tests.test_report import _chromium as find_or_install

    return find_or_install()


def _dump_dom(page: Path) -> str:
    """The page's DOM after its scripts ran, as headless Chromium serialises it (a fresh profile, no network)."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=2000", "--dump-dom", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=90, encoding="utf-8",
        )
    assert done.returncode == 0 and "<html" in done.stdout, done.stderr[-2000:]
    return done.stdout


class _Node:
    def __init__(self, tag: str, attrs, parent):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: str | None = None, **attrs):
        for c in self.children:
            if isinstance(c, _Node):
                if (tag is None or c.tag == tag) and all(c.attrs.get(k) == v for k, v in attrs.items()):
                    yield c
                yield from c.all(tag, **attrs)

    def one(self, tag: str | None = None, **attrs) -> "_Node":
        found = list(self.all(tag, **attrs))
        assert len(found) == 1, (tag, attrs, len(found))
        return found[0]


class _Tree(HTMLParser):
    """Chromium's serialised DOM as a small tree (the standard library has no DOM for HTML)."""

    VOID = {"meta", "img", "input", "br", "hr", "link", "source", "wbr", "area", "base", "col", "embed", "track"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = self.current = _Node("#document", [], None)
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = _Node(tag, attrs, self.current)
        self.current.children.append(node)
        if tag not in self.VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(_Node(tag, attrs, self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def _planted_everywhere(dom: _Node) -> None:
    """What no page may hold however its work directory was planted: an element or handler from disk, a new title."""
    assert not list(dom.all("img", src="x")) and not list(dom.all("svg"))
    assert len(list(dom.all("script"))) >= 2
    for node in dom.all():
        assert not any(k.startswith("on") for k in node.attrs), (node.tag, node.attrs)
    assert dom.one("title").text() == f"gradlens report: {HOSTILE_NAME}"  # the name, as text; not PWNED


def test_planted_markup_is_shown_as_text_and_runs_nothing(hostile):
    wd, selection = hostile
    dom = _Tree(_dump_dom(wd / "report" / "index.html")).root
    # the page's own script ran (the counter) and built the whole table
    assert dom.one("span", id="shown").text() == f"{len(selection)} of {len(selection)} images"
    table = dom.one("table", id="selection")
    heads = [th.text() for th in table.all("th")]
    assert HOSTILE_COLUMN in heads and "note" in heads and heads[:2] == ["rank", "image_id"]
    assert [th.attrs["data-col"] for th in table.all("th")] == heads
    rows = list(next(table.all("tbody")).all("tr"))
    assert [int(r.attrs["data-image"]) for r in rows] == selection["image_id"].tolist()
    column = heads.index(HOSTILE_COLUMN)
    for row, expected in zip(rows, selection[HOSTILE_COLUMN]):
        assert list(row.all("td"))[column].text() == expected  # "<!--<script>", "&amp;", U+2028...: exactly as stored
    link = dom.one("a", **{"class": "open"})  # the one panel drawn, linked from its image id
    assert link.attrs["data-panel"] == f"figure_a1_{selection['image_id'].iloc[0]}.png"
    # HTML text written by Python: the label, the record's version
    summary = next(p for p in dom.all("p") if p.text().startswith("Models:")).text()
    assert f"b: {HOSTILE_LABEL}" in summary and f"Created by gradlens {HOSTILE_VERSION}." in summary
    _planted_everywhere(dom)


def test_the_policy_stops_a_script_that_escaping_missed(hostile, tmp_path):
    """Defence in depth: the same page with markup written into it unescaped (as a bug would) runs none of it."""
    wd, selection = hostile
    shutil.copytree(wd / "report", tmp_path / "report")
    page = tmp_path / "report" / "index.html"
    text = page.read_text(encoding="utf-8")
    injected = (f'<script>{PWN}</script><img id="planted" src="x" onerror="{PWN}">'
                f'<p id="styled" style="display: none">shown</p>')
    page.write_text(text.replace('<h1>gradlens report</h1>', '<h1>gradlens report</h1>' + injected), encoding="utf-8")
    dom = _Tree(_dump_dom(page)).root
    assert dom.one("title").text() == f"gradlens report: {HOSTILE_NAME}"  # neither the script nor the handler ran
    assert dom.one("img", id="planted")  # (the element is there: only the policy stopped its handler)
    assert dom.one("span", id="shown").text() == f"{len(selection)} of {len(selection)} images"  # the page's own did


def test_the_page_works_under_its_policy_in_chromium(hostile):
    """Images beside the page load under img-src 'self' from a file: URL, the style applies, sorting by a planted
    column and filtering by planted text work, the panel opens, and the browser reports no violation or error."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency: pip install -e '.[test]'")
    wd, selection = hostile
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            problems = []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto((wd / "report" / "index.html").as_uri())
            page.wait_for_load_state("load")
            assert page.evaluate("() => [...document.images].filter(i => i.getAttribute('src')).every("
                                 "i => i.complete && i.naturalWidth > 0)")
            assert page.evaluate("() => getComputedStyle(document.getElementById('viewer')).display") == "none"
            page.evaluate("c => [...document.querySelectorAll('#selection th')].find(th => th.dataset.col === c).click()",
                          HOSTILE_COLUMN)
            order = page.evaluate("() => [...document.querySelectorAll('#selection tbody tr')].map(r => +r.dataset.image)")
            assert order == selection.sort_values([HOSTILE_COLUMN, "rank"])["image_id"].tolist()
            page.fill("#filter", "<!--<script>")
            shown = page.evaluate("() => [...document.querySelectorAll('#selection tbody tr')].map(r => +r.dataset.image)")
            expected = selection[(selection[HOSTILE_COLUMN] == "<!--<script>") | (selection["note"] == "<!--<script>")]
            assert sorted(shown) == sorted(expected["image_id"].tolist()) and shown
            page.fill("#filter", "")
            page.click("#selection a.open")
            page.wait_for_function("() => document.getElementById('viewer-img').complete")
            assert page.evaluate("() => document.getElementById('viewer-img').naturalWidth") > 100
            assert page.title() == f"gradlens report: {HOSTILE_NAME}"
            assert problems == []
        finally:
            browser.close()


# --- report --name -------------------------------------------------------------------------------------------

BAD_NAMES = ["../outside", "/tmp/outside", "sub/area_curve", "..", ".hidden", "a\\b", ""]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_report_reads_no_record_from_outside_the_work_directory(hostile, name, capsys):
    wd, _ = hostile
    outside = wd.parent / "outside.json"  # a record beside the work directory that must never be read
    shutil.copyfile(wd / "area_curve.json", outside)
    before = {p: p.stat().st_mtime_ns for p in (wd / "report").rglob("*")}
    line = one_sentence(capsys, ["report", "--workdir", wd, "--name", name, "--device", "cpu", "--workers", 0])
    assert "must be a plain file stem" in line
    with pytest.raises(GradlensError, match="plain file stem"):
        write_report(wd, out_dir=wd.parent / "never", name=name, thumbnails=0)
    assert not (wd.parent / "never").exists()
    assert {p: p.stat().st_mtime_ns for p in (wd / "report").rglob("*")} == before


@pytest.mark.parametrize(
    "plant, says",
    [
        (lambda s, path: s.drop(columns=["image_id"]).to_parquet(path), "has no column 'image_id'"),
        (lambda s, path: s.assign(image_id=["<b>"] * len(s)).to_parquet(path), "has an image_id '<b>' that is not an integer"),
        (lambda s, path: s.assign(image_id=[[1, 2]] * len(s)).to_parquet(path), "that is not an integer"),
        (lambda s, path: path.write_bytes(b"PAR1 not a table"), "Cannot read table 'selection'"),
    ],
    ids=["no image ids", "image id text", "image id a list", "not Parquet"],
)
def test_a_selection_the_page_cannot_show_is_one_sentence(hostile, tmp_path, plant, says, capsys):
    wd, selection = hostile
    copy = tmp_path / "wd"
    shutil.copytree(wd, copy, ignore=shutil.ignore_patterns("maps", "report", "figures"))
    plant(selection, copy / "selection.parquet")
    line = one_sentence(capsys, ["report", "--workdir", copy, "--device", "cpu", "--workers", 0, "--thumbnails", 0])
    assert says in line
    assert not (copy / "report").exists()  # refused before anything is written
