"""Several hosts, one run: each host (JAX process) is one group of the data axis.

A host holds the whole model on its own devices (its local mesh shards it over fsdp / tensor) and
runs its own waves: in each round of `process_count` pending waves, host p runs the p-th. The
round's records are then gathered to every host, and host 0 alone writes them, in wave order, so
results.jsonl never holds a wave twice (and saves the adapters the run keeps). Hosts exchange
records (JSON) and kept adapters (msgpack) through `multihost_utils` collectives; on one process
every function here is a no-op.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import numpy as np
from flax import serialization
from jax.experimental import multihost_utils


def is_leader() -> bool:
  """Host 0 reads and writes the workdir."""
  return jax.process_index() == 0


def allgather_bytes(data: bytes) -> list[bytes]:
  """[data of host 0, data of host 1, ...] on every host."""
  if jax.process_count() == 1:
    return [data]
  array = np.frombuffer(data, np.uint8)
  limit = 2**31 - 1  # sizes travel as int32 (JAX without x64); every host sees an overflow
  sizes = np.asarray(multihost_utils.process_allgather(
      np.array([min(len(array), limit)], np.int32)))[:, 0]
  if (sizes >= limit).any():
    raise ValueError(f"A host has 2 GiB or more to gather (bytes per host: {sizes.tolist()}); keep "
                     "fewer adapters per wave (config.keep_adapters) or use a smaller wave_size.")
  buffer = np.zeros(max(int(sizes.max()), 1), np.uint8)
  buffer[:len(array)] = array
  gathered = np.asarray(multihost_utils.process_allgather(buffer))
  return [bytes(row[:size]) for row, size in zip(gathered, sizes)]


def allgather_json(value: Any) -> list:
  """[value of host 0, value of host 1, ...] on every host (JSON-serialisable values)."""
  if jax.process_count() == 1:
    return [value]
  return [json.loads(data) for data in allgather_bytes(json.dumps(value).encode())]


def allgather_trees(trees: list) -> list:
  """Every host's list of pytrees of numpy arrays / strings / numbers, concatenated in host order,
  on every host (e.g. the adapters each host trained, for host 0 to save)."""
  if jax.process_count() == 1:
    return list(trees)
  gathered = allgather_bytes(serialization.msgpack_serialize({"trees": list(trees)}))
  return [tree for data in gathered for tree in serialization.msgpack_restore(data)["trees"]]


def from_leader(value: Any) -> Any:
  """Host 0's value, on every host."""
  return allgather_json(value)[0]


def rounds(pending: Sequence[int], num_hosts: int) -> list[list[int]]:
  """Pending wave indices in rounds of `num_hosts`: host p runs the p-th wave of each round."""
  return [list(pending[i:i + num_hosts]) for i in range(0, len(pending), num_hosts)]
