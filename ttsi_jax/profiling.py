"""Where a jitted call's time goes: a `jax.profiler` trace of a few calls, each moment of wall time
shared among the XLA ops running at that moment, grouped by what the ops are and by their names in
the model.

Why wall time shared out, not each op's duration: XLA runs independent ops side by side (the gate
and up matmuls, one per core), and a C++ kernel's helpers run on pool threads that the trace does
not show; summed durations then count some seconds twice and miss others. Shared out, the table's
seconds add up to the calls' wall time (less the moments with no op running).

  table = profiling.op_table(jitted_fn, *args, calls=2)   # `python -m ttsi_jax.bench --profile`
  profiling.print_table(table)
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

MATMUL = "matmul"
SCAN_COPIES = "layer scan copies"
OTHER = "elementwise and other"
ATTENTION = "attention kernels"
COPIES = "memory copies"


class TraceError(RuntimeError):
  """The profiler's trace could not be read into a table (none written, or none of its events
  name the program's ops)."""


def _hlo_ops(hlo_text: str) -> dict[str, str]:
  """The compiled module's instructions by name: name -> the line that defines it. A fusion
  without metadata of its own (XLA:GPU's) gets its fused computation's op_name: its root's, or
  where XLA made the root (a convert it inserted), the first one inside."""
  ops, named, computation = {}, {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"\s*(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if header and " = " not in line:
      computation = header.group(1)
    m = re.match(r"\s*(ROOT )?%?([\w.\-]+) = ", line)
    if m:
      ops.setdefault(m.group(2), line)
      op_name = re.search(r'op_name="[^"]*"', line)
      if op_name and (m.group(1) or computation not in named):
        named[computation] = op_name.group(0)
  for name, line in ops.items():
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if called and "op_name=" not in line and called.group(1) in named:
      ops[name] = f"{line}, metadata={{{named[called.group(1)]}}}"
  return ops


def _readable(op_name: str) -> str:
  """JAX's op_name metadata, less the wrappers: "forward/layers/mlp/up_proj/dot_general"."""
  op_name = re.sub(r"^jit\([^)]*\)/", "", op_name)
  op_name = re.sub(r"transpose\(jvp\([^)]*\)\)", "backward", op_name)
  op_name = re.sub(r"jvp\([^)]*\)", "forward", op_name)
  for wrapper in ("while/body/", "closed_call/", "checkpoint/", "rematted_computation/"):
    op_name = op_name.replace(wrapper, "")
  return op_name


def classify(line: str) -> tuple[str, str]:
  """(kind, readable op name) of one compiled HLO instruction."""
  m = re.search(r'op_name="([^"]*)"', line)
  op_name = _readable(m.group(1)) if m else re.sub(r"^(ROOT )?%", "", line.split(" = ")[0].strip())
  target = re.search(r'custom_call_target="([^"]*)"', line)
  if target and target.group(1).startswith("__cublas"):  # XLA:GPU's cuBLAS and cuBLASLt gemms
    return MATMUL, op_name
  if target and target.group(1).startswith("__cudnn$fmha"):  # cuDNN flash attention
    return ATTENTION, op_name
  if target:
    return target.group(1), op_name
  if re.search(r"(^|/)dot_general$", op_name) or " dot(" in line or " convolution(" in line:
    return MATMUL, op_name
  if "dynamic_update_slice" in op_name or "dynamic_slice" in op_name:
    return SCAN_COPIES, op_name
  return OTHER, op_name


def op_table(fn, *args, calls: int = 2, trace_dir: str | None = None, **kwargs) -> dict:
  """Traces `calls` calls of the jitted `fn(*args, **kwargs)` (after one warm-up call; each call
  gets its own copy of the arrays, so `fn` may donate them) and returns {"wall_s", "idle_s",
  "kinds": {kind: s}, "ops": [(kind, op name, s)]} in seconds per call. The trace is kept in
  `trace_dir` when given (open it in Perfetto), with the compiled HLO beside it
  (compiled_hlo.txt: the instructions the trace's op and kernel names refer to), else in a
  temporary folder."""
  compiled = fn.lower(*args, **kwargs).compile().as_text()
  module = re.match(r"HloModule ([\w.\-]+)", compiled).group(1)
  hlo = _hlo_ops(compiled)
  if trace_dir:
    os.makedirs(trace_dir, exist_ok=True)
    with open(os.path.join(trace_dir, "compiled_hlo.txt"), "w") as f:
      f.write(compiled)

  def call():
    fresh = jax.block_until_ready(jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*fresh, **kwargs))
    return time.perf_counter() - start

  call()
  with tempfile.TemporaryDirectory() as temporary:
    trace_dir = trace_dir or temporary
    jax.profiler.start_trace(trace_dir)
    try:
      wall = sum(call() for _ in range(calls)) / calls
    finally:
      jax.profiler.stop_trace()
    paths = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    if not paths:
      raise TraceError(
          "jax.profiler wrote no perfetto trace (*.trace.json.gz): this JAX cannot profile here."
      )
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
      events = json.load(f)["traceEvents"]
  shared_us = share_wall_time(events, module, set(hlo))
  kinds, ops = collections.Counter(), collections.Counter()
  for name, us in shared_us.items():
    kind, op_name = classify(hlo[name]) if name in hlo else classify_kernel(name)
    kinds[kind] += us / 1e6 / calls
    ops[(kind, op_name)] += us / 1e6 / calls
  return {
      "wall_s": wall,
      "idle_s": max(0.0, wall - sum(kinds.values())),
      "kinds": dict(kinds.most_common()),
      "ops": [(kind, name, s) for (kind, name), s in ops.most_common()],
  }


