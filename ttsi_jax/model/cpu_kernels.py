"""The C++ kernels of XLA:CPU training, prefill and decoding, built once per machine and called
through `jax.ffi`.

XLA:CPU has no fused attention, it runs the per-block rank-R products of packed LoRA rows as
small batched dots far below matmul speed, and its float32 dot trails OpenBLAS's by 15-20%.
`cpu_attention.cc` (flash attention, forward and backward; attention over a layer of the KV cache
where it lies), `cpu_lora.cc` (the LoRA branch of packed rows and its gradients) and
`cpu_matmul.cc` (float32 linear layers through OpenBLAS, from the `scipy-openblas32` wheel) do that
work on XLA's intra-op threads. They are compiled once per machine with the system's C++ compiler
into a cache folder and loaded from there; where no compiler works, `available()` says why and the
model keeps XLA's ops. `cpu_attention.py`, `cpu_lora.py` and `cpu_matmul.py` hold the ops.

`uninitialized_scan_outputs` is not a kernel but rides on the same library: a layer scan's stacked
outputs in buffers that nobody zero-fills first.

`TTSI_JAX_CPU_KERNELS=xla` turns the kernels off; `xla_ops()` does so for a block (the bench times
both in one run).
"""

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import inspect
import itertools
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jaxlib
from jax._src.lax.control_flow import loops as jax_loops

SOURCES = tuple(
    pathlib.Path(__file__).with_name(name) for name in ("cpu_attention.cc", "cpu_lora.cc", "cpu_matmul.cc")
)
HEADER = pathlib.Path(__file__).with_name("cpu_kernels.h")  # what the sources share
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno", "-w")
_TARGETS = {
    "ttsi_attention_forward": "TtsiAttentionForward",
    "ttsi_attention_backward": "TtsiAttentionBackward",
    "ttsi_cache_attention": "TtsiCacheAttention",
    "ttsi_lora_narrow": "TtsiLoraNarrow",
    "ttsi_lora_wide": "TtsiLoraWide",
    "ttsi_lora_wide_add": "TtsiLoraWideAdd",
    "ttsi_lora_wide_grads": "TtsiLoraWideGrads",
    "ttsi_lora_outer": "TtsiLoraOuter",
    "ttsi_matmul": "TtsiMatmul",
    "ttsi_matmul_real_rows": "TtsiMatmulRealRows",
    "ttsi_uninitialized": "TtsiUninitialized",
}


def cache_dir() -> pathlib.Path:
  """Where the compiled kernels live: `$TTSI_JAX_KERNEL_DIR`, else ~/.cache/ttsi_jax/kernels."""
  return pathlib.Path(
      os.environ.get("TTSI_JAX_KERNEL_DIR") or pathlib.Path.home() / ".cache/ttsi_jax/kernels"
  )


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _blas_flags() -> list[str]:
  """Compiler flags that link OpenBLAS from the `scipy-openblas32` wheel (`cpu_matmul.cc`)."""
  import scipy_openblas32  # here: without it the kernels are off, not the package

  lib_dir = scipy_openblas32.get_lib_dir()
  return [
      f"-I{scipy_openblas32.get_include_dir()}",
      f"-L{lib_dir}",
      f"-Wl,-rpath,{lib_dir}",
      "-lscipy_openblas",
  ]


