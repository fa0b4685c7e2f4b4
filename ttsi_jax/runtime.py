"""Process settings that only take effect from the start of a process, set by the entry points."""

import importlib.metadata
import os
import platform
import re
import sys
from collections.abc import Callable, Mapping, MutableMapping

# glibc malloc settings for XLA's per-step temporaries (see `reexec_with_malloc_tunables`): large
# blocks on transparent huge pages; one arena, no mmap'd blocks and no trimming, so memory a step
# frees is reused by the next one instead of going back to the kernel and being faulted in again.
MALLOC_TUNABLES = {
    "glibc.malloc.hugetlb": "1",
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 40),
}
MALLOC_OPT_OUT = "TTSI_JAX_MALLOC_TUNABLES"  # =0 keeps malloc's defaults
# No YNNPACK fusions of reductions on XLA:CPU (see `set_xla_flags`).
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce"
# The jaxlib releases where the flag is known and was measured: an XLA that does not know a flag
# in XLA_FLAGS exits at start.
YNN_FUSION_JAXLIB = ("0.10.",)
# XLA:GPU's dots on cuBLAS instead of autotuned Triton GEMM fusions (see `set_xla_flags`).
CUDA_GEMM_FLAG = "--xla_gpu_enable_triton_gemm=false"
CUDA_PACKAGES = ("jax-cuda", "jax_cuda")
# Accelerator runtimes (TPU, CUDA, ROCm plugins) parse XLA_FLAGS with their own XLA build: where
# one is installed the CPU flags are left alone (CPU-only settings gain nothing there).
ACCELERATOR_PACKAGES = ("libtpu", *CUDA_PACKAGES, "jax-rocm", "jax_rocm")


def _installed_packages() -> list[str]:
  return [d.metadata["Name"] or "" for d in importlib.metadata.distributions()]


def peak_memory_bytes() -> int | None:
  """The process's peak resident memory so far (the kernel's high-water mark), or None where the
  platform does not report it: each wave's records carry it, so that a run's growth shows."""
  try:
    import resource  # pylint: disable=import-outside-toplevel
  except ImportError:  # Windows
    return None
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def memory_maps() -> tuple[int, int] | None:
  """(memory mappings of this process now, the kernel's limit `vm.max_map_count`), or None where
  the platform does not say (not Linux)."""
  try:
    with open("/proc/self/maps", "rb") as maps, open("/proc/sys/vm/max_map_count") as limit:
      return sum(1 for _ in maps), int(limit.read())
  except (OSError, ValueError):
    return None


def set_xla_flags(
    environ: MutableMapping[str, str] = os.environ,
    jaxlib_version: str | None = None,
    installed: list[str] | None = None,
) -> None:
  """Adds to XLA_FLAGS the settings this project measured faster on the backend that is
  installed; call before JAX starts its backend (XLA reads the flags once). A flag the user's
  XLA_FLAGS already names keeps the user's value.

  CUDA (a jax-cuda plugin installed): dots go to cuBLAS, not Triton GEMM fusions. XLA autotunes
  each Triton fusion by compiling dozens of tile configurations: the 1.5B packed training step
  compiled in 110-118 s on an H200 with them (and 8 adapters' step not within 80 s more), in
  18-43 s (1 to 64 adapters) on cuBLAS, and one adapter's step ran as fast or faster (0.14-0.15
  against 0.15-0.16 s per call; docs/measured.md, "On an H200"). Turning off only the fusion autotuner
  still took 110 s; turning off autotuning altogether compiled in 20 s but ran 9x slower.

  CPU (jaxlib releases in YNN_FUSION_JAXLIB, no accelerator runtime installed): no YNNPACK
  fusions that end in a reduction (the norms' sums of squares and their gradients, log_softmax's
  max); they ran at 1-2 GB/s: a [3072, 576] multiply-and-sum took 9.6 ms. Without them the
  4-adapter packed training step took 2.72 instead of 2.85 s per adapter-step, the one-adapter
  step 2.54 instead of 2.59 (docs/measured.md, "What is left").
  """
  flags = environ.get("XLA_FLAGS", "")
  installed = [name.lower() for name in (_installed_packages() if installed is None else installed)]
  if any(name.startswith(CUDA_PACKAGES) for name in installed):
    if not re.search(r"--xla_gpu_enable_triton_gemm(=|\s|$)", flags):  # not ..._gemm_int4 &c.
      environ["XLA_FLAGS"] = f"{flags} {CUDA_GEMM_FLAG}".strip()
    return
  if "xla_cpu_experimental_ynn_fusion_type" in flags:
    return
  if any(name.startswith(ACCELERATOR_PACKAGES) for name in installed):
    return
  if jaxlib_version is None:
    try:
      jaxlib_version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
      return
  if jaxlib_version.startswith(YNN_FUSION_JAXLIB):
    environ["XLA_FLAGS"] = f"{flags} {YNN_FUSION_FLAG}".strip()


def reexec_with_malloc_tunables(
    environ: Mapping[str, str] = os.environ,
    execve: Callable[[str, list[str], dict[str, str]], None] = os.execve,
) -> None:
  """Re-runs this process once, with `MALLOC_TUNABLES` added to GLIBC_TUNABLES.

  Why: on the CPU a training step allocates gigabytes of fresh temporaries. With malloc's defaults
  the large ones are mmap'd and unmapped every step, or freed into per-thread arenas that give them
  back, and the kernel faults them in again, 4 KiB at a time: the 4-adapter packed step of the
  bench spent 0.7-4.9 s of system time in 210k page faults per step (more when steps of other
  shapes ran in between). With these tunables it faults nothing after its first run
  (docs/measured.md, "Malloc that keeps a step's memory"). The price: memory a run has freed
  stays with it until it exits. glibc reads GLIBC_TUNABLES only when a process starts, so an
  entry point has to re-execute itself.

  Does nothing off Linux/glibc, when every tunable is set already (so it re-runs at most once;
  a tunable the user set keeps the user's value) or when TTSI_JAX_MALLOC_TUNABLES=0.
  """
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return
  choice = environ.get(MALLOC_OPT_OUT, "1")
  if choice not in ("0", "1"):
    raise ValueError(
        f"{MALLOC_OPT_OUT}={choice!r}: set it to 0 (glibc's malloc defaults) or 1 (the tunables)."
    )
  if choice == "0":
    return
  tunables = environ.get("GLIBC_TUNABLES", "")
  present = {t.split("=")[0] for t in tunables.split(":") if t}
  missing = [f"{name}={value}" for name, value in MALLOC_TUNABLES.items() if name not in present]
  if not missing:
    return
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, *missing) if t)
  sys.stdout.flush()
  sys.stderr.flush()
  execve(sys.executable, list(sys.orig_argv), env)
