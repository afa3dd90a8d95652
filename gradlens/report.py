"""``gradlens report``: one self-contained HTML page per work directory, to browse a selection.

The page needs no server and no network: styles and script are inline, the
tables are embedded as JSON, and the pictures sit beside it in ``report/``
(Figure A2, and per selected image a thumbnail and the full Figure A1 panel).
What it shows: the selection as a sortable, filterable table (each model's
quality, the improvement, each model's box energy and pointing-game hit),
Figure A2 with its bootstrap bands and the paired difference, the metrics
summary with intervals, A minus each baseline with Wilcoxon p-values, and
the Figure A1 thumbnails, each opening its full panel.
"""

from __future__ import annotations

import html
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gradlens.errors import GradlensError
from gradlens.fileio import atomic_path, read_json, read_table

THUMBNAIL_WIDTH = 360


@dataclass
class Report:
    page: Path
    images: int  # rows of the selection table
    thumbnails: int


def _selection_rows(workdir: Path, models: list[dict], metrics: pd.DataFrame | None) -> pd.DataFrame:
    selection = read_table(workdir, "selection").copy()
    if "rank" not in selection:
        selection.insert(0, "rank", np.arange(1, len(selection) + 1))
    if metrics is not None and len(metrics):
        for role in [m["role"] for m in models]:
            mine = metrics[metrics["role"] == role].set_index("image_id")
            for column in ("box_energy", "pointing_game"):
                selection[f"{column}_{role}"] = selection["image_id"].map(mine[column]) if column in mine else np.nan
    return selection


