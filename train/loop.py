"""The training loop shared by every stage: data, state, one jitted step, checkpoints, metrics.

It knows no stage: the recipe's stage (`train.stages.for_recipe`) gives the loss and the batches.
The host dispatches step n, then reads step n-1's metrics (already computed), so it never waits on
the device. SIGTERM saves a checkpoint and exits cleanly; a restart from the same workdir resumes
from the latest checkpoint, data iterator included, and recomputes bit-identical steps.
"""
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import llama4_jax as l4
import sharding
from train import (checkpoint, data, lora, metap, metrics as metrics_lib, optim,
                   params as params_lib, stages, step as step_lib, step_cache as step_cache_lib,
                   tokenizer as tokenizer_lib, workdir as workdir_lib)
from train.config import RunConfig, to_dict


class Trainer(NamedTuple):
  """Everything a run compiles against: its stage, the mesh, shardings and the jitted step."""
  stage: stages.Stage
  model_cfg: l4.Config
  table: metap.Table
  mesh: jax.sharding.Mesh
  batch_sharding: jax.sharding.NamedSharding
  state_shardings: step_lib.TrainState
  abstract_state: step_lib.TrainState
  tx: optax.GradientTransformation
  loss_fn: Callable     # the stage's loss on this mesh (what the train step differentiates)
  train_step: Callable
  base_shardings: object = None   # the model params' shardings (LoRA: the frozen base's source)
  abstract_frozen: object = None  # LoRA's frozen base (shapes only)


