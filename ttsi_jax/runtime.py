"""Process settings that only take effect from the start of a process, set by the entry points."""

import importlib.metadata
import os
import platform
import sys
from collections.abc import Callable, Mapping, MutableMapping

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_OPT_OUT = "TTSI_JAX_HUGE_PAGES"  # =0 keeps malloc's default pages
# No YNNPACK fusions of reductions on XLA:CPU (see `set_xla_cpu_flags`).
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce"
# The jaxlib releases where the flag is known and was measured: an XLA that does not know a flag
# in XLA_FLAGS exits at start.
YNN_FUSION_JAXLIB = ("0.10.",)
# Accelerator runtimes (TPU, CUDA, ROCm plugins) parse XLA_FLAGS with their own XLA build: where
# one is installed the flags are left alone (CPU-only settings gain nothing there).
ACCELERATOR_PACKAGES = ("libtpu", "jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm")


def _installed_packages() -> list[str]:
  return [d.metadata["Name"] or "" for d in importlib.metadata.distributions()]


def set_xla_cpu_flags(
    environ: MutableMapping[str, str] = os.environ,
    jaxlib_version: str | None = None,
    installed: list[str] | None = None,
) -> None:
  """Adds to XLA_FLAGS the XLA:CPU settings this project measured faster; call before JAX starts
  its backend (XLA reads the flags once).

  YNNPACK fusions that end in a reduction (the norms' sums of squares and their gradients,
  log_softmax's max) ran at 1-2 GB/s: a [3072, 576] multiply-and-sum took 9.6 ms. Without them the
  4-adapter packed training step took 2.72 instead of 2.85 s per adapter-step, the one-adapter step
  2.54 instead of 2.59 (README, "what is left"). Nothing changes on other backends, on jaxlib
  releases other than YNN_FUSION_JAXLIB, where an accelerator runtime is installed, or when
  XLA_FLAGS already sets the fusion types.
  """
  flags = environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" in flags:
    return
  installed = _installed_packages() if installed is None else installed
  if any(name.lower().startswith(ACCELERATOR_PACKAGES) for name in installed):
    return
  if jaxlib_version is None:
    try:
      jaxlib_version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
      return
  if jaxlib_version.startswith(YNN_FUSION_JAXLIB):
    environ["XLA_FLAGS"] = f"{flags} {YNN_FUSION_FLAG}".strip()


def reexec_with_huge_pages(
    environ: Mapping[str, str] = os.environ,
    execve: Callable[[str, list[str], dict[str, str]], None] = os.execve,
) -> None:
  """Re-runs this process once, with glibc's malloc asking for transparent huge pages.

  Why: on the CPU a training step allocates gigabytes of fresh temporaries, and with 4 KiB pages
  the kernel faults each one in. The 4-adapter packed step took 22.0 s with 5.5M page faults
  without it, 18.7 s with 170k faults with it (README, "what is left"). glibc reads
  GLIBC_TUNABLES only when a process starts, so an entry point has to re-execute itself.

  Does nothing off Linux/glibc, when a hugetlb tunable is already set (so it re-runs at most once,
  and a user's own setting wins) or when TTSI_JAX_HUGE_PAGES=0.
  """
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return
  if environ.get(HUGE_PAGES_OPT_OUT) == "0":
    return
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, HUGE_PAGES_TUNABLE) if t)
  sys.stdout.flush()
  sys.stderr.flush()
  execve(sys.executable, list(sys.orig_argv), env)
