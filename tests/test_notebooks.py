"""Every notebook runs headless, top to bottom, at its small size (ALIGNAX_NOTEBOOK_SMALL=1).

Notebooks are jupytext percent-format `.py` files; each is converted and executed in a real
Jupyter kernel from the notebooks/ directory, as a person opening it in Jupyter would.
"""

import os
import pathlib

import jupytext
import nbclient
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9]*.py"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("ALIGNAX_FIGURES_DIR", str(tmp_path))  # keep the committed full-size ones
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # One CPU device in the kernel: the notebooks are single-host studies.
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    if flags.strip():
        monkeypatch.setenv("XLA_FLAGS", flags.strip())
    else:  # XLA reads a value without "--" as a file name and aborts
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    notebook = jupytext.read(path)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [out for cell in notebook.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, errors
    assert any(tmp_path.glob("*.png")), "the notebook saved no figure"
