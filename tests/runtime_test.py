"""The entry points' re-exec with huge pages: once, with the same arguments, and off on request."""

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
  runtime.reexec_with_huge_pages(environ, lambda *args: calls.append(args))
  return calls


@needs_glibc
def test_reexecs_the_same_command_with_the_tunable_added_to_the_others():
  (call,) = _execve_calls({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
  executable, argv, env = call
  assert executable == sys.executable
  assert argv == sys.orig_argv
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert env["HOME"] == "/h"
  (call,) = _execve_calls({})
  assert call[2]["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_does_nothing_when_set_already_or_turned_off():
  assert not _execve_calls({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
  assert not _execve_calls({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})  # the user's choice
  assert not _execve_calls({runtime.HUGE_PAGES_OPT_OUT: "0"})


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
          runtime.reexec_with_huge_pages()
          print("running", sys.argv[1:], os.environ.get("GLIBC_TUNABLES"))
          """))
  env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(runtime.__file__).rsplit("/ttsi_jax/", 1)[0]}
  lines = subprocess.run(
      [sys.executable, str(script), "--x=1"], env=env, capture_output=True, text=True, check=True
  ).stdout.splitlines()
  assert lines == [
      "start ['--x=1'] None",
      "start ['--x=1'] glibc.malloc.hugetlb=1",
      "running ['--x=1'] glibc.malloc.hugetlb=1",
  ]
  env[runtime.HUGE_PAGES_OPT_OUT] = "0"
  lines = subprocess.run(
      [sys.executable, str(script)], env=env, capture_output=True, text=True, check=True
  ).stdout.splitlines()
  assert lines[0] == "start [] None" and len(lines) == 2
