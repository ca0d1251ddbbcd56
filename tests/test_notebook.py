"""The tutorial notebook (examples/tutorial.ipynb) runs from top to bottom on the real Norman subset, so that it
cannot rot: executed with nbclient in a fresh kernel, in a temporary working directory (everything it writes goes
there), and its key outputs are checked. The committed notebook carries no outputs."""

import json
import pathlib
import shutil

import pandas as pd
import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "examples" / "tutorial.ipynb"
BASELINES = {"control_mean", "train_mean", "additive", "linear", "go_prior"}


def _outputs_text(cell) -> str:
    """Everything a code cell showed: stream text, plain-text reprs and HTML."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        data = out.get("data", {})
        for mime in ("text/plain", "text/html"):
            if mime in data:
                value = data[mime]
                parts.append("".join(value) if isinstance(value, list) else value)
    return "\n".join(parts)


def _tagged(nb, tag):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r} in {NOTEBOOK.name}, found {len(cells)}"
    return cells[0]


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), \
        "strip the outputs before committing (e.g. jupyter nbconvert --clear-output --inplace)"


@pytest.mark.timeout(480)  # ~30 s; ~2 min more when DeepSpeed first builds its CPU op
def test_tutorial_notebook_runs(norman_path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    work = tmp_path / "outputs"
    nb_path = tmp_path / NOTEBOOK.name
    shutil.copy(NOTEBOOK, nb_path)
    monkeypatch.setenv("GEARS_DIST_TUTORIAL_DATA", str(norman_path))
    monkeypatch.setenv("GEARS_DIST_TUTORIAL_DIR", str(work))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # train in the kernel's process, as the notebook says
    # An earlier in-process training in this pytest process left its rendezvous (MASTER_PORT, RANK...) in the
    # environment, and its port is still bound: the kernel must pick its own, as a fresh notebook would.
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    nb = nbformat.read(nb_path, as_version=4)
    # The kernel is this interpreter (the kernelspec's 'python' is replaced by sys.executable).
    client = NotebookClient(nb, timeout=360, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    nbformat.write(nb, nb_path)  # executed copy, for a look after a failure (tmp_path is kept)

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert "Store('" in _outputs_text(_tagged(nb, "store")) and "cells=3,375" in _outputs_text(_tagged(nb, "store"))
    history = _outputs_text(_tagged(nb, "history"))
    assert "train_loss" in history and "val_mse_de" in history
    assert "AnnData object with n_obs × n_vars = 1 × 500" in _outputs_text(_tagged(nb, "predict"))
    assert any("image/png" in o.get("data", {}) for o in _tagged(nb, "plot").outputs), \
        "the pair's plot is missing (did a library call switch matplotlib to a non-inline backend?)"
    shown = _outputs_text(_tagged(nb, "evaluate")) + _outputs_text(_tagged(nb, "evaluate-pivot"))
    assert all(name in shown for name in {"gears", *BASELINES}), shown[:2000]

    # everything written went to the working folder: the store, the run (and MLflow's files), the evaluation table
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([NOTEBOOK.name, "outputs"])
    assert (work / "norman.zarr").is_dir() and len(list((work / "runs").iterdir())) == 1
    assert (next((work / "runs").iterdir()) / "model").is_dir()
    table = pd.read_csv(work / "evaluation.csv")
    assert set(table["predictor"]) == {"gears", *BASELINES}
    assert {"all", "unseen_single"} <= set(table["category"])
    assert set(table.loc[table["predictor"] == "gears", "category"]) == set(table["category"])
    assert table.loc[table["predictor"] == "gears", "mse_de"].notna().all()
