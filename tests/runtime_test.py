"""The entry points' process settings: the re-exec with glibc malloc tunables (once, with the same
arguments, the user's own tunables kept, off on request; freed memory is then reused without page
faults) and the XLA:CPU flags."""

import mmap
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from ttsi_jax import runtime

_GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not _GLIBC_LINUX, reason="the tunable is glibc's, on Linux")


def _execve_calls(environ):
  calls = []
  runtime.reexec_with_malloc_tunables(environ, lambda *args: calls.append(args))
  return calls


@needs_glibc
def test_reexecs_the_same_command_with_the_tunables_added_to_the_users():
  (call,) = _execve_calls({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.foo=1", "HOME": "/h"})
  executable, argv, env = call
  assert executable == sys.executable
  assert argv == sys.orig_argv
  ours = [f"{k}={v}" for k, v in runtime.MALLOC_TUNABLES.items() if k != "glibc.malloc.arena_max"]
  assert env["GLIBC_TUNABLES"] == ":".join(["glibc.malloc.arena_max=2", "glibc.foo=1", *ours])  # theirs win
  assert env["HOME"] == "/h"
  (call,) = _execve_calls({})
  assert call[2]["GLIBC_TUNABLES"] == ":".join(f"{k}={v}" for k, v in runtime.MALLOC_TUNABLES.items())


def test_does_nothing_when_set_already_or_turned_off():
  every = ":".join(f"{k}=0" for k in runtime.MALLOC_TUNABLES)  # the user's choices
  assert not _execve_calls({"GLIBC_TUNABLES": every})
  assert not _execve_calls({runtime.MALLOC_OPT_OUT: "0"})


@needs_glibc
@pytest.mark.parametrize("setting", ["off", "false", ""])
def test_an_opt_out_spelt_otherwise_is_refused_naming_the_valid_values(setting):
  with pytest.raises(ValueError, match=rf"TTSI_JAX_MALLOC_TUNABLES='{setting}': set it to 0 .* or 1"):
    _execve_calls({runtime.MALLOC_OPT_OUT: setting})


def test_does_nothing_off_glibc(monkeypatch):
  monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))  # musl, say
  assert not _execve_calls({})
  monkeypatch.setattr(runtime.sys, "platform", "darwin")
  assert not _execve_calls({})


@needs_glibc
def test_a_real_process_reruns_once_with_its_arguments(tmp_path):
  script = tmp_path / "entry.py"
  script.write_text(textwrap.dedent("""
          import os, sys
          print("start", sys.argv[1:], os.environ.get("GLIBC_TUNABLES"), flush=True)
          from ttsi_jax import runtime
          runtime.reexec_with_malloc_tunables()
          print("running", sys.argv[1:], os.environ.get("GLIBC_TUNABLES"))
          """))
  env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(runtime.__file__).rsplit("/ttsi_jax/", 1)[0]}
  lines = subprocess.run(
      [sys.executable, str(script), "--x=1"], env=env, capture_output=True, text=True, check=True
  ).stdout.splitlines()
  ours = ":".join(f"{k}={v}" for k, v in runtime.MALLOC_TUNABLES.items())
  assert lines == ["start ['--x=1'] None", f"start ['--x=1'] {ours}", f"running ['--x=1'] {ours}"]
  env[runtime.MALLOC_OPT_OUT] = "0"
  lines = subprocess.run(
      [sys.executable, str(script)], env=env, capture_output=True, text=True, check=True
  ).stdout.splitlines()
  assert lines[0] == "start [] None" and len(lines) == 2