def _cpu_identity() -> str:
  """The CPU's model and instruction-set flags (Linux), so that a library built with
  `-march=native` is never loaded on another CPU under the same host name (a resized VM)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().splitlines()
  except OSError:
    return platform.processor()
  first = {}
  for line in lines:
    name, _, value = line.partition(":")
    first.setdefault(name.strip(), value.strip())
  return f"{first.get('model name', '')}\n{first.get('flags', '')}"


def _build(compiler: str) -> pathlib.Path:
  """The kernels' shared library, compiled unless the cache holds one for these sources, compiler,
  jaxlib, OpenBLAS and machine (`-march=native`: a library is only valid on the CPU that built it)."""
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
  blas_flags = _blas_flags()
  key = hashlib.sha256(
      "\n".join(
          [
              *(source.read_text() for source in (*SOURCES, HEADER)),
              version,
              " ".join(_FLAGS + tuple(blas_flags)),
              importlib.metadata.version("scipy-openblas32"),
              jaxlib.__version__,
              platform.machine(),
              platform.node(),
              _cpu_identity(),
          ]
      ).encode()
  ).hexdigest()[:16]
  path = cache_dir() / f"cpu_kernels-{key}.so"
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # atomic: concurrent processes
      out = pathlib.Path(tmp) / path.name
      cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), *blas_flags, "-o", str(out)]
      result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)  # a hung compiler
      if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
      os.replace(out, path)
  return path


@functools.cache
def _load() -> str | None:
  """Builds and registers the kernels; returns None, or why they are not available."""
  choice = os.environ.get("TTSI_JAX_CPU_KERNELS", "fused")
  if choice not in ("fused", "xla"):
    raise ValueError(f"TTSI_JAX_CPU_KERNELS={choice!r}: set it to 'fused' (the C++ kernels) or 'xla'.")
  if choice == "xla":
    return "TTSI_JAX_CPU_KERNELS=xla"
  compiler = _compiler()
  if compiler is None:
    return "no C++ compiler found (install g++ or set CXX)"
  try:
    library = ctypes.CDLL(str(_build(compiler)))
  except ImportError as e:
    return f"OpenBLAS for the linear layers is missing ({e}): pip install scipy-openblas32"
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    return f"the kernels did not build: {e}"
  try:
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  except (AttributeError, TypeError, ValueError, RuntimeError) as e:  # a stale library, another jax
    return f"the kernels did not register: {e}"
  return None


_disabled = False


@contextlib.contextmanager
def xla_ops():
  """XLA's own ops in place of the kernels inside this block. Clears JAX's caches on entry and
  exit: the choice is made when a function is traced."""
  global _disabled
  jax.clear_caches()
  _disabled = True
  try:
    yield
  finally:
    _disabled = False
    jax.clear_caches()


def available() -> bool:
  """Whether the kernels serve the CPU backend (built on first call; logs why not once)."""
  if _disabled:
    return False
  reason = _load()
  if reason is not None:
    _warn_once(reason)
  return reason is None


@functools.cache
def _warn_once(reason: str) -> None:
  logging.warning(
      "CPU attention, packed LoRA and float32 linear layers run on XLA ops, not the C++ kernels: %s", reason
  )


def require() -> None:
  reason = _load()
  if reason is not None:
    raise RuntimeError(f"The C++ CPU kernels are not available: {reason}.")


_EMPTY_ARRAY_ARGS = ["prefix", "length_spec", "aval"]  # jax 0.10's `loops._empty_array`


@contextlib.contextmanager
def uninitialized_scan_outputs(single_device: bool):
  """Functions lowered inside this block stack their scans' per-iteration outputs in uninitialized
  buffers, where the kernels serve the CPU backend and the caller says its computation runs on one
  device (sharded, an unfilled buffer without a sharding could be laid out replicated).

  Why: under `jax.grad`, the layer scan stacks the activations its backward pass keeps ([L, T, ...]
  per saved tensor, 2.1 GB for the bench's 4-adapter step). JAX lowers each stack as a broadcast
  of zeros (`loops._empty_array`; it would use `lax.empty`, which XLA:CPU fills with zeros too),
  and XLA then copies the zeros once per stack that shares them; the scan overwrites every slot
  anyway. An empty custom call allocates without writing (bit-identical results; measured in
  docs/measured.md, "The layer scan's saved activations"). This replaces a private JAX function
  while the block runs, for the lowering that happens inside it (a jitted function's first call
  of a shape): elsewhere (several devices, another backend, no kernels, a JAX without that
  function or with another signature for it) nothing changes.
  """
  original = getattr(jax_loops, "_empty_array", None)
  known = original is not None and list(inspect.signature(original).parameters) == _EMPTY_ARRAY_ARGS
  if not single_device or not known or jax.default_backend() != "cpu" or not available():
    yield
    return
  index = itertools.count()

  def _empty_array(prefix, length_spec, aval):
    if getattr(getattr(aval, "mat", None), "varying", None):  # inside shard_map: JAX's own
      return original(prefix, length_spec, aval)
    shape = jax.ShapeDtypeStruct((*prefix, *aval.shape), aval.dtype)
    return jax.ffi.ffi_call("ttsi_uninitialized", shape)(index=next(index))

  jax_loops._empty_array = _empty_array
  try:
    yield
  finally:
    jax_loops._empty_array = original
