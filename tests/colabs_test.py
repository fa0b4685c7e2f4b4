"""Every notebook in colabs/ runs top to bottom (on CPU, with a tiny model and a small config).

The model is a Qwen2 checkpoint folder loaded in bfloat16, the settings the notebooks tell GPU users
to choose; the float32 default path is run by the end-to-end tests."""

import glob
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, tiny_qwen2_chat_model, monkeypatch):
  monkeypatch.setenv("TTSI_MODEL_PATH", tiny_qwen2_chat_model)
  monkeypatch.setenv("TTSI_NUM_EXAMPLES", "1")
  monkeypatch.setenv("TTSI_EPOCHS", "2")  # the first step has lr 0 (warmup), the second trains
  monkeypatch.setenv("TTSI_DTYPE", "bfloat16")
  # A random model is sure of its shortest candidate name: flag every input, so TT-SI and the
  # oracle train and a trained adapter is exported.
  monkeypatch.setenv("TTSI_TAU", "1.01")
  monkeypatch.setenv("TTSI_VALIDATE", "0")  # a random model's calls lack arguments: keep its pairs
  # One CPU device, as in a Colab; LLVM at -O0 as in the other tests (compiling dominates here).
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(
      notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": ROOT}}
  ).execute()
  outputs = "".join(
      o.get("text", "")
      for cell in notebook.cells
      if cell.cell_type == "code"
      for o in cell.get("outputs", [])
  )
  assert "margin" in outputs and "base/direct" in outputs and "oracle/direct" in outputs
  assert "oracle ✓" in outputs or "oracle ✗" in outputs  # an adapted answer is shown
  assert "trained on" in outputs and "TT-SI not adapted" not in outputs  # TT-SI trained and answered
  # The marks the notebook prints agree with the run's own metrics (one input: 100% or 0%).
  for variant, label in (("oracle", "oracle"), ("base", "base"), ("ttsi", "TT-SI")):
    right = re.search(rf"{variant}/direct\s+100\.0%", outputs) is not None
    assert f"{label} {'✓' if right else '✗'}" in outputs, variant
  assert "exporting" in outputs and "adapter_model.safetensors" in outputs  # a trained adapter
