"""Helpers for the bad-input and fault tests: what a directory holds, and one-line errors."""
import hashlib
from pathlib import Path


def snapshot(root: Path) -> dict[str, str]:
  """relative path -> content hash of every file under `root` (folders as 'dir')."""
  root = Path(root)
  if not root.exists():
    return {}
  out = {}
  for p in sorted(root.rglob("*")):
    rel = str(p.relative_to(root))
    out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
  return out


def one_line_error(err: str, prog: str) -> str:
  """The single `prog: ...` line of a command's stderr (and no traceback)."""
  assert "Traceback" not in err, err
  lines = [l for l in err.splitlines() if l.startswith(f"{prog}:")]
  assert len(lines) == 1, err
  return lines[0]