def _records(table: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts (NaN -> null, numpy scalars -> Python)."""
    return json.loads(table.to_json(orient="records", double_precision=6))


def _thumbnail(source: Path, target: Path) -> None:
    from PIL import Image

    with Image.open(source) as img:
        img = img.convert("RGB")
        scale = THUMBNAIL_WIDTH / img.width
        img = img.resize((THUMBNAIL_WIDTH, max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
        with atomic_path(target) as tmp:
            img.save(tmp, format="PNG", optimize=True)


def recorded_attribution(meta: dict, precision: str | None = None):
    """The attribution settings an area-curve record names (``precision`` overrides its precision)."""
    from gradlens.attribution.methods import AttributionConfig

    recorded = meta.get("settings", {}).get("attribution", {})
    known = {k: v for k, v in recorded.items() if k in AttributionConfig.__dataclass_fields__}
    if precision is not None:
        known["precision"] = precision
    return AttributionConfig(**known)


def write_report(workdir: str | os.PathLike, out_dir: str | os.PathLike | None = None, thumbnails: int | None = None,
                 figures_kwargs: dict | None = None, name: str = "area_curve", progress: bool | None = None) -> Report:
    """Write ``<out_dir>/index.html`` (default ``<workdir>/report``) and the pictures it shows.

    Needs ``gradlens area-curve`` to have run (its curves, metrics and figure);
    Figure A1 panels of every selected image (of the first ``thumbnails`` if given) are drawn (``figures_kwargs`` go to :func:`~gradlens.figures.figure_a1.render_figures_a1`).
    """
    from gradlens.selection.manifest import load_manifest

    workdir = Path(workdir)
    manifest = load_manifest(workdir)
    meta_path = workdir / f"{name}.json"
    if not meta_path.is_file():
        raise GradlensError(f"{workdir} has no {name}.json; run 'gradlens area-curve --workdir {workdir}' first.")
    meta = read_json(meta_path, "area-curve record")
    outputs = meta.get("outputs", {})
    metrics_file = outputs.get("metrics")
    metrics = read_table(workdir, Path(metrics_file).stem) if metrics_file and (workdir / metrics_file).is_file() else None
    def table(key: str) -> pd.DataFrame:  # the exact Parquet copy: a label such as "NA" stays a label
        file = outputs.get(key)
        return read_table(workdir, Path(file).stem) if file and (workdir / file).is_file() else pd.DataFrame()

    summary, paired = table("metrics_summary"), table("paired")
    figure_a2 = workdir / f"{name}.png"
    if not figure_a2.is_file():
        raise GradlensError(f"{figure_a2} is missing; run 'gradlens area-curve --workdir {workdir}' again.")
    out = Path(out_dir) if out_dir is not None else workdir / "report"
    (out / "panels").mkdir(parents=True, exist_ok=True)
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(figure_a2, out / "figure_a2.png")

    models = manifest["models"]
    selection = _selection_rows(workdir, models, metrics)
    shown = [int(i) for i in (selection["image_id"] if thumbnails is None else selection["image_id"].head(max(0, thumbnails)))]
    panels = {}
    if shown:
        from gradlens.figures.figure_a1 import render_figures_a1

        kwargs = dict(figures_kwargs or {})
        kwargs.setdefault("config", recorded_attribution(meta))  # the very maps the curves were measured on
        kwargs.setdefault("map_dtype", meta.get("settings", {}).get("map_dtype", "float16"))
        written = render_figures_a1(workdir, image_ids=shown, out_dir=out / "panels", progress=progress, **kwargs)
        for image_id, png in zip(shown, written):
            _thumbnail(png, out / "thumbs" / png.name)
            panels[image_id] = png.name
    selection["panel"] = selection["image_id"].map(lambda i: panels.get(int(i)))
    page = _page(manifest, meta, selection, summary, paired, panels)
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

_SCRIPT = """
const DATA = JSON.parse(document.getElementById('data').textContent);
function fmt(v, col) {
  if (v === null || v === undefined) return '<span class="muted">-</span>';
  if (col.startsWith('pointing_game')) return v ? 'hit' : 'miss';
  if (typeof v !== 'number') return String(v).replace(/[&<>]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;'}[c]));
  if (Number.isInteger(v) && (col === 'rank' || col === 'image_id')) return String(v);
  return v.toFixed(4);
}
function renderSelection() {
  const table = document.getElementById('selection');
  const cols = DATA.columns;
  const head = '<tr>' + cols.map(c => `<th data-col="${c}">${c}</th>`).join('') + '</tr>';
  const text = document.getElementById('filter').value.trim().toLowerCase();
  const shown = (r, c) => fmt(r[c], c).replace(/<[^>]*>/g, '').toLowerCase();  // what the cell displays
  const rows = DATA.rows.filter(r => !text || cols.some(c => shown(r, c).includes(text)));
  const body = rows.map(r => '<tr data-image="' + r.image_id + '">' + cols.map(c => {
    const cls = c === 'improvement' && typeof r[c] === 'number' ? (r[c] > 0 ? 'pos' : (r[c] < 0 ? 'neg' : '')) : '';
    const cell = c === 'image_id' && r.panel ? `<a href="#" class="open" data-panel="${r.panel}">${r[c]}</a>` : fmt(r[c], c);
    return `<td class="${cls}">${cell}</td>`;
  }).join('') + '</tr>').join('');
  table.innerHTML = '<thead>' + head + '</thead><tbody>' + body + '</tbody>';
  table.querySelectorAll('th').forEach(th => {
    if (th.dataset.col === DATA.sort.col) th.classList.add(DATA.sort.asc ? 'sorted-asc' : 'sorted-desc');
    th.addEventListener('click', () => sortBy(th.dataset.col));
  });
  document.getElementById('shown').textContent = rows.length + ' of ' + DATA.rows.length + ' images';
  bindViewer(table);
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
  const viewer = document.getElementById('viewer');
  document.getElementById('viewer-img').src = 'panels/' + name;
  document.getElementById('viewer-caption').textContent = name;
  viewer.classList.add('open');
}
function bindViewer(root) {
  root.querySelectorAll('.open').forEach(el => el.addEventListener('click', ev => {
    ev.preventDefault(); openPanel(el.dataset.panel);
  }));
}
document.getElementById('viewer').addEventListener('click', () => document.getElementById('viewer').classList.remove('open'));
document.addEventListener('keydown', ev => { if (ev.key === 'Escape') document.getElementById('viewer').classList.remove('open'); });
document.getElementById('filter').addEventListener('input', renderSelection);
bindViewer(document.getElementById('thumbs'));
renderSelection();
"""


def _table_html(table: pd.DataFrame, numeric: tuple[str, ...]) -> str:
    if table is None or not len(table):
        return '<p class="muted">(none)</p>'
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = []
    for _, row in table.iterrows():
        cells = []
        for c in table.columns:
            v = row[c]
            if c in numeric and isinstance(v, (int, float, np.floating, np.integer)) and not pd.isna(v):
                cells.append(f"<td>{v:.3g}</td>" if c == "p_value" else f"<td>{v:.4f}</td>")
            else:
                cells.append(f"<td>{'' if pd.isna(v) else html.escape(str(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _page(manifest: dict, meta: dict, selection: pd.DataFrame, summary: pd.DataFrame, paired: pd.DataFrame,
          panels: dict[int, str]) -> str:
    models = manifest["models"]
    labels = ", ".join(f"{m['role']}: {html.escape(str(m.get('label', m['role'])))}" for m in models)
    columns = [c for c in selection.columns if c != "panel"]
    data = {"columns": columns, "rows": _records(selection), "sort": {"col": "rank", "asc": True}}
    payload = json.dumps(data).replace("</", "<\\/")  # no early end of the script element
    settings = meta.get("settings", {})
    scalar = paired[paired["quantity"] != "area"] if len(paired) else paired
    if len(scalar):
        scalar = scalar[["role", "versus", "quantity", "difference", "low", "high", "p_value", "num_images"]]
    summary_view = summary.pivot_table(index=["role", "label"], columns="metric", values="mean").reset_index() if len(summary) else summary
    intervals = summary[["role", "metric", "mean", "low", "high", "num_images"]] if len(summary) else summary
    thumbs = "".join(
        f'<figure><img class="open" src="thumbs/{html.escape(name)}" data-panel="{html.escape(name)}" alt="Figure A1, image {i}">'
        f"<figcaption>#{k + 1}: image {i}</figcaption></figure>"
        for k, (i, name) in enumerate(panels.items())
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gradlens report: {html.escape(str(manifest.get('name', 'selection')))}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>
<body>
<h1>gradlens report</h1>
<p>Models: {labels}. {len(selection)} selected images; area curves over {settings.get('num_images', '?')} images,
{settings.get('thresholds', '?')} thresholds ({html.escape(str(settings.get('scale', '?')))} grid), bands: {settings.get('bootstrap', 0)}
bootstrap resamples at level {settings.get('confidence_level', '?')}. Created by gradlens {html.escape(str(meta.get('gradlens_version', '')))}.</p>
<h2>Figure A2: important-region area against the threshold</h2>
<img src="figure_a2.png" alt="Figure A2" style="max-width: 100%">
<h2>A against each baseline (paired per image)</h2>
{_table_html(scalar, ("difference", "low", "high", "p_value"))}
<h2>Localisation metrics</h2>
{_table_html(summary_view, tuple(summary_view.columns))}
<details><summary>with intervals</summary>{_table_html(intervals, ("mean", "low", "high"))}</details>
<h2>Selection</h2>
<input id="filter" type="search" placeholder="filter rows (any column)"> <span id="shown" class="muted"></span>
<div class="scroll"><table id="selection"></table></div>
<h2>Figure A1</h2>
<div id="thumbs" class="thumbs">{thumbs or '<p class="muted">(no panels drawn)</p>'}</div>
<div id="viewer"><img id="viewer-img" alt="Figure A1 panel"><p id="viewer-caption"></p><button type="button">close</button></div>
<script type="application/json" id="data">{payload}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
