"""The tutorial notebooks in examples/ run top to bottom in a fresh Jupyter kernel, offline on
the bundled model, and every code cell shows what it is meant to show (a picture, a table,
text or the explorer widget) without an error."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHOWN = {"image/png", "text/html", "text/plain", "application/vnd.jupyter.widget-view+json"}


def run(name: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    # One torch thread in the kernel: the work is batch-1 forwards, and on a busy 2-core CI
    # machine two spin-waiting threads made these notebooks ~10x slower (measured).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs for cell in code), "commit notebooks without outputs"
    # "python3" is the kernelspec ipykernel installs into the environment (share/jupyter).
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    return notebook


def shown(cell: nbformat.NotebookNode) -> set[str]:
    """The MIME types and streams a code cell produced."""
    kinds = set()
    for output in cell.outputs:
        assert output.output_type != "error", output
        if output.output_type == "stream":
            assert output.name == "stdout", output.text  # no warnings or progress bars
            kinds.add("stdout")
        else:
            kinds |= set(output.get("data", {}))
    return kinds


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


@pytest.mark.slow
def test_explain_a_prediction_runs_and_shows_its_results(tmp_path, monkeypatch):
    cells = code_cells(run("explain_a_prediction.ipynb", tmp_path, monkeypatch))
    for cell in cells:
        assert shown(cell) & (SHOWN | {"stdout"}), cell.source
    by_source = {cell.source.splitlines()[-1]: shown(cell) for cell in cells}
    assert {"image/png", "text/html"} <= by_source["attr"]  # an Attribution's own display
    assert "text/html" in by_source["top"]  # the Predictions table
    assert "application/vnd.jupyter.widget-view+json" in by_source["explorer(model, image)"]
    methods = next(c for c in cells if "explain_many" in c.source)
    pictures = [o for o in methods.outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 6  # one display per method
    ranked = next(c for c in cells if "leaderboard(" in c.source).outputs[0].text
    assert "(chance)" in ranked and "integrated_gradients" in ranked
    saved = sorted(path.name for path in (tmp_path / "explain-out").iterdir())
    assert "gradcam.json" in saved and sum(name.endswith(".png") for name in saved) == 3


@pytest.mark.slow
def test_what_did_my_network_learn_runs_and_shows_its_pictures(tmp_path, monkeypatch):
    cells = code_cells(run("what_did_my_network_learn.ipynb", tmp_path, monkeypatch))
    for cell in cells:
        assert shown(cell) & (SHOWN | {"stdout"}), cell.source
    pictures = [
        output for cell in cells for output in cell.outputs if "image/png" in output.get("data", {})
    ]
    # photo, 2 filter grids, 3 feature-map grids, 2 unit maps, 4 synthesized images
    assert len(pictures) == 12
