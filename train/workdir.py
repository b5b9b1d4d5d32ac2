"""What keeps a workdir safe between runs: one run at a time (a lock file holding the host and
pid; a lock whose process is gone is stale and taken over), SIGTERM turned into a saved,
reported, non-zero exit, and the compilation cache a restart reads its programs from."""
import contextlib
import json
import os
import signal
import socket
from pathlib import Path

LOCK = ".lock"


class Locked(OSError):
  """Another live run holds the workdir."""


class Interrupted(Exception):
  """SIGTERM: the run saved a checkpoint at `step` and stopped early."""

  def __init__(self, step: int):
    super().__init__(f"interrupted at step {step}, checkpoint saved")
    self.step = step


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def _take(path: Path, me: dict) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    json.dump(me, f)
  return True


@contextlib.contextmanager
def lock(workdir: Path):
  """Holds WORKDIR/.lock for the block (process 0 only: the other hosts follow it)."""
  import jax
  if jax.process_index() != 0:
    yield
    return
  path, me = workdir / LOCK, {"host": socket.gethostname(), "pid": os.getpid()}
  while not _take(path, me):
    try:
      holder = json.loads(path.read_text())
      host, pid = holder["host"], int(holder["pid"])
    except (OSError, ValueError, KeyError, TypeError):  # torn by a kill while being written
      host, pid = me["host"], -1
    if host == me["host"] and (pid < 0 or not _alive(pid)):
      path.unlink(missing_ok=True)  # stale: its run is gone
      continue
    raise Locked(f"{workdir} is in use by another run (pid {pid} on {host}, lock file {path}); "
                 f"wait for it, or delete the lock file if that run is dead")
  try:
    yield
  finally:
    path.unlink(missing_ok=True)


def remove_if_empty(workdir: Path) -> None:
  """Removes `workdir` when it holds no file (only empty folders)."""
  if workdir.is_dir() and not any(p.is_file() for p in workdir.rglob("*")):
    import shutil
    shutil.rmtree(workdir, ignore_errors=True)


class Sigterm:
  """Notes SIGTERM (a scheduler's preemption notice) for the loop to save and stop."""

  def __init__(self):
    self.received = False
    self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def close(self):
    signal.signal(signal.SIGTERM, self.previous)


def use_compile_cache(path) -> Path | None:
  """jax's persistent compilation cache in `path` (None: off), every program: a restarted run
  reads them back instead of compiling, wherever the cache has moved since. A cache the process
  already has (JAX_COMPILATION_CACHE_DIR, or set by a caller) wins. Returns where the run's
  exported train step goes (`train.step_cache`): `path`/steps, or None when `path` is None."""
  import jax
  if path is None:
    return None
  steps = Path(path) / "steps"
  if jax.config.jax_compilation_cache_dir:
    return steps
  Path(path).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(Path(path).absolute()))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # jax's default also keeps XLA's GPU autotune cache under the cache dir, and so puts that dir's
  # path into every key: a workdir copied or mounted elsewhere would miss every entry. The
  # compiled programs already hold their autotuned choices.
  jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
  return steps
