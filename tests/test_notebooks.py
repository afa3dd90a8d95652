"""The notebooks run top to bottom through the Python API, and make what they say they make.

The two figure notebooks share one demo work directory (data and selection only, built
once per session); the bring-your-own-detector notebook makes its own small dataset. Each
is executed in a fresh kernel that runs this test's own interpreter, with its parameters
redirected through the ``GRADLENS_NOTEBOOK_*`` environment variables that the parameter cells read.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from gradlens.attribution.workdir import selection_ids
from gradlens.demo import run_demo

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (installed with nbclient)
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL_CHECK = "import sys\nprint('KERNEL', sys.prefix, sys.executable, sep='\\n')"


@pytest.fixture(scope="session")
def notebook_demo(tmp_path_factory) -> Path:
    """A demo's data and selection (no maps: the notebooks compute theirs); returns its DEMO_OUT folder."""
    root = tmp_path_factory.mktemp("notebook-demo")
    demo = run_demo(root, num_images=24, top=6, gradients=False, progress=False)
    assert len(demo.selection.selection) >= 3, "the gallery needs three selected images"
    return root


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory) -> Path:
    """A ``python3`` kernelspec that runs this interpreter, whatever kernels the user or system has installed."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / "python3"
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (gradlens tests)",
        "language": "python",
    }))  # fmt: skip
    return root


def execute(name: str, demo: Path, kernel_dir: Path, cwd: Path, extra_env: dict | None = None):
    """Run ``notebooks/<name>`` on the demo in ``cwd``; returns the executed notebook (the file is left as it is)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(KERNEL_CHECK))
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # ipykernel picks inline, as in Jupyter
    env.update({
        "GRADLENS_NOTEBOOK_DEMO_OUT": str(demo),
        "GRADLENS_NOTEBOOK_WORKDIR": str(demo / "run"),
        "GRADLENS_NOTEBOOK_DEVICE": "cpu",
        **(extra_env or {}),
    })  # fmt: skip
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    client = nbclient.NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    return nb


def outputs(nb) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def pngs(nb) -> list[bytes]:
    return [base64.b64decode(out["data"]["image/png"]) for out in outputs(nb) if "image/png" in out.get("data", {})]


def check_ran_here(nb, cwd: Path) -> None:
    """No error output, the kernel was this interpreter, and nothing was written beside the notebook's cwd."""
    assert not [out for out in outputs(nb) if out["output_type"] == "error"]
    text = "".join(out.get("text", "") for out in nb.cells[-1].outputs)
    assert text.split("\n")[1:3] == [sys.prefix, sys.executable], text
    assert not any(cwd.iterdir()), sorted(p.name for p in cwd.iterdir())


@pytest.mark.parametrize("name", ["figure_a1.ipynb", "figure_a2.ipynb"])
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None and set(c.metadata) <= {"tags"} for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "WORKDIR" in tagged[0].source and "DEMO_OUT" in tagged[0].source
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_figure_a2_notebook(notebook_demo, kernel_dir, tmp_path):
    nb = execute("figure_a2.ipynb", notebook_demo, kernel_dir, tmp_path)
    check_ran_here(nb, tmp_path)
    workdir = notebook_demo / "run"
    for name in ("area_curve.csv", "area_curve.parquet", "area_curve.json", "area_curve.png", "area_curve.pdf"):
        assert (workdir / name).is_file(), name
    table = pd.read_csv(workdir / "area_curve.csv")
    assert sorted(table["role"].unique()) == ["a", "b"]
    assert len(table) == 2 * 200 and set(table["num_images"]) == {len(selection_ids(workdir))}
    verdicts = json.loads((workdir / "area_curve.json").read_text())["decomposition"]["verdicts"]
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert verdicts and verdicts[0]["sentence"] in printed  # the notebook shows the run's own verdict
    assert "ΔAUC" in printed and "2 × the map: Gini" in printed
    # Figure A2, its companion (mass-area curves and the decomposition), the per-image-normalised variant
    figures = pngs(nb)
    assert len(figures) == 3 and all(f.startswith(b"\x89PNG") for f in figures)


def test_figure_a1_notebook(notebook_demo, kernel_dir, tmp_path):
    nb = execute("figure_a1.ipynb", notebook_demo, kernel_dir, tmp_path)
    check_ran_here(nb, tmp_path)
    figures_dir = notebook_demo / "run" / "figures"
    best = selection_ids(notebook_demo / "run", top=3)
    for image_id in best:  # the gallery of GALLERY = 3
        assert (figures_dir / f"figure_a1_{image_id}.png").is_file()
        assert (figures_dir / f"figure_a1_{image_id}.pdf").is_file()
    assert (figures_dir / "figure_a1_gallery.pdf").is_file()
    for role in ("a", "b"):  # the best image's map of each model is stored
        assert list((notebook_demo / "run" / "maps" / role).glob(f"*/{best[0]}.npz")), role
    figures = pngs(nb)  # Figure A1, the map and its important region, then the gallery's three
    assert len(figures) == 2 + 3 and all(f.startswith(b"\x89PNG") for f in figures)


def test_bring_your_own_detector_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOKS / "bring_your_own_detector.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None and set(c.metadata) <= {"tags"} for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "OUT" in tagged[0].source and "DEVICE" in tagged[0].source
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_bring_your_own_detector_notebook(kernel_dir, tmp_path):
    """The notebook's adapter runs select -> gradients -> area-curve on a torchvision FCOS."""
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    nb = execute("bring_your_own_detector.ipynb", tmp_path / "no-demo", kernel_dir, cwd,
                 {"GRADLENS_NOTEBOOK_BYOD_OUT": str(out)})
    check_ran_here(nb, cwd)
    workdir = out / "run"
    manifest = json.loads((workdir / "manifest.json").read_text())
    a, b = manifest["models"]
    assert (a["role"], a["kind"], a["label"], a["source"]) == ("a", "detector", "fcos", None)
    assert b["kind"] == "checkpoint" and b["label"] == "convnext"
    table = pd.read_csv(workdir / "area_curve.csv")
    assert sorted(table["role"].unique()) == ["a", "b"] and set(table["num_images"]) == {4}
    assert len(table) == 2 * 100 and table["area"].between(0, 1).all()
    for role in ("a", "b"):  # a map of every selected image, for the FCOS and for the ConvNeXt
        for image_id in selection_ids(workdir):
            assert list((workdir / "maps" / role).glob(f"*/{image_id}.npz")), (role, image_id)
    record = json.loads((workdir / "area_curve.json").read_text())
    assert record["models"][0]["checkpoint"] is None and record["models"][1]["checkpoint"].endswith("convnext.pth")
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "models: a = fcos (detector), b = convnext (checkpoint)" in printed
    assert "a = fcos: 4 maps computed" in printed and "per-object maps (--target object) need a detector" in printed
    figures = pngs(nb)  # Figure A2
    assert len(figures) == 1 and figures[0].startswith(b"\x89PNG")