@needs_glibc
def test_with_the_tunables_freed_memory_is_reused_without_page_faults(tmp_path):
  """A 512 MiB block allocated, freed and allocated again: malloc's defaults unmap it and the
  second one is faulted in again; with the tunables the second comes back without faults."""
  script = tmp_path / "alloc.py"
  script.write_text(textwrap.dedent("""
          import resource, numpy as np
          from ttsi_jax import runtime
          runtime.reexec_with_malloc_tunables()
          faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
          block = np.ones(1 << 27, np.float32)
          del block
          before = faults()
          block = np.ones(1 << 27, np.float32)
          print(faults() - before)
          """))
  env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(runtime.__file__).rsplit("/ttsi_jax/", 1)[0]}
  second_faults = {}
  for setting in ("1", "0"):
    run = subprocess.run(
        [sys.executable, str(script)],
        env={**env, runtime.MALLOC_OPT_OUT: setting},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    second_faults[setting] = int(run.stdout.split()[-1])
  assert second_faults["0"] >= 200 and second_faults["1"] < 10, second_faults  # 2 MiB pages: 256


def test_xla_cpu_flags_are_added_to_the_users_on_the_measured_jaxlib():
  environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/d"}
  runtime.set_xla_flags(environ, jaxlib_version="0.10.2", installed=["jax", "jaxlib"])
  assert environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/d {runtime.YNN_FUSION_FLAG}"
  runtime.set_xla_flags(environ, jaxlib_version="0.10.2", installed=[])  # once only
  assert environ["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_xla_cpu_flags_leave_other_jaxlibs_accelerators_and_the_users_own_setting_alone():
  environ = {}
  runtime.set_xla_flags(environ, jaxlib_version="0.9.0", installed=["jax", "jaxlib"])
  assert environ == {}
  for plugin in ("libtpu", "jax-cuda12-plugin", "jax_rocm60_plugin"):
    environ = {}
    runtime.set_xla_flags(environ, jaxlib_version="0.10.2", installed=["jax", plugin])
    assert "ynn_fusion_type" not in environ.get("XLA_FLAGS", ""), plugin
  own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  runtime.set_xla_flags(own, jaxlib_version="0.10.2", installed=[])
  assert own == {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}


def test_cuda_dots_go_to_cublas_unless_the_user_says_otherwise():
  for plugin in ("jax-cuda12-plugin", "jax_cuda13_plugin"):
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    runtime.set_xla_flags(environ, jaxlib_version="0.10.2", installed=["jax", plugin])
    assert environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/d {runtime.CUDA_GEMM_FLAG}", plugin
    runtime.set_xla_flags(environ, installed=["jax", plugin])  # once only
    assert environ["XLA_FLAGS"].count("triton_gemm") == 1
  own = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
  runtime.set_xla_flags(own, installed=["jax-cuda12-plugin"])
  assert own == {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
  other = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm_int4=false"}  # another flag of the same prefix
  runtime.set_xla_flags(other, installed=["jax-cuda12-plugin"])
  assert other["XLA_FLAGS"] == f"--xla_gpu_enable_triton_gemm_int4=false {runtime.CUDA_GEMM_FLAG}"
  for other in ("libtpu", "jax_rocm60_plugin"):
    environ = {}
    runtime.set_xla_flags(environ, installed=["jax", other])
    assert environ == {}, other


def test_the_installed_xla_takes_the_flags_and_keeps_reductions_out_of_ynnpack():
  """A child process (XLA reads its flags once): a multiply-and-sum, which YNNPACK fuses by
  default, compiles without a YNNPACK fusion; an XLA that did not know the flag would exit."""
  code = textwrap.dedent("""
      import os
      from ttsi_jax import runtime
      if os.environ.get("WITH_FLAGS") == "1":
        runtime.set_xla_flags()
      import jax, jax.numpy as jnp
      x = jnp.ones((3072, 576))
      print(jax.jit(lambda x: jnp.sum(x * x, -1)).lower(x).compile().as_text().count("__ynn_fusion"))
      """)

  def ynn_fusions(with_flags: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["WITH_FLAGS"] = with_flags
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])

  here = {}
  runtime.set_xla_flags(here)
  if runtime.YNN_FUSION_FLAG not in here.get("XLA_FLAGS", ""):
    pytest.skip("the flag is set only on the measured jaxlib, without accelerator runtimes")
  assert ynn_fusions("0") >= 1
  assert ynn_fusions("1") == 0


@pytest.mark.skipif(sys.platform != "linux", reason="/proc is Linux's")
def test_memory_maps_counts_this_processs_mappings_against_the_kernels_limit(tmp_path):
  before, limit = runtime.memory_maps()
  assert limit == int(open("/proc/sys/vm/max_map_count").read()) and 0 < before < limit
  path = tmp_path / "mapped"
  path.write_bytes(b"\0" * mmap.PAGESIZE)
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ):
    assert runtime.memory_maps()[0] >= before + 1  # a file's mapping merges with no other
