"""The exported train step (`train.step_cache`): read back untraced, bit-identical to the jitted
step, keyed by what shapes the program, and re-exported over a damaged file."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import config as config_lib, loop, step as step_lib, step_cache
from train_util import TINY


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(run config, recipe dict, step-0 state, batch) of the tiny recipe."""
  root = tmp_path_factory.mktemp("step_cache")
  cfg = config_lib.from_dict(config_lib.RunConfig, {**TINY, "workdir": str(root / "w")})
  t = loop.build(cfg, cfg.model.build())
  ids = np.random.RandomState(0).randint(3, 200, (8, 32)).astype(np.int32)
  batch = jax.device_put({"tokens": ids, "segment_ids": np.ones_like(ids),
                          "positions": np.broadcast_to(np.arange(32, dtype=np.int32), ids.shape)},
                         t.batch_sharding)
  return cfg, config_lib.to_dict(cfg), loop.initial_state(cfg, t), batch


def _run(cfg, recipe, directory, state, batch):
  """(state, metrics, train-step traces) of a `Step` over a copy of `state`, in a new trainer
  (as in a new process: jax has not traced its step yet)."""
  t = loop.build(cfg, cfg.model.build())
  before = step_lib.TRACE_COUNT["train_step"]
  step = step_cache.Step(t.train_step, t.state_shardings, t.batch_sharding, recipe, directory)
  new, metrics = step(jax.tree.map(jnp.copy, state), batch)
  return jax.device_get((new, metrics)), step_lib.TRACE_COUNT["train_step"] - before


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_a_second_run_reads_the_export_untraced_and_matches_the_jitted_step(setup, tmp_path):
  cfg, recipe, state, batch = setup
  t = loop.build(cfg, cfg.model.build())
  reference = jax.device_get(t.train_step(jax.tree.map(jnp.copy, state), batch))
  exported, traces = _run(cfg, recipe, tmp_path, state, batch)
  assert traces == 1 and len(list(tmp_path.glob("*.jaxexport"))) == 1
  _assert_same(exported, reference)
  # another workdir, same program: the export is read back, nothing is traced
  moved = {**recipe, "workdir": str(tmp_path / "elsewhere")}
  read_back, traces = _run(cfg, moved, tmp_path, state, batch)
  assert traces == 0 and len(list(tmp_path.glob("*.jaxexport"))) == 1
  _assert_same(read_back, reference)
  assert int(read_back[0].step) == int(state.step) + 1


def test_a_different_recipe_or_batch_shape_gets_its_own_export(setup, tmp_path):
  cfg, recipe, state, batch = setup
  _run(cfg, recipe, tmp_path, state, batch)
  _, traces = _run(cfg, {**recipe, "optim": {**recipe["optim"], "lr": 1e-3}}, tmp_path, state,
                   batch)
  assert traces == 1 and len(list(tmp_path.glob("*.jaxexport"))) == 2
  t = loop.build(cfg, cfg.model.build())
  step = step_cache.Step(t.train_step, t.state_shardings, t.batch_sharding, recipe, tmp_path)
  longer = {k: jnp.concatenate([v, v], axis=1) for k, v in batch.items()}
  leaves = jax.tree.leaves(state)
  assert step.key(leaves, batch) != step.key(leaves, longer)


def test_a_damaged_export_is_replaced_not_trusted(setup, tmp_path, capsys):
  cfg, recipe, state, batch = setup
  good, _ = _run(cfg, recipe, tmp_path, state, batch)
  (path,) = tmp_path.glob("*.jaxexport")
  path.write_bytes(path.read_bytes()[:1000])  # torn
  again, traces = _run(cfg, recipe, tmp_path, state, batch)
  assert traces == 1 and f"{path}: unreadable" in capsys.readouterr().out
  _assert_same(again, good)
  _, traces = _run(cfg, recipe, tmp_path, state, batch)  # the rewritten file reads back
  assert traces == 0
