"""Orbax checkpoints of param / adapter trees, always restored against a target sharding.

A checkpoint saved from any device layout restores onto any other (8 devices -> 1, 1 -> a mesh):
`restore` builds abstract arrays carrying the target shardings and lets orbax place each leaf.
Adapters are saved with a small JSON sidecar (scale, dropout, rank, shapes, base model) so
`python -m ttsi_jax.export` can rebuild them without the run's config.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding

from ttsi_jax.checkpoints.hf import CheckpointError
from ttsi_jax.model import lora as lora_lib
from ttsi_jax.model import sharding

ADAPTER_META = "adapter.json"


def _checkpointer(this_process_only: bool) -> ocp.StandardCheckpointer:
  """`this_process_only`: the calling process reads or writes alone, with no barrier with the
  other hosts (they are not taking part: in a multi-host run host 0 alone saves the adapters
  gathered from all hosts, and loads the sft baseline's)."""
  options = ocp.options.MultiprocessingOptions()
  if this_process_only:
    options = ocp.options.MultiprocessingOptions(
        primary_host=jax.process_index(), active_processes={jax.process_index()}
    )
  return ocp.StandardCheckpointer(multiprocessing_options=options)


def save(path: str, tree, this_process_only: bool = False) -> None:
  """Writes `tree` (any layout) to `path` and waits until it is on disk."""
  checkpointer = _checkpointer(this_process_only)
  checkpointer.save(os.path.abspath(path), tree, force=True)
  checkpointer.wait_until_finished()


def restore(path: str, like, shardings=None, this_process_only: bool = False):
  """`like`: a tree with the target shapes and dtypes (arrays or ShapeDtypeStructs); `shardings`:
  a matching tree of target shardings (default: everything on the first local device)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Checkpoint {path} does not exist.")
  if shardings is None:
    device = SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, like)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings)
  return _checkpointer(this_process_only).restore(os.path.abspath(path), target)


def restore_params(path: str, like, mesh: Optional[Mesh] = None, config=None):
  """Params restored onto `mesh` with the model's sharding rules (or onto one device); with the
  model's `config`, attention heads stay whole, as `checkpoints.load` places them."""
  return restore(path, like, sharding.params_sharding(mesh, like, config) if mesh is not None else None)


def save_adapter(path: str, adapter: lora_lib.Adapter, base_model: str) -> None:
  """Saved by host 0 alone, as numpy arrays (orbax writes numpy leaves from process 0 only)."""
  if jax.process_index() != 0:
    raise RuntimeError(
        "Adapters are saved by host 0: gather them there first " "(ttsi_jax.multihost.allgather_trees)."
    )
  save(os.path.join(path, "weights"), jax.device_get(adapter.weights), this_process_only=True)
  shapes = {
      module: {name: {ab: list(x.shape) for ab, x in pair.items()} for name, pair in targets.items()}
      for module, targets in adapter.weights.items()
  }
  meta = {
      "scale": adapter.scale,
      "dropout": adapter.dropout,
      "base_model": base_model,
      "rank": int(jax.tree.leaves(adapter.weights)[0].shape[-1]),
      "shapes": shapes,
  }
  meta_path = os.path.join(path, ADAPTER_META)
  with open(meta_path + ".tmp", "w") as f:  # swapped in whole, on disk before the run logs the wave
    json.dump(meta, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  os.replace(meta_path + ".tmp", meta_path)


def load_adapter(path: str) -> tuple[lora_lib.Adapter, dict]:
  """(adapter on the first local device, its metadata), read by the calling process alone (as
  adapters are saved)."""
  meta_path = os.path.join(path, ADAPTER_META)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
        f"{path} is not a saved adapter (no {ADAPTER_META}); adapters are "
        "saved by the main job with --config.keep_adapters."
    )
  redo = (
      "delete the folder and save the adapter again (the main job saves adapters with "
      "--config.keep_adapters; the sft baseline's is trained again when missing)."
  )
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    like = {
        module: {
            name: {ab: jax.ShapeDtypeStruct(tuple(shape), jax.numpy.float32) for ab, shape in pair.items()}
            for name, pair in targets.items()
        }
        for module, targets in meta["shapes"].items()
    }
    scale, dropout = float(meta["scale"]), float(meta["dropout"])
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(f"{meta_path} is corrupt ({type(e).__name__}: {e}): {redo}") from None
  try:
    weights = restore(os.path.join(path, "weights"), like, this_process_only=True)
  except Exception as e:  # orbax raises many kinds for missing or damaged files
    raise CheckpointError(
        f"{path}/weights cannot be restored as the adapter {ADAPTER_META} "
        f"describes ({type(e).__name__}: {str(e)[:300]}): {redo}"
    ) from None
  return lora_lib.Adapter(weights=weights, scale=scale, dropout=dropout), meta
