"""How every command reports errors: an expected error (bad recipe, data, checkpoint, path or
value) is one line on stderr and exit code 2; `--debug` shows its traceback instead. Any other
exception is a bug and keeps its traceback."""
import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Callable

# ValueError covers ConfigError, CheckpointError, OutputError and JSON errors; OSError covers
# missing files and full disks; FloatingPointError is a diverged run (train/health.py).
EXPECTED = (ValueError, OSError, FloatingPointError)


def one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def run(prog: str, fn: Callable[[], int], debug: bool = False) -> int:
  """`fn()`'s exit code, or 2 after printing an expected error as one line."""
  try:
    return fn()
  except EXPECTED as e:
    if debug:
      raise
    print(f"{prog}: {one_line(e)}", file=sys.stderr)
    return 2


def add_debug(parser) -> None:
  parser.add_argument("--debug", action="store_true",
                      help="show the traceback of an expected error instead of one line")


class Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one line too (`PROG: error: ...`, exit code 2)."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def exec_with_huge_pages() -> None:
  """Runs this command again, once, in a process whose glibc malloc backs its large blocks with
  transparent huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, read only at process start).

  XLA:CPU allocates a step's temporaries afresh every step (the bench step: one 1.7 GB block and
  ~20 of 32 MiB, each a new mmap), so on 4 KiB pages each step takes ~560k page faults and ~1.7 s
  of kernel time; with huge pages ~20k (README, "Step efficiency"). Nothing happens off Linux/glibc,
  with THP off, when GLIBC_TUNABLES already names hugetlb, or with LLAMA4_HUGE_PAGES=0."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if (sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or "hugetlb" in tunables
      or os.environ.get("LLAMA4_HUGE_PAGES") == "0" or not THP.is_file()
      or "[never]" in THP.read_text()):
    return
  env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, HUGE_PAGES)))}
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
