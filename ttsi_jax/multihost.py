"""Several hosts, one run: each host (JAX process) is one group of the data axis.

A host holds the whole model on its own devices (its local mesh shards it over fsdp / tensor) and
runs its own waves: in each round of `process_count` pending waves, host p runs the p-th. The
round's records are then gathered to every host, and host 0 alone writes them, in wave order, so
results.jsonl never holds a wave twice (and saves the adapters the run keeps). Hosts exchange
records (JSON) and kept adapters (msgpack) through `multihost_utils` collectives; on one process
every function here is a no-op.

A host whose step raises still joins the step's collectives (`guarded`), so every host learns of
it and stops, instead of the others waiting in the next collective until JAX's timeout.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Optional, Sequence

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
  sizes = np.asarray(multihost_utils.process_allgather(np.array([min(len(array), limit)], np.int32)))[:, 0]
  if (sizes >= limit).any():
    raise ValueError(
        f"A host has 2 GiB or more to gather (bytes per host: {sizes.tolist()}); keep "
        "fewer adapters (config.keep_adapters: chosen ids rather than all)."
    )
  buffer = np.zeros(max(int(sizes.max()), 1), np.uint8)
  buffer[: len(array)] = array
  gathered = np.asarray(multihost_utils.process_allgather(buffer))
  return [bytes(row[:size]) for row, size in zip(gathered, sizes)]


def allgather_json(value: Any) -> list:
  """[value of host 0, value of host 1, ...] on every host (JSON-serialisable values)."""
  if jax.process_count() == 1:
    return [value]
  return [json.loads(data) for data in allgather_bytes(json.dumps(value).encode())]


def allgather_trees(trees: list) -> list[list]:
  """[list of host 0, list of host 1, ...] on every host, for lists of pytrees of numpy arrays /
  strings / numbers (e.g. the adapters each host trained, for host 0 to save)."""
  if jax.process_count() == 1:
    return [list(trees)]
  gathered = allgather_bytes(serialization.msgpack_serialize({"trees": list(trees)}))
  return [list(serialization.msgpack_restore(data)["trees"]) for data in gathered]


def from_leader(value: Any) -> Any:
  """Host 0's value, on every host."""
  return allgather_json(value)[0]


class HostFailure(RuntimeError):
  """Raised on the hosts whose step went well when another host's step raised."""


@dataclasses.dataclass
class Failure:
  """A step that raised on some host, as every host sees it."""

  host: int  # the first host (in host order) whose step raised
  message: str  # its exception, as "Type: message"
  own: Optional[BaseException]  # this host's own exception, if its step raised too

  def throw(self, what: str):
    """Re-raises this host's own exception, or HostFailure naming the host that failed `what`."""
    if self.own is not None:
      raise self.own
    raise HostFailure(f"Host {self.host} failed {what}: {self.message}")


def guarded(step: Callable[[], Any]) -> tuple[Any, Optional[Failure]]:
  """(step() or None if it raised here, None or the Failure if it raised on any host). Every host
  must call it for the same step: it joins one small collective whether or not the step raised."""
  try:
    value, error = step(), None
  except BaseException as e:  # pylint: disable=broad-except  (re-raised by Failure.throw)
    # Also an interrupt (Ctrl-C, SIGTERM turned SystemExit) on one host: the others learn of it
    # here instead of waiting in the next collective.
    value, error = None, e
  messages = allgather_json(None if error is None else f"{type(error).__name__}: {error}")
  failed = [h for h, m in enumerate(messages) if m is not None]
  return value, (Failure(failed[0], messages[failed[0]], error) if failed else None)


def on_leader(step: Callable[[], Any], what: str) -> Any:
  """step() run by host 0 alone (e.g. writing the workdir), its JSON value on every host; if it
  raises, every host raises (HostFailure naming `what` on the others)."""
  value, failure = guarded(step if is_leader() else lambda: None)
  if failure:
    failure.throw(what)
  return from_leader(value)


def rounds(pending: Sequence[int], num_hosts: int) -> list[list[int]]:
  """Pending wave indices in rounds of `num_hosts`: host p runs the p-th wave of each round."""
  return [list(pending[i : i + num_hosts]) for i in range(0, len(pending), num_hosts)]
