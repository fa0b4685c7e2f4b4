"""Several hosts, one run: each host (JAX process) is one group of the data axis.

A host holds the whole model on its own devices (its local mesh shards it over fsdp / tensor) and
runs its own waves: in each round of `process_count` pending waves, host p runs the p-th. The
round's records are then gathered to every host, and host 0 alone writes them, in wave order, so
results.jsonl never holds a wave twice. Hosts exchange only small JSON values, through
`multihost_utils` collectives; on one process every function here is a no-op.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_leader() -> bool:
  """Host 0 reads and writes the workdir."""
  return jax.process_index() == 0


def allgather_json(value: Any) -> list:
  """[value of host 0, value of host 1, ...] on every host (JSON-serialisable values)."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32)))[:, 0]
  buffer = np.zeros(max(int(sizes.max()), 1), np.uint8)
  buffer[:len(data)] = data
  gathered = np.asarray(multihost_utils.process_allgather(buffer))
  return [json.loads(bytes(row[:size])) for row, size in zip(gathered, sizes)]


def from_leader(value: Any) -> Any:
  """Host 0's value, on every host."""
  return allgather_json(value)[0]


def rounds(pending: Sequence[int], num_hosts: int) -> list[list[int]]:
  """Pending wave indices in rounds of `num_hosts`: host p runs the p-th wave of each round."""
  return [list(pending[i:i + num_hosts]) for i in range(0, len(pending), num_hosts)]
