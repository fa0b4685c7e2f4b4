"""Process settings that only take effect from the start of a process, set by the entry points."""

import os
import platform
import sys
from collections.abc import Callable, Mapping

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_OPT_OUT = "TTSI_JAX_HUGE_PAGES"  # =0 keeps malloc's default pages


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
