"""notebooks/quickstart.ipynb runs from top to bottom (on a tiny model, so it never rots)."""

import re
from pathlib import Path

import pytest

from tests.test_cli_compress import make_tiny_with_tokenizer

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("torch")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path, smollm2):
    tiny = make_tiny_with_tokenizer(tmp_path / "tiny", smollm2, layers=2)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    # Injected after the parameters cell, as papermill does: the same notebook on a tiny model.
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
        f'MODEL = "{tiny}"\nCALIB_SAMPLES, CALIB_SEQLEN = 8, 32\nEVAL_WINDOWS = 2\nOUTPUT = "{tmp_path / "out"}"'))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "parameters" in text and "perplexity: dense" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    difference = float(re.search(r"largest difference: (\S+)", text).group(1))
    assert difference < 1e-4
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "modeling_modegpt.py").is_file()
