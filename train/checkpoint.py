"""Checkpoints with orbax's CheckpointManager: the train state and the data iterator together.

Saves are asynchronous (the device->host copy happens at `save`, files are written in the
background), kept by a LatestN policy, and restorable onto any mesh: the restore target is an
abstract state whose leaves carry the new shardings.
"""
import json
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from train.config import CheckpointConfig


class Checkpointer:
  def __init__(self, directory: str | Path, cfg: CheckpointConfig, extra_metadata: dict):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=cfg.every, max_to_keep=cfg.keep,
        enable_async_checkpointing=cfg.async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))
    self.metadata_file = self.directory / "run.json"
    self.extra_metadata = extra_metadata

  def agree(self, name: str, payload: dict) -> None:
    """Records `payload` as `name` beside the checkpoints, or checks it against the recorded one:
    a run cannot resume under settings its checkpoints were not trained with."""
    path = self.directory / name
    if path.exists():
      saved = json.loads(path.read_text())
      if saved != payload:
        diff = sorted(k for k in set(saved) | set(payload) if saved.get(k) != payload.get(k))
        raise ValueError(f"{path}: these checkpoints were trained with different {diff} "
                         f"(saved {[saved.get(k) for k in diff]}, now {[payload.get(k) for k in diff]})")
    elif jax.process_index() == 0:
      path.write_text(json.dumps(payload, indent=2))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

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
