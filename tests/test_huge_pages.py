"""`llama4-train` re-executes itself once with glibc's huge-page tunable (train/cli.py)."""
import os
import subprocess
import sys

from train import cli

SHOW = ("from train import cli; cli.exec_with_huge_pages(); import os; "
        "print(os.environ.get('GLIBC_TUNABLES'))")
THP_ON = cli.THP.is_file() and "[never]" not in cli.THP.read_text()


def _tunables(**env) -> str:
  base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LLAMA4_HUGE_PAGES")}
  out = subprocess.run([sys.executable, "-c", SHOW], env={**base, **env}, check=True,
                       capture_output=True, text=True).stdout
  return out.strip()


def test_the_command_runs_again_with_huge_pages_keeping_other_tunables():
  expected = cli.HUGE_PAGES if THP_ON else "None"
  assert _tunables() == expected  # once: the re-executed process sees hugetlb and goes on
  assert _tunables(GLIBC_TUNABLES="glibc.malloc.check=0") == (
      "glibc.malloc.check=0:" + cli.HUGE_PAGES if THP_ON else "glibc.malloc.check=0")


def test_an_explicit_choice_is_left_alone():
  assert _tunables(LLAMA4_HUGE_PAGES="0") == "None"
  assert _tunables(GLIBC_TUNABLES="glibc.malloc.hugetlb=0") == "glibc.malloc.hugetlb=0"
