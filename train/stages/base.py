"""What every stage shares: the interface the loop, `llama4-plan` and the pipeline see, the batches
a stage's data becomes, and the held-out draw a stage is measured on."""
import dataclasses
import json
from pathlib import Path
from typing import Callable, Protocol

import jax

import llama4_jax as l4
from train.config import DataConfig, RunConfig

HELD_OUT_SEED = 10_000  # added to the task's seed: examples the stage never trains on


class Batches(Protocol):
  """A stage's data as the loop consumes it, checkpointed with the train state (grain's protocol
  for iterators that are not its own: bytes in and out) and closed at the end."""

  def next(self, state, step: int) -> tuple[dict, dict]:
    """(global batch of step `step` on the batch sharding, host-side metrics)."""

  def get_state(self) -> bytes: ...

  def set_state(self, state: bytes) -> None: ...

  def start_prefetch(self) -> None: ...

  def close(self) -> None: ...


class Stage(Protocol):
  """A training stage, built from its recipe (`train.stages.for_recipe`)."""
  cfg: RunConfig

  def loss(self, model_cfg: l4.Config, hooks: l4.Hooks) -> Callable:
    """loss_fn(params, batch) -> (loss sum, (normalizer, metrics)) for `step.make_train_step`."""

  def batch_spec(self, model_cfg: l4.Config) -> dict[str, tuple[tuple[int, ...], object]]:
    """{name: (shape, dtype)} of one global batch (what `llama4-plan` compiles against)."""

  def data(self, trainer, workdir: Path, tok) -> tuple[Batches, dict | None]:
    """(this host's batches, the starting params when making the data loaded them, else None)."""

  def measure(self, params, examples: int = 128, start=None) -> dict[str, float]:
    """The stage's own figures on held-out data; `start`: its starting params if held."""


class HostBatches:
  """Batches of this host's rows from a grain iterator, made global arrays on `sharding`."""

  def __init__(self, iterator, sharding: jax.sharding.Sharding):
    self.iterator, self.sharding = iterator, sharding

  def next(self, state, step: int) -> tuple[dict, dict]:
    local = next(self.iterator)
    return {k: jax.make_array_from_process_local_data(self.sharding, v)
            for k, v in local.items()}, {}

  def get_state(self) -> bytes:
    return json.dumps(self.iterator.get_state(), indent=4).encode()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    self.iterator.start_prefetch()

  def close(self) -> None:
    self.iterator.close()


def held_out(cfg: DataConfig, num_examples: int = 512) -> DataConfig:
  """The embedded task drawn with another seed (with a small operand range the problems recur,
  so a measure on it is of the stage's objective, not of generalisation); configured files as
  they are."""
  if cfg.synthetic is None:
    return cfg
  s = dataclasses.replace(cfg.synthetic, seed=cfg.synthetic.seed + HELD_OUT_SEED,
                          num_examples=num_examples)
  return dataclasses.replace(cfg, synthetic=s, seed=cfg.seed + HELD_OUT_SEED)


def host() -> tuple[int, int]:
  """(this process's index, process count): which slice of the data this host reads."""
  return jax.process_index(), jax.process_count()
