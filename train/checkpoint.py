"""Checkpoints with orbax's CheckpointManager: the train state and the data iterator together.

Saves are asynchronous (the device->host copy happens at `save`, files are written in the
background), kept by a LatestN policy, and restorable onto any mesh: the restore target is an
abstract state whose leaves carry the new shardings.
"""
import json
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from llama4_jax.config import text_to_hf
from train.config import CheckpointConfig, to_dict


def _flat(d: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}: differences are named down to the field."""
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
  return out


class Checkpointer:
  """A workdir's checkpoints. `restore_newest` falls back past a step that fails to restore: the
  step is reported and moved aside into `checkpoints.corrupt/` (never deleted)."""

  def __init__(self, directory: str | Path, cfg: CheckpointConfig, extra_metadata: dict):
    self.directory, self.every = Path(directory).absolute(), cfg.every
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=cfg.every, max_to_keep=cfg.keep,
        enable_async_checkpointing=cfg.async_save, create=True,
        cleanup_tmp_directories=True)  # a save torn by a kill is never committed: removed
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))
    self.metadata_file = self.directory / "run.json"
    self.extra_metadata = extra_metadata

  def agree(self, name: str, payload: dict) -> None:
    """Records `payload` as `name` beside the checkpoints, or checks it against the recorded one:
    a run cannot resume under settings its checkpoints were not trained with."""
    path = self.directory / name
    if path.exists():
      saved, now = _flat(json.loads(path.read_text())), _flat(json.loads(json.dumps(payload)))
      diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
      if diff:
        raise ValueError(f"{path}: these checkpoints were trained with different {diff} "
                         f"(saved {[saved.get(k) for k in diff]}, now {[now.get(k) for k in diff]})")
    elif jax.process_index() == 0:
      path.write_text(json.dumps(payload, indent=2))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `save(step)` will write (every `checkpoint.every` steps)."""
    return step % self.every == 0

  def restore_newest(self, abstract_state, data_iter):
    """(step, state) of the newest step that restores, or (0, None) when there is none. Every
    process resumes from the same step (checked)."""
    step = self.latest_step()
    while step:
      self._agree_step(step)
      try:
        return step, self.restore(step, abstract_state, data_iter)
      except Exception as e:  # orbax, tensorstore and grain each raise their own kinds
        if not isinstance(e, (ValueError, OSError, KeyError, TypeError, RuntimeError)):
          raise
        moved = self._quarantine(step)
        print(f"checkpoint step {step} cannot be restored ({' '.join(str(e).split())[:300]}); "
              f"moved to {moved}; trying the step before it", file=sys.stderr)
      step = self.latest_step()
    return 0, None

  def _agree_step(self, step: int) -> None:
    if jax.process_count() == 1:
      return
    steps = np.asarray(multihost_utils.process_allgather(np.int64(step))).ravel().tolist()
    if len(set(steps)) > 1:
      raise ValueError(f"{self.directory}: the processes see different newest checkpoints "
                       f"{steps} (is the workdir on a filesystem every host shares?)")

  def _quarantine(self, step: int) -> Path:
    aside = self.directory.parent / "checkpoints.corrupt" / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
      aside.parent.mkdir(exist_ok=True)
      (self.directory / str(step)).rename(aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"quarantine {step}")
    self.manager.reload()
    return aside

  def save(self, step: int, state, data_iter, force: bool = False) -> bool:
    if jax.process_index() == 0 and not self.metadata_file.exists():
      self.metadata_file.write_text(json.dumps(self.extra_metadata, indent=2))
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)),
        force=force)

  def restore(self, step: int, abstract_state, data_iter):
    """Restores `step` into `abstract_state`'s shapes and shardings; `data_iter` in place."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def model_key(cfg, model_cfg) -> dict:
  """What a checkpoint's shapes depend on (`checkpoints/model.json`): a run with other values
  cannot resume it."""
  return {"text": text_to_hf(model_cfg.text), "multimodal": model_cfg.vision is not None,
          "lora": None if cfg.lora is None else to_dict(cfg.lora)}
