"""How every command reports errors: an expected error (bad recipe, data, checkpoint, path or
value) is one line on stderr and exit code 2; `--debug` shows its traceback instead. Any other
exception is a bug and keeps its traceback."""
import argparse
import sys
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
