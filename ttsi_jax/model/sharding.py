"""Device mesh and logical-axis sharding rules for params, KV cache and batches.

Every param leaf gets logical axis names from `PARAM_AXES` (an unmatched param is an error, so a new
layer cannot silently end up replicated), and `RULES` maps logical axes onto the mesh axes
(data, fsdp, tensor). Where a rule's mesh axes do not divide a dimension, its trailing axes are
dropped until the rest do (batch 2 on data 2 x fsdp 4: sharded over data alone).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
from absl import logging
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (None: replicated)
RULES: dict[str, Optional[tuple[str, ...]]] = {
    "batch": ("data", "fsdp"),
    # The leading axis of stacked LoRA adapters and their optimizer states: each device keeps its
    # share of a wave's adapters (a 7B model's rank-8 adapter with its AdamW state is ~0.3 GB).
    "adapters": ("data", "fsdp", "tensor"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "layers": None,
    "norm": None,
    "head_dim": None,
    "seq": None,
}

# param path suffix -> logical axes (layer params carry the leading "layers" axis from nn.scan)
PARAM_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("embedding",): ("vocab", "embed"),
    ("norm", "scale"): ("norm",),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("input_norm", "scale"): ("layers", "norm"),
    ("post_attn_norm", "scale"): ("layers", "norm"),
    ("q_proj", "kernel"): ("layers", "embed", "heads"),
    ("k_proj", "kernel"): ("layers", "embed", "kv_heads"),
    ("v_proj", "kernel"): ("layers", "embed", "kv_heads"),
    ("o_proj", "kernel"): ("layers", "heads", "embed"),
    ("q_proj", "bias"): ("layers", "heads"),
    ("k_proj", "bias"): ("layers", "kv_heads"),
    ("v_proj", "bias"): ("layers", "kv_heads"),
    ("o_proj", "bias"): ("layers", "embed"),
    ("q_norm", "scale"): ("layers", "head_dim"),
    ("k_norm", "scale"): ("layers", "head_dim"),
    ("gate_proj", "kernel"): ("layers", "embed", "mlp"),
    ("up_proj", "kernel"): ("layers", "embed", "mlp"),
    ("down_proj", "kernel"): ("layers", "mlp", "embed"),
}


def make_mesh(shape: Optional[Sequence[int]] = None, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; default: every device on the fsdp axis. A shape of fewer devices
  than there are takes the first ones (e.g. (1, 1, 1): one device), and says so."""
  devices = list(devices if devices is not None else jax.devices())
  shape = tuple(shape) if shape else (1, len(devices), 1)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"Mesh shape {shape} needs one size per axis {MESH_AXES}, e.g. (1, 8, 1).")
  if min(shape) < 1:
    raise ValueError(f"Mesh shape {shape} needs a size of at least 1 per axis {MESH_AXES}.")
  size = int(np.prod(shape))
  if size > len(devices):
    raise ValueError(
        f"Mesh shape {shape} (data, fsdp, tensor) needs {size} devices "
        f"but {len(devices)} are available; make the product at most the device count."
    )
  if size < len(devices):
    logging.warning("Mesh shape %s uses %d of the %d devices: %s.", shape, size, len(devices), devices[:size])
    devices = devices[:size]
  # Auto axes: XLA propagates shardings from the placed params (no explicit-sharding typing).
  return jax.make_mesh(
      shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def logical_to_spec(
    mesh: Mesh, logical: Sequence[str], shape: Sequence[int], units: Optional[dict[str, int]] = None
) -> P:
  """The mesh axes of each dimension; `units` = {logical axis: how many whole units its dimension
  holds} (e.g. heads of a flattened heads x head_dim axis): such an axis splits only between units."""
  spec = []
  for name, dim in zip(logical, shape):
    if name not in RULES:
      raise KeyError(f"Logical axis {name!r} has no sharding rule; add it to RULES.")
    axes = tuple(a for a in (RULES[name] or ()) if mesh.shape[a] > 1)
    count = (units or {}).get(name, dim)
    while axes and count % int(np.prod([mesh.shape[a] for a in axes])):
      axes = axes[:-1]
    spec.append(axes or None)
  return P(*spec)


def head_units(config) -> dict[str, int]:
  """The units of the attention projections' flattened head axes: whole key heads, and for the
  query heads whole groups of them (those that share a key head), so that q, k and v split alike
  (cuDNN's attention refuses q, k, v split inside a head or unlike each other: 16 query heads over
  2 key heads would split q over tensor=4 and leave k whole)."""
  return {"heads": config.num_kv_heads, "kv_heads": config.num_kv_heads}


def param_logical_axes(path: Sequence[str]) -> tuple[str, ...]:
  for n in (2, 1):
    axes = PARAM_AXES.get(tuple(path[-n:]))
    if axes is not None:
      return axes
  raise KeyError(f"Param {'/'.join(path)} has no entry in PARAM_AXES; every param needs a " "sharding rule.")


def param_sharding(mesh: Mesh, path: Sequence[str], shape: Sequence[int], config=None) -> NamedSharding:
  """A param's sharding; with the model's `config`, attention heads stay whole (`head_units`)."""
  units = head_units(config) if config is not None else None
  return NamedSharding(mesh, logical_to_spec(mesh, param_logical_axes(path), shape, units))


def _path_names(key_path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def params_sharding(mesh: Mesh, params, config=None) -> dict:
  """NamedSharding for every leaf of a (possibly abstract) param tree (`param_sharding`)."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: param_sharding(mesh, _path_names(kp), x.shape, config), params
  )


def batch_sharding(mesh: Mesh, shape: Sequence[int], row_axis: int = 0) -> NamedSharding:
  """Axis `row_axis` over (data, fsdp); the rest replicated."""
  logical = ["seq"] * len(shape)
  logical[row_axis] = "batch"
  return NamedSharding(mesh, logical_to_spec(mesh, logical, shape))


def mesh_of(params) -> Optional[Mesh]:
  """The mesh placed params live on (None when they are not on a mesh)."""
  placed = getattr(jax.tree.leaves(params)[0], "sharding", None)
  return placed.mesh if isinstance(placed, NamedSharding) else None


def on_one_device(mesh: Optional[Mesh]) -> bool:
  """Whether a computation over params on this mesh (None: not on a mesh) runs on one device."""
  return mesh is None or mesh.size == 1


def fill_batch_shards(mesh: Optional[Mesh], size: int, logical: str = "batch") -> int:
  """`size` rounded up to a multiple of the ways the mesh splits a batch (data x fsdp; or the
  `logical` axis given). A batch that does not divide evenly would be split over fewer axes, or
  replicated, every device computing every row: padding rows instead costs each device at most as
  many rows, and far less compute in all."""
  shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in RULES[logical]]))
  return -(-size // shards) * shards


def constrain_adapters(tree, mesh: Optional[Mesh]):
  """Inside jit: every leaf of stacked adapters or their optimizer states (leading axis: the
  adapters) split over the mesh's "adapters" axes. A step's outputs so keep its inputs' sharding
  (left to propagation, a LoRA b took its base kernel's tensor split: the next call compiled
  again), and each device keeps only its share."""
  if on_one_device(mesh):
    return tree
  spec = lambda x: logical_to_spec(mesh, ("adapters",) + ("layers",) * (x.ndim - 1), x.shape)
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(x))), tree)


def shard_rows(mesh: Optional[Mesh], *arrays, row_axis: int = 0):
  """Arrays whose axis `row_axis` is the batch (or packed training rows), placed over the mesh's
  batch axes (data, fsdp): each device group computes its own rows. Without a mesh they stay as
  they are."""
  if on_one_device(mesh):
    return arrays
  return tuple(jax.device_put(x, batch_sharding(mesh, x.shape, row_axis)) for x in arrays)