def classify_kernel(name: str) -> tuple[str, str]:
  """(kind, name) of a GPU kernel that is no instruction of the compiled module: a library's
  (cuBLAS, cuDNN) or a copy, launched from inside an XLA command buffer (a CUDA graph)."""
  if re.search(r"cudnn|sdpa|fmha|flash", name):  # first: cuDNN's kernels may be cutlass-named
    return ATTENTION, name
  if re.match(r"(nvjet|cutlass|sm\d+_xmma|ampere_|hopper_)|.*gemm", name):
    return MATMUL, name
  if re.match(r"(?i)mem(cpy|set)", name):
    return COPIES, name
  return OTHER, name


def share_wall_time(events: list[dict], module: str, ops: set[str]) -> collections.Counter:
  """Microseconds of each op of `module` in a perfetto trace's events, each moment shared among
  the ops running then. Where the trace has accelerator processes ("/device:GPU:0", ...), only
  their events count: the host's events for the same ops are launches, not the work. An event of
  an XLA:GPU command buffer (hlo_op "command_buffer_N", one CUDA graph of many kernels) counts for
  its kernel: a fusion by its instruction's name, a library's kernel by its own name."""
  devices = {
      e["pid"]
      for e in events
      if e.get("ph") == "M" and e.get("name") == "process_name"
      and str((e.get("args") or {}).get("name", "")).startswith("/device:")
  }  # fmt: skip
  edges = []  # (time, +1 start / -1 end, op) of this module's ops
  for e in events:
    where = e.get("args") or {}
    if devices and e.get("pid") not in devices:
      continue
    if e.get("ph") != "X" or where.get("hlo_module") != module:
      continue
    op = where.get("hlo_op")
    if devices and str(op).startswith("command_buffer"):
      if e["name"] == op:  # the whole graph, where a trace shows it: its kernels count
        continue
      op = e["name"]  # a kernel of the graph: a fusion's instruction, or a library's kernel
    elif op not in ops:
      continue
    edges += [(e["ts"], 1, op), (e["ts"] + e["dur"], -1, op)]
  if not edges:
    searched = "The trace's device processes" if devices else "The trace"
    raise TraceError(
        f"{searched} hold no op of {module} (no events with its hlo_module and hlo_op): "
        "read the trace itself (op_table's trace_dir, bench --trace_dir) in Perfetto."
    )
  edges.sort()
  running = collections.Counter()
  shared = collections.Counter()
  last = edges[0][0]
  for t, change, op in edges:
    now = [name for name, n in running.items() if n > 0]
    for name in now:
      shared[name] += (t - last) / len(now)
    last = t
    running[op] += change
  return shared


def print_table(table: dict, top: int = 25) -> None:
  """Prints the kinds, then the `top` ops, in seconds per call and shares of the wall time."""
  wall = table["wall_s"]
  print(f"wall {wall:.3f} s per call (no op running: {table['idle_s']:.3f} s)")
  print(f"{'kind':<28}{'s/call':>9}{'share':>8}")
  for kind, s in table["kinds"].items():
    print(f"{kind:<28}{s:>9.3f}{s / wall:>8.1%}")
  print(f"{'s/call':>9}{'share':>8}  {'kind':<24}op")
  for kind, name, s in table["ops"][:top]:
    print(f"{s:>9.3f}{s / wall:>8.1%}  {kind:<24}{name}")
