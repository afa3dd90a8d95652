"""``gradlens report``: one self-contained HTML page per work directory, to browse a selection.

The page needs no server and no network: styles and script are inline, the
tables are embedded as JSON, and the pictures sit beside it in ``report/``
(Figure A2, and per selected image a thumbnail and the full Figure A1 panel).
What it shows: first the verdict (is A's difference from each baseline one
of gradient scale or of focus), then Figure A2 with its bootstrap bands and
the paired difference, its companion (mass-area curves and the split of the
difference into scale and focus), each image's scale ratio against its
quality improvement, the decomposition with intervals, the per-image scale
and concentration table, the metrics summary with intervals, A minus each
baseline with Wilcoxon p-values, the selection as a sortable, filterable
table (each model's quality, the improvement, each model's box energy and
pointing-game hit) and the Figure A1 thumbnails, each opening its full panel.
When ``gradlens faithfulness`` has run, a section before the selection says
whether each detector needs the region its own map ranks first (its sentences,
any randomisation-check flags, its figure and the areas under its deletion and
insertion curves, paired against a random order and across models).

Everything the page shows comes from files anyone can edit or send (a work
directory received from someone else), so no value from disk is ever trusted
as markup: HTML text and attributes are escaped with :func:`escape_html`, the
embedded tables with :func:`json_for_script` (``<``, ``>``, ``&``, U+2028 and
U+2029 as ``\\uXXXX``), the page's script builds the table and the viewer with
DOM methods and ``textContent`` only (no ``innerHTML``, no inline handlers),
and a Content-Security-Policy lets run only the page's own inline script and
style (by their SHA-256 hashes) and load only images (``img-src 'self'``:
the pictures beside the page, also when it is opened as a ``file:`` URL).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gradlens.errors import GradlensError, InputFileError
from gradlens.fileio import atomic_path, check_output_name, image_id_column, read_table, short_repr
from gradlens.regions.record import record_table

THUMBNAIL_WIDTH = 360
PANEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.png")  # a plain file name in panels/ (no folder, no URL)


@dataclass
class Report:
    page: Path
    images: int  # rows of the selection table
    thumbnails: int


def escape_html(value) -> str:
    """Any value from disk as HTML text or a quoted attribute value (``& < > " '`` escaped).

    Not only strings: a number in a hostile file may be a string, so every value goes through here;
    a lone surrogate (text no UTF-8 page can hold) becomes ``?``.
    """
    text = value if isinstance(value, str) else str(value)
    return html.escape(text.encode("utf-8", "replace").decode("utf-8"), quote=True)


_JSON_IN_SCRIPT = {"&": "\\u0026", "<": "\\u003c", ">": "\\u003e", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def json_for_script(obj) -> str:
    """``obj`` as JSON that can stand inside ``<script type="application/json">`` whatever its strings hold.

    ``<``, ``>`` and ``&`` (so no ``</script>``, ``<!--`` or ``<script`` can change how the HTML parser
    ends the element) and U+2028/U+2029 are written as ``\\uXXXX`` escapes; outside strings JSON has
    none of these characters, so the text parses back to the very same value.
    """
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False)
    return re.sub("[&<>\u2028\u2029]", lambda m: _JSON_IN_SCRIPT[m.group(0)], text)


def _require_columns(table: pd.DataFrame, columns: tuple[str, ...], what: str, again: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputFileError(f"{what} has no column {missing[0]!r}; {again}.")


def _selection_rows(workdir: Path, models: list[dict], metrics: pd.DataFrame | None) -> pd.DataFrame:
    selection = read_table(workdir, "selection").copy()
    what, again = f"The selection table in {workdir}", "run 'gradlens select' again"
    selection.columns = [str(c) for c in selection.columns]
    twice = selection.columns[selection.columns.duplicated()]
    if len(twice):
        raise InputFileError(f"{what} has the column {short_repr(twice[0])} twice; {again}.")
    _require_columns(selection, ("image_id",), what, again)
    selection["image_id"] = image_id_column(selection, what)
    selection = selection.drop(columns=["panel"], errors="ignore")  # the page's own column, never one from disk
    if "rank" not in selection:
        selection.insert(0, "rank", np.arange(1, len(selection) + 1))
    if metrics is not None and len(metrics):
        what, again = f"The metrics table in {workdir}", "run 'gradlens area-curve' again"
        _require_columns(metrics, ("role", "image_id"), what, again)
        for role in [m["role"] for m in models]:
            mine = metrics[metrics["role"] == role].set_index("image_id")
            if mine.index.duplicated().any():
                raise InputFileError(f"{what} lists image {short_repr(mine.index[mine.index.duplicated()][0])} "
                                     f"twice for model {role}; {again}.")
            for column in ("box_energy", "pointing_game"):
                selection[f"{column}_{role}"] = selection["image_id"].map(mine[column]) if column in mine else np.nan
    return selection


def _per_image_scale(concentration: pd.DataFrame, selection: pd.DataFrame, models: list[dict]) -> pd.DataFrame:
    """Per image and baseline: A's mean magnitude over the baseline's, and A's quality improvement."""
    if not len(concentration) or "improvement" not in selection or not models:
        return pd.DataFrame()
    scales = {role: rows.drop_duplicates("image_id").set_index("image_id")["scale_mean"]
              for role, rows in concentration.groupby("role", sort=False)}
    a = models[0]["role"]
    if a not in scales:
        return pd.DataFrame()
    improvement = pd.to_numeric(selection.set_index("image_id")["improvement"], errors="coerce")
    frames = []
    for m in models[1:]:
        if m["role"] not in scales:
            continue
        ids = improvement.index
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = pd.to_numeric(scales[a].reindex(ids), errors="coerce") / pd.to_numeric(scales[m["role"]].reindex(ids), errors="coerce")
        frames.append(pd.DataFrame({"image_id": ids, "improvement": improvement.to_numpy(dtype=np.float64),
                                    "scale_ratio": ratio.to_numpy(dtype=np.float64),
                                    "versus_label": str(m.get("label") or m["role"])}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _concentration_view(concentration: pd.DataFrame, models: list[dict]) -> pd.DataFrame:
    """One row per image: each model's scale (mean, max, loss) and concentration, side by side."""
    if not len(concentration):
        return concentration
    columns = ["scale_mean", "map_max", "loss", "gini", "effective_area", "mass_area_50", "mass_area_90"]
    view = None
    for m in models:
        rows = concentration[concentration["role"] == m["role"]].drop_duplicates("image_id")
        mine = rows[["image_id"] + columns].rename(columns={c: f"{c}_{m['role']}" for c in columns})
        view = mine if view is None else view.merge(mine, on="image_id", how="outer", sort=False)
    if view is None:
        return pd.DataFrame()
    a = models[0]["role"]
    for m in models[1:]:
        if f"scale_mean_{m['role']}" in view:
            with np.errstate(divide="ignore", invalid="ignore"):
                view[f"scale_ratio_{a}/{m['role']}"] = (pd.to_numeric(view[f"scale_mean_{a}"], errors="coerce")
                                                        / pd.to_numeric(view[f"scale_mean_{m['role']}"], errors="coerce"))
    return view


def _records(table: pd.DataFrame, what: str) -> list[dict]:
    """Rows as JSON-ready dicts (NaN and infinities -> null, numpy scalars -> Python)."""
    try:
        return json.loads(table.to_json(orient="records", double_precision=6, date_format="iso"))
    except (ValueError, TypeError, OverflowError, UnicodeError) as exc:
        raise InputFileError(f"{what} holds a value the report cannot show ({type(exc).__name__}).") from None


def _thumbnail(source: Path, target: Path) -> None:
    from PIL import Image

    with Image.open(source) as img:
        img = img.convert("RGB")
        scale = THUMBNAIL_WIDTH / img.width
        img = img.resize((THUMBNAIL_WIDTH, max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
        with atomic_path(target) as tmp:
            img.save(tmp, format="PNG", optimize=True)


FAITHFULNESS_PAIRED = ("comparison", "role", "label", "versus", "versus_label", "mode", "order", "metric", "q",
                       "estimate", "low", "high", "p_value", "num_images")
FAITHFULNESS_RANDOMISATION = ("role", "label", "step", "randomised", "spearman_median", "spearman_q25", "spearman_q75",
                              "ssim_median", "ssim_q25", "ssim_q75", "num_images")


def _faithfulness_tables(workdir: Path, name: str = "faithfulness") -> dict:
    """The faithfulness record of ``workdir`` and what the page shows of it, read before anything is written:
    ``{}`` without a record; a record whose fields or files do not check out, or a table without the columns
    the page shows, is one sentence (:class:`~gradlens.errors.InputFileError`), as for the area-curve record."""
    from gradlens.faithfulness.run import load_faithfulness_record  # typed, and its files checked by SHA-256

    record = load_faithfulness_record(workdir, name, missing_ok=True)
    if not record:
        return {}
    outputs = record.get("outputs", {})
    again = "run 'gradlens faithfulness" + ("" if name == "faithfulness" else f" --name {name}") + "' again"

    def table(key: str, columns: tuple[str, ...], what: str) -> pd.DataFrame:
        file = outputs.get(key)
        if not isinstance(file, str):
            return pd.DataFrame()
        if not (workdir / file).is_file():
            raise InputFileError(f"The {what} {workdir / file} named by {workdir / f'{name}.json'} is missing; {again}.")
        found = record_table(workdir, record, file)  # the exact Parquet copy when the record hashes it, else the CSV
        found.columns = [str(c) for c in found.columns]
        twice = found.columns[found.columns.duplicated()]
        if len(twice):
            raise InputFileError(f"The {what} {workdir / file} has the column {short_repr(twice[0])} twice; {again}.")
        if len(found):
            _require_columns(found, columns, f"The {what} {workdir / file}", again)
        return found

    figures = outputs.get("figure", [])
    figures = figures if isinstance(figures, list) else [figures]
    shown = {}  # file in the work directory -> its copy beside the page
    for source, target in ((f"{name}.png", "faithfulness.png"), (f"{name}_randomisation.png", "faithfulness_randomisation.png")):
        if source in figures and (workdir / source).is_file():
            shown[source] = target
    return {"record": record, "paired": table("paired", FAITHFULNESS_PAIRED, "faithfulness paired table"),
            "randomisation": table("randomisation_summary", FAITHFULNESS_RANDOMISATION, "randomisation summary"),
            "figures": shown}


def recorded_attribution(meta: dict, precision: str | None = None):
    """The attribution settings an area-curve record names (``precision`` overrides its precision)."""
    from gradlens.attribution.methods import AttributionConfig

    recorded = meta.get("settings", {}).get("attribution", {})
    known = {k: v for k, v in recorded.items() if k in AttributionConfig.__dataclass_fields__}
    if precision is not None:
        known["precision"] = precision
    return AttributionConfig(**known)


def write_report(workdir: str | os.PathLike, out_dir: str | os.PathLike | None = None, thumbnails: int | None = None,
                 figures_kwargs: dict | None = None, name: str = "area_curve", progress: bool | None = None,
                 faithfulness: str = "faithfulness") -> Report:
    """Write ``<out_dir>/index.html`` (default ``<workdir>/report``) and the pictures it shows.

    Needs ``gradlens area-curve`` to have run (its curves, metrics and figure);
    Figure A1 panels of every selected image (of the first ``thumbnails`` if given) are drawn (``figures_kwargs`` go to :func:`~gradlens.figures.figure_a1.render_figures_a1`).
    ``name`` is the area-curve run's ``--name``: a plain file stem (:func:`~gradlens.fileio.check_output_name`).
    ``faithfulness`` is the faithfulness run's ``--name``; its record, when there is one, is checked as the
    area-curve record is (a damaged one refuses the page in one sentence, before anything is written).
    """
    from gradlens.selection.manifest import load_manifest

    check_output_name(name)  # before any file is read: the record and its tables stay inside the work directory
    check_output_name(faithfulness)
    workdir = Path(workdir)
    manifest = load_manifest(workdir)
    meta_path = workdir / f"{name}.json"
    if not meta_path.is_file():
        raise GradlensError(f"{workdir} has no {name}.json; run 'gradlens area-curve --workdir {workdir}' first.")
    from gradlens.regions.record import load_area_curve_record  # typed field by field, its files checked by hash

    meta = load_area_curve_record(workdir, name)
    outputs = meta.get("outputs", {})
    metrics_file = outputs.get("metrics")
    metrics = record_table(workdir, meta, metrics_file) if metrics_file and (workdir / metrics_file).is_file() else None

    def table(key: str) -> pd.DataFrame:  # the exact Parquet copy (a label such as "NA" stays a label) if hashed
        file = outputs.get(key)
        return record_table(workdir, meta, file) if file and (workdir / file).is_file() else pd.DataFrame()

    summary, paired = table("metrics_summary"), table("paired")
    again = "run 'gradlens area-curve' again"
    if len(summary):
        _require_columns(summary, ("role", "label", "metric", "mean", "low", "high", "num_images"),
                         f"The metrics summary in {workdir}", again)
    if len(paired):
        _require_columns(paired, ("role", "versus", "quantity", "difference", "low", "high", "p_value", "num_images"),
                         f"The paired statistics in {workdir}", again)
    concentration, decomposition = table("concentration"), table("decomposition")
    if len(concentration):
        _require_columns(concentration, ("role", "image_id", "scale_mean", "map_max", "loss", "gini", "effective_area",
                                         "mass_area_50", "mass_area_90"), f"The concentration table in {workdir}", again)
        concentration = concentration.assign(image_id=image_id_column(concentration, f"The concentration table in {workdir}"))
    if len(decomposition):
        _require_columns(decomposition, ("role", "versus", "quantity", "estimate", "low", "high", "p_value",
                                         "share_of_paper", "num_images"), f"The decomposition table in {workdir}", again)
    faithful = _faithfulness_tables(workdir, faithfulness)  # {} without a record; one sentence if it is damaged
    figure_a2 = workdir / f"{name}.png"
    if f"{name}.png" not in outputs.get("figure", []):  # the record lists and hashes every figure it wrote
        raise InputFileError(f"{meta_path} does not list {figure_a2.name} among its figures; "
                             f"run 'gradlens area-curve --workdir {workdir}' again.")
    if not figure_a2.is_file():
        raise GradlensError(f"{figure_a2} is missing; run 'gradlens area-curve --workdir {workdir}' again.")
    models = manifest["models"]
    selection = _selection_rows(workdir, models, metrics)
    out = Path(out_dir) if out_dir is not None else workdir / "report"
    if out.exists() and out.resolve() == workdir.resolve():
        raise GradlensError(f"--out {out} is the work directory itself, whose figures the report copies; "
                            "give the report a folder of its own (the default is <workdir>/report).")
    (out / "panels").mkdir(parents=True, exist_ok=True)
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(figure_a2, out / "figure_a2.png")
    companion = workdir / f"{name}_mass_area.png"
    pictures = {"companion": companion.is_file() and f"{name}_mass_area.png" in meta.get("outputs", {}).get("figure", [])}
    if pictures["companion"]:
        shutil.copyfile(companion, out / "mass_area.png")
    for source, target in faithful.get("figures", {}).items():
        shutil.copyfile(workdir / source, out / target)
    per_image = _per_image_scale(concentration, selection, models)
    pictures["scatter"] = bool(len(per_image))
    if pictures["scatter"]:
        from gradlens.figures.scale_focus import save_scale_against_improvement

        save_scale_against_improvement(per_image, out / "scale_vs_improvement")

    shown = [int(i) for i in (selection["image_id"] if thumbnails is None else selection["image_id"].head(max(0, thumbnails)))]
    panels = {}
    if shown:
        from gradlens.figures.figure_a1 import render_figures_a1

        kwargs = dict(figures_kwargs or {})
        kwargs.setdefault("config", recorded_attribution(meta))  # the very maps the curves were measured on
        kwargs.setdefault("map_dtype", meta.get("settings", {}).get("map_dtype", "float16"))
        written = render_figures_a1(workdir, image_ids=shown, out_dir=out / "panels", progress=progress, **kwargs)
        for image_id, png in zip(shown, written):
            if PANEL_NAME.fullmatch(png.name) and ".." not in png.name:  # the page links plain file names only
                _thumbnail(png, out / "thumbs" / png.name)
                panels[image_id] = png.name
    selection["panel"] = selection["image_id"].map(lambda i: panels.get(int(i)))
    page = _page(manifest, meta, selection, summary, paired, panels, what=f"The selection table in {workdir}",
                 decomposition=decomposition, concentration=_concentration_view(concentration, models), pictures=pictures,
                 faithfulness=faithful)
    with atomic_path(out / "index.html") as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return Report(page=out / "index.html", images=len(selection), thumbnails=len(panels))


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1280px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f5f5f5; } #selection th { cursor: pointer; position: sticky; top: 0; user-select: none; }
th.sorted-asc::after { content: " \\25B2"; } th.sorted-desc::after { content: " \\25BC"; }
td:first-child, th:first-child { text-align: left; }
.muted { color: #777; } .pos { color: #1a7f37; } .neg { color: #c62828; }
#figure-a2, .figure { max-width: 100%; display: block; margin: 8px 0; }
.verdict { font-size: 15px; background: #f6f8fa; border-left: 4px solid #1f77b4; padding: 8px 12px; }
.flag { font-size: 15px; background: #fff4e5; border-left: 4px solid #d9480f; padding: 8px 12px; }
#filter { margin: 6px 0 10px; padding: 4px 8px; width: 320px; }
.thumbs { display: flex; flex-wrap: wrap; gap: 12px; }
.thumbs figure { margin: 0; width: 240px; } .thumbs img { width: 240px; border: 1px solid #ccc; cursor: zoom-in; }
.thumbs figcaption { font-size: 12px; }
#viewer { display: none; position: fixed; inset: 0; background: rgba(0,0,0,.85); z-index: 10; align-items: center;
          justify-content: center; flex-direction: column; }
#viewer.open { display: flex; } #viewer img { max-width: 96vw; max-height: 88vh; background: white; }
#viewer p { color: white; } #viewer button { margin-top: 8px; }
.scroll { max-height: 560px; overflow: auto; border: 1px solid #ddd; display: inline-block; }
"""

# Every value in DATA came from files on disk: it reaches the page as text (textContent, dataset,
# setAttribute) and never as markup; a panel name is used only if it is a plain file name.
_SCRIPT = """
'use strict';
const DATA = JSON.parse(document.getElementById('data').textContent);
const PANEL = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}[.]png$/;
function plainPanel(name) {
  return typeof name === 'string' && PANEL.test(name) && !name.includes('..') ? name : null;
}
function shownText(v, col) {  // what a cell displays, and what the filter matches
  if (v === null || v === undefined) return '-';
  if (col.startsWith('pointing_game')) return v ? 'hit' : 'miss';
  if (typeof v === 'number') return Number.isInteger(v) && (col === 'rank' || col === 'image_id') ? String(v) : v.toFixed(4);
  if (typeof v === 'object') return JSON.stringify(v);
  return String(v);
}
function headerRow(cols) {
  const tr = document.createElement('tr');
  for (const c of cols) {
    const th = document.createElement('th');
    th.dataset.col = c;
    th.textContent = c;
    if (c === DATA.sort.col) th.classList.add(DATA.sort.asc ? 'sorted-asc' : 'sorted-desc');
    tr.append(th);
  }
  return tr;
}
function bodyRow(r, cols) {
  const tr = document.createElement('tr');
  tr.dataset.image = String(r.image_id);
  for (const c of cols) {
    const td = document.createElement('td');
    const v = r[c];
    if (c === 'improvement' && typeof v === 'number' && v !== 0) td.className = v > 0 ? 'pos' : 'neg';
    const panel = c === 'image_id' ? plainPanel(r.panel) : null;
    if (v === null || v === undefined) {
      const dash = document.createElement('span');
      dash.className = 'muted';
      dash.textContent = '-';
      td.append(dash);
    } else if (panel) {
      const link = document.createElement('a');
      link.setAttribute('href', '#');
      link.className = 'open';
      link.dataset.panel = panel;
      link.textContent = shownText(v, c);
      td.append(link);
    } else {
      td.textContent = shownText(v, c);
    }
    tr.append(td);
  }
  return tr;
}
function renderSelection() {
  const cols = DATA.columns;
  const text = document.getElementById('filter').value.trim().toLowerCase();
  const rows = DATA.rows.filter(r => !text || cols.some(c => shownText(r[c], c).toLowerCase().includes(text)));
  const head = document.createElement('thead');
  head.append(headerRow(cols));
  const body = document.createElement('tbody');
  for (const r of rows) body.append(bodyRow(r, cols));
  document.getElementById('selection').replaceChildren(head, body);
  document.getElementById('shown').textContent = rows.length + ' of ' + DATA.rows.length + ' images';
}
function sortBy(col) {
  const asc = DATA.sort.col === col ? !DATA.sort.asc : true;
  DATA.sort = {col, asc};
  DATA.rows.sort((a, b) => {
    const x = a[col], y = b[col];
    if (x === y) return a.rank - b.rank;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * (asc ? 1 : -1);
  });
  renderSelection();
}
function openPanel(name) {
  const panel = plainPanel(name);
  if (panel === null) return;
  document.getElementById('viewer-img').setAttribute('src', 'panels/' + panel);
  document.getElementById('viewer-caption').textContent = panel;
  document.getElementById('viewer').classList.add('open');
}
function closeViewer() {
  document.getElementById('viewer').classList.remove('open');
}
document.getElementById('selection').addEventListener('click', ev => {
  const link = ev.target.closest('a.open');
  if (link) {
    ev.preventDefault();
    openPanel(link.dataset.panel);
    return;
  }
  const th = ev.target.closest('th');
  if (th) sortBy(th.dataset.col);
});
document.getElementById('thumbs').addEventListener('click', ev => {
  const thumb = ev.target.closest('.open');
  if (thumb) {
    ev.preventDefault();
    openPanel(thumb.dataset.panel);
  }
});
document.getElementById('viewer').addEventListener('click', closeViewer);
document.addEventListener('keydown', ev => { if (ev.key === 'Escape') closeViewer(); });
document.getElementById('filter').addEventListener('input', renderSelection);
renderSelection();
"""


def _csp_source(text: str) -> str:
    """The CSP source that allows exactly this inline script or style text (its SHA-256, base64)."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


# Only the page's own inline script and style run, by their hashes (an injected one would not); only images
# load, and only from the page's own origin: 'self' of a page opened as a file: URL matches file: URLs in
# Chromium (the pictures beside it), and the folder's own file: URL would break when the folder moves.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_csp_source(_SCRIPT)}; style-src {_csp_source(_STYLE)}; img-src 'self'; "
    "base-uri 'none'; form-action 'none'"
)


def _missing(value) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or array in a hostile table is a value, not a missing one
        return False


def _table_html(table: pd.DataFrame, numeric: tuple[str, ...], general: tuple[str, ...] = ()) -> str:
    """An escaped HTML table: ``numeric`` columns with 4 decimals (p-values with 3 significant digits),
    ``general`` ones with 4 significant digits (gradient magnitudes are far below 1e-4)."""
    if table is None or not len(table):
        return '<p class="muted">(none)</p>'
    head = "".join(f"<th>{escape_html(c)}</th>" for c in table.columns)
    rows = []
    for row in table.itertuples(index=False, name=None):
        cells = []
        for c, v in zip(table.columns, row):
            if c in numeric and isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and not _missing(v):
                cells.append(f"<td>{v:.3g}</td>" if c == "p_value" else f"<td>{v:.4g}</td>" if c in general else f"<td>{v:.4f}</td>")
            else:
                cells.append(f"<td>{'' if _missing(v) else escape_html(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _verdicts_html(meta: dict) -> str:
    entry = meta.get("decomposition") if isinstance(meta.get("decomposition"), dict) else {}
    verdicts = [v for v in entry.get("verdicts", []) if isinstance(v, dict) and isinstance(v.get("sentence"), str)]
    if not verdicts:
        return ('<p class="muted">No verdict on scale and focus: this area-curve run predates it or has one model; '
                "run 'gradlens area-curve' again.</p>")
    return "".join(f'<p class="verdict">{escape_html(v["sentence"])}</p>' for v in verdicts)


def _model_name(label, role) -> str:
    """``label (role)``, or the role alone when the label is missing or the role itself (text, escaped later)."""
    role = "" if _missing(role) else str(role)
    label = "" if _missing(label) else str(label)
    return f"{label} ({role})" if label and label != role else role


def _interval(low, high) -> str:
    """``[low, high]``, each with 4 decimals where it is a number and as it is otherwise (escaped later)."""
    def number(v):
        if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
            return "" if _missing(v) else f"{v:.4f}"
        return "" if _missing(v) else str(v)

    low, high = number(low), number(high)
    return f"[{low}, {high}]" if low or high else ""


def _faithfulness_areas(paired: pd.DataFrame) -> pd.DataFrame:
    """The paired rows on the areas under the curves (``q`` missing), one line each as the page shows it."""
    if paired is None or not len(paired):
        return pd.DataFrame()
    areas = paired[paired["q"].map(_missing).astype(bool)]
    return pd.DataFrame({
        "comparison": areas["comparison"].to_numpy(),
        "model": [_model_name(label, role) for label, role in zip(areas["label"], areas["role"])],
        "versus": ["random order" if isinstance(c, str) and c == "map - random" else _model_name(label, role)
                   for c, label, role in zip(areas["comparison"], areas["versus_label"], areas["versus"])],
        "mode": areas["mode"].to_numpy(), "order": areas["order"].to_numpy(), "metric": areas["metric"].to_numpy(),
        "estimate": areas["estimate"].to_numpy(),
        "interval": [_interval(low, high) for low, high in zip(areas["low"], areas["high"])],
        "p_value": areas["p_value"].to_numpy(), "num_images": areas["num_images"].to_numpy(),
    })  # fmt: skip


def _faithfulness_html(faithful: dict) -> str:
    """The faithfulness section (empty without a record): every value from the record or its tables escaped."""
    record = faithful.get("record")
    if not record:
        return ""
    e = escape_html
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    fractions = settings.get("fractions", "?")
    fractions = ", ".join(e(f) for f in fractions) if isinstance(fractions, list) else e(fractions)
    sentences = "".join(f'<p class="verdict">{e(s)}</p>' for s in record.get("sentences", []))
    flags = "".join(f'<p class="flag"><strong>Randomisation check:</strong> {e(f)}</p>' for f in record.get("flags", []))
    randomised = settings.get("randomise") is True or "randomisation_summary" in record.get("outputs", {})
    if flags:
        check = ""
    elif randomised:
        check = ("<p class=\"muted\">Randomisation check: no model's maps stay close to its trained model's once "
                 "its head is re-initialised.</p>")
    else:
        check = ("<p class=\"muted\">No randomisation check: run 'gradlens faithfulness --randomise' to see whether "
                 "the maps change when the models' weights are re-initialised.</p>")
    figures = faithful.get("figures", {})
    figure = ('<img class="figure" src="faithfulness.png" alt="deletion and insertion curves">'
              if "faithfulness.png" in figures.values() else "")
    summary = faithful.get("randomisation")
    randomisation = ""
    if "faithfulness_randomisation.png" in figures.values() or (summary is not None and len(summary)):
        if summary is not None and len(summary):
            summary = summary[list(FAITHFULNESS_RANDOMISATION)]
        picture = ('<img class="figure" src="faithfulness_randomisation.png" alt="map similarity as layers are '
                   're-initialised">' if "faithfulness_randomisation.png" in figures.values() else "")
        numbers = tuple(c for c in FAITHFULNESS_RANDOMISATION if c.startswith(("spearman", "ssim")))
        randomisation = (f"<h3>Model-parameter randomisation</h3>\n{picture}\n<details><summary>per model and step: "
                         f"similarity of the maps to the trained model's</summary><div class=\"scroll\">"
                         f"{_table_html(summary, numbers)}</div></details>\n")
    return f"""<h2 id="faithfulness">Faithfulness: does each detector need its important region?</h2>
{flags}{sentences or '<p class="muted">(no sentences in the faithfulness record)</p>'}
{check}
<p class="muted">Deletion replaces ({e(settings.get('fill', '?'))} fill) the fraction q of the pixels each model's own
map ranks first, insertion restores them onto a filled image, and the model is run again; a seeded random order
(seed {e(settings.get('seed', '?'))}) is the control. q: {fractions}; {e(settings.get('num_images', '?'))} images;
intervals: {e(settings.get('bootstrap', '?'))} bootstrap resamples at level {e(settings.get('confidence_level', '?'))};
p-values: Wilcoxon signed-rank, paired per image. A faithful map lowers the quality faster on deletion (a smaller
area) and raises it faster on insertion (a larger area) than the random order.</p>
{figure}
<h3>Areas under the curves (mean over q), paired per image</h3>
{_table_html(_faithfulness_areas(faithful.get("paired")), ("estimate", "p_value"))}
{randomisation}"""


def _page(manifest: dict, meta: dict, selection: pd.DataFrame, summary: pd.DataFrame, paired: pd.DataFrame,
          panels: dict[int, str], what: str = "The selection table", decomposition: pd.DataFrame | None = None,
          concentration: pd.DataFrame | None = None, pictures: dict | None = None,
          faithfulness: dict | None = None) -> str:
    e = escape_html
    pictures = pictures or {}
    if decomposition is not None and len(decomposition):
        decomposition = decomposition[[c for c in ("role", "versus", "quantity", "estimate", "low", "high", "p_value",
                                                   "share_of_paper", "num_images") if c in decomposition]]
    models = manifest["models"]
    labels = ", ".join(f"{e(m['role'])}: {e(m.get('label') or m['role'])}" for m in models)
    columns = [c for c in selection.columns if c != "panel"]
    data = {"columns": columns, "rows": _records(selection, what), "sort": {"col": "rank", "asc": True}}
    payload = json_for_script(data)
    settings = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
    scalar = paired[paired["quantity"] != "area"] if len(paired) else paired
    if len(scalar):
        scalar = scalar[["role", "versus", "quantity", "difference", "low", "high", "p_value", "num_images"]]
    summary_view = (summary.pivot_table(index=["role", "label"], columns="metric", values="mean", aggfunc="first").reset_index()
                    if len(summary) else summary)
    intervals = summary[["role", "metric", "mean", "low", "high", "num_images"]] if len(summary) else summary
    thumbs = "".join(
        f'<figure><img class="open" src="thumbs/{e(name)}" data-panel="{e(name)}" alt="Figure A1, image {e(i)}">'
        f"<figcaption>#{k + 1}: image {e(i)}</figcaption></figure>"
        for k, (i, name) in enumerate(panels.items())
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">
<title>gradlens report: {e(manifest.get('name', 'selection'))}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>
<body>
<h1>gradlens report</h1>
<p>Models: {labels}. {len(selection)} selected images; area curves over {e(settings.get('num_images', '?'))} images,
{e(settings.get('thresholds', '?'))} thresholds ({e(settings.get('scale', '?'))} grid), bands: {e(settings.get('bootstrap', 0))}
bootstrap resamples at level {e(settings.get('confidence_level', '?'))}. Created by gradlens {e(meta.get('gradlens_version', ''))}.</p>
<h2>Verdict: scale or focus?</h2>
{_verdicts_html(meta)}
<p class="muted">At shared thresholds the area mixes gradient scale (if B's map is c times A's, B's area at t is A's
at t/c) with focus. The difference in area under the log curve splits exactly into a scale term (log ratio of mean
magnitudes) and a focus term (the same maps divided by their mean), plus what the grid leaves out; focus is judged
by the Gini index. A finding counts when its interval excludes 0.</p>
<h2>Figure A2: important-region area against the threshold</h2>
<img id="figure-a2" src="figure_a2.png" alt="Figure A2">
{'<h2>Companion: concentration without scale, and the split of the difference</h2><img class="figure" src="mass_area.png" alt="mass-area curves and decomposition">' if pictures.get("companion") else ''}
<h2>Scale and focus, A against each baseline</h2>
{_table_html(decomposition, ("estimate", "low", "high", "p_value", "share_of_paper"))}
{'<img class="figure" src="scale_vs_improvement.png" alt="scale ratio against quality improvement">' if pictures.get("scatter") else ''}
<details><summary>per image: scale and concentration of each model</summary><div class="scroll">
{_table_html(concentration, (), tuple(c for c in concentration.columns if c != "image_id") if concentration is not None else ())}</div></details>
<h2>A against each baseline (paired per image)</h2>
{_table_html(scalar, ("difference", "low", "high", "p_value"))}
<h2>Localisation metrics</h2>
{_table_html(summary_view, tuple(summary_view.columns))}
<details><summary>with intervals</summary>{_table_html(intervals, ("mean", "low", "high"))}</details>
{_faithfulness_html(faithfulness or {})}<h2>Selection</h2>
<input id="filter" type="search" placeholder="filter rows (any column)"> <span id="shown" class="muted"></span>
<div class="scroll"><table id="selection"></table></div>
<h2>Figure A1</h2>
<div id="thumbs" class="thumbs">{thumbs or '<p class="muted">(no panels drawn)</p>'}</div>
<div id="viewer"><img id="viewer-img" alt="Figure A1 panel"><p id="viewer-caption"></p><button type="button">close</button></div>
<script type="application/json" id="data">{payload}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
