"""Training health: steps whose loss or gradient norm is not finite.

The train step itself leaves params and optimizer state unchanged on such a step (train/step.py),
so nothing non-finite ever reaches a checkpoint. The host counts them as it reads each step's
metrics: up to `optim.skip_nonfinite` are skipped (recorded in metrics.jsonl as
`"nonfinite": 1`), the next one stops the run with `Diverged`. The loop reads a step's metrics
before saving the state that follows it, so a checkpoint is only written after the step that
produced it was checked.
"""
import math


class Diverged(FloatingPointError):
  """The run met more non-finite steps than the recipe allows."""


class Health:
  def __init__(self, allowed: int):
    self.allowed, self.skipped = allowed, 0

  def check(self, record: dict, newest_checkpoint: int | None) -> None:
    """Counts `record` if it is a non-finite step; raises Diverged past the allowance."""
    if not record.get("nonfinite"):
      return
    self.skipped += 1
    record["skipped_steps"] = self.skipped
    if self.skipped <= self.allowed:
      return
    values = ", ".join(f"{k} {record[k]}" for k in ("loss", "grad_norm")
                       if not math.isfinite(record[k]))
    allowance = (f" ({self.skipped - 1} skipped before it, optim.skip_nonfinite="
                 f"{self.allowed})" if self.allowed else " (optim.skip_nonfinite lets a run skip such steps)")
    kept = (f"newest checkpoint: step {newest_checkpoint}" if newest_checkpoint
            else "no checkpoint saved yet")
    raise Diverged(f"step {record['step']}: {values}; the run stopped{allowance} and saved "
                   f"nothing of that state; {kept}")