def build(cfg: RunConfig, model_cfg: l4.Config, devices=None) -> Trainer:
  """Mesh (over `devices`, default all), shardings and the step of `cfg`; errors in the mesh,
  model and kernel pairing raise here, before anything is compiled."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  stage, table = stages.for_recipe(cfg), params_lib.resolve_table(cfg, model_cfg)
  base = params_lib.abstract_params(model_cfg, jnp.dtype(cfg.model.param_dtype),
                                    cfg.model.init_from_checkpoint)
  hooks = sharding.hooks(mesh, cfg.model.attention, cfg.model.grouped_matmul,
                         cfg.mesh.expert_dispatch, cfg.mesh.expert_capacity,
                         cfg.model.scan_layers)
  combine, frozen_sh, frozen = None, None, None
  base_sh = sharding.param_shardings(model_cfg, mesh)
  if l4.quant.has_quantized(base):  # FP8 experts: a frozen base: the adapters train, the FP8 experts are dequantized per layer
    if cfg.lora is None:
      raise ValueError(f"model.init_from_checkpoint={cfg.model.init_from_checkpoint} keeps its "
                       f"experts in FP8, a frozen base: add a lora section, or convert with "
                       f"`llama4-convert hf-to-orbax --dtype bf16` to train every weight")
    base_sh = sharding.tree_shardings(base, model_cfg, mesh)
  if cfg.lora is None:
    tx, lr = optim.make(cfg.optim, model_cfg, cfg.steps, cfg.model.frozen(), table)
    param_sh, params = base_sh, base
  else:
    lora.check_run(cfg)
    tx, lr = lora.optimizer(cfg.optim, cfg.steps)
    param_sh = lora.adapter_shardings(model_cfg, cfg.lora, partial(sharding.named, mesh))
    params = jax.eval_shape(lambda: lora.init_adapters(model_cfg, cfg.lora, jax.random.key(0)))
    frozen = jax.eval_shape(lambda b: lora.freeze(b, cfg.lora), base)
    frozen_sh = sharding.tree_shardings(frozen, model_cfg, mesh)
    hooks = hooks._replace(weights=lora.materialize)
    combine = lambda adapters, frozen: lora.combine(adapters, frozen, cfg.lora)
  abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)  # no frozen: not saved
  state_sh = step_lib.TrainState(sharding.replicated(mesh), param_sh,
                                 sharding.state_shardings(tx, abstract.opt_state, param_sh, mesh),
                                 frozen_sh)
  batch_sh, loss_fn = sharding.batch_sharding(mesh), stage.loss(model_cfg, hooks)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(
      loss_fn, tx, lr, cfg.optim.grad_accum, combine), state_sh, batch_sh)
  return Trainer(stage, model_cfg, table, mesh, batch_sh, state_sh, abstract, tx, loss_fn,
                 train_step, base_sh, frozen)


def initial_state(cfg: RunConfig, t: Trainer, params=None) -> step_lib.TrainState:
  """The state of step 0 (from `params` when they are already loaded), placed as the step's
  outputs will be: otherwise step 1 retraces."""
  if params is None:
    params = params_lib.initial_params(cfg, t.model_cfg, t.base_shardings, t.table)
  init = jax.jit(lambda p, f: step_lib.init_state(p, t.tx, f), out_shardings=t.state_shardings)
  if cfg.lora is None:
    return init(params, None)
  adapters = jax.jit(lambda k: lora.init_adapters(t.model_cfg, cfg.lora, k),
                     out_shardings=t.state_shardings.params)(jax.random.key(cfg.seed + 1))
  return init(adapters, _freeze(cfg, t, params))


def _freeze(cfg: RunConfig, t: Trainer, params=None):
  """LoRA's frozen tree (the base, int4 for QLoRA), from the run's init source."""
  if params is None:
    params = params_lib.initial_params(cfg, t.model_cfg, t.base_shardings, t.table)
  return jax.jit(lambda p: lora.freeze(p, cfg.lora),
                 out_shardings=t.state_shardings.frozen)(params)


def resume_or_start(cfg: RunConfig, t: Trainer, ckpt, batches, params=None):
  """(first step, state): the newest checkpoint of the workdir that restores (`batches` restored
  in place), or a fresh start (from `params` when they are already loaded)."""
  # restored straight into this run's shardings, whatever mesh saved it
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        t.abstract_state, t.state_shardings.replace(frozen=None))
  start, state = ckpt.restore_newest(target, batches)
  if not start:
    return 0, initial_state(cfg, t, params)
  return start, state if cfg.lora is None else state.replace(frozen=_freeze(cfg, t, params))


def run(cfg: RunConfig, step_cache: Path | None = None) -> dict:
  """Trains per `cfg`; returns the last step's metrics record. With `step_cache` (a directory),
  the train step runs through its export there (`train.step_cache`): a restart skips tracing
  and lowering it. Raises workdir.Interrupted after saving on SIGTERM, health.Diverged on a
  non-finite step past `optim.skip_nonfinite`, and workdir.Locked when another run holds the
  workdir. A workdir this call created is removed
  again when it fails before writing any file."""
  model_cfg = cfg.model.build()
  tok = _precheck(cfg, model_cfg)
  workdir = Path(cfg.workdir)
  created = not workdir.exists()
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    with workdir_lib.lock(workdir):
      return _run(cfg, workdir, tok, step_cache)
  except BaseException:
    if created:
      workdir_lib.remove_if_empty(workdir)
    raise


def _precheck(cfg: RunConfig, model_cfg: l4.Config):
  """What can be checked before the workdir is touched: devices, init source, tokenizer, files.
  Returns the tokenizer (loaded once, used by the stage's data)."""
  sharding.resolve(cfg.mesh, jax.device_count())
  if cfg.model.init_from_hf is not None:
    l4.hf_io.inspect(cfg.model.init_from_hf)  # headers only
  source = cfg.model.init_from_checkpoint
  if source is not None and not Path(source).is_dir():
    raise FileNotFoundError(f"model.init_from_checkpoint={source}: no such directory")
  tok = tokenizer_lib.for_model(cfg.data, model_cfg)
  if cfg.data.synthetic is None and cfg.data.synthetic_images is None:
    data.check_paths(cfg.data.paths)
  return tok


def _setup(cfg: RunConfig, workdir: Path, tok, step_cache: Path | None = None):
  """(trainer, batches, checkpointer, first step, state): every input is checked here."""
  t, recipe = build(cfg, cfg.model.build()), to_dict(cfg)
  if step_cache is not None:
    t = t._replace(train_step=step_cache_lib.Step(t.train_step, t.state_shardings,
                                                  t.batch_sharding, recipe, step_cache))
  batches, params = t.stage.data(t, workdir, tok)  # params: when the data needed them loaded
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", cfg.checkpoint, recipe)
  ckpt.agree("model.json", checkpoint.model_key(cfg, t.model_cfg))
  ckpt.agree("metap.json", t.table.key)  # a different proxy/preset cannot resume these
  metap.log_table(t.table, workdir)
  start, state = resume_or_start(cfg, t, ckpt, batches, params)
  return t, batches, ckpt, start, state


def _run(cfg: RunConfig, workdir: Path, tok, step_cache: Path | None) -> dict:
  t, batches, ckpt, start, state = _setup(cfg, workdir, tok, step_cache)
  log = metrics_lib.StepLog(cfg, t.model_cfg, t.mesh.size, workdir, start, ckpt)
  sigterm, pending, record = workdir_lib.Sigterm(), None, {}
  try:
    for n in range(start, cfg.steps):
      batch, host_metrics = batches.next(state, n)
      state, m = t.train_step(state, batch)
      if pending is not None:
        record = log.flush(*pending)
      pending = (n, m, host_metrics)
      if sigterm.received or ckpt.should_save(n + 1):
        record, pending = log.flush(*pending), None  # a state is saved once its step is checked
        ckpt.save(n + 1, state.replace(frozen=None), batches, force=sigterm.received)
      if sigterm.received:
        break
    if pending is not None:
      record = log.flush(*pending)
    if ckpt.latest_step() != int(state.step):
      ckpt.save(int(state.step), state.replace(frozen=None), batches, force=True)
  finally:
    for closable in (ckpt, log, batches, sigterm):
      closable.close()
  if sigterm.received:
    raise workdir_lib.Interrupted(int(state.step))
  if cfg.report and jax.process_index() == 0:
    from train import report
    report.write(workdir)
  return record
