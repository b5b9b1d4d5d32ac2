"""The training loop shared by every stage: data, state, one jitted step, checkpoints, metrics.

The host dispatches step n, then reads step n-1's metrics (already computed), so it never waits on
the device. SIGTERM saves a checkpoint and exits cleanly; a restart from the same workdir resumes
from the latest checkpoint, data iterator included, and recomputes bit-identical steps.
"""
import json
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

import llama4_jax as l4
from llama4_jax.config import from_hf, text_to_hf
import sharding
from train import (chat, checkpoint, config as config_lib, data, dpo, health as health_lib, lora,
                   metap, metrics as metrics_lib, mmdata, optim, pretrain, rl, step as step_lib,
                   tokenizer as tokenizer_lib, workdir as workdir_lib)
from train.config import RunConfig, to_dict


def _check_same_model(key: str, source: str, model_cfg: l4.Config, their_cfg: l4.Config) -> None:
  # Compare the canonical HF form: explicit and derived layer patterns are the same model.
  ours, theirs = text_to_hf(model_cfg.text), text_to_hf(their_cfg.text)
  diff = sorted(k for k in ours if ours[k] != theirs.get(k))
  if diff:
    raise ValueError(f"model.{key}={source}: its config differs from the recipe's model in "
                     f"{diff} (set model.text to match)")


def initial_params(cfg: RunConfig, model_cfg: l4.Config, shardings,
                   table: metap.Table | None = None) -> dict:
  dtype = jnp.dtype(cfg.model.param_dtype)
  if cfg.model.init_from_checkpoint is not None:  # restored shard by shard onto `shardings`
    return _restore_params(Path(cfg.model.init_from_checkpoint), model_cfg, shardings, dtype)
  if cfg.model.init_from_hf is None:  # the MetaP table scales each tensor's init std
    table = table or resolve_table(cfg, model_cfg)
    init = jax.jit(lambda key: metap.init_params(model_cfg, table, key, dtype),
                   out_shardings=shardings)
    return init(jax.random.key(cfg.seed))
  hf_cfg, params = l4.load_hf(cfg.model.init_from_hf, dtype=dtype)
  _check_same_model("init_from_hf", cfg.model.init_from_hf, model_cfg, hf_cfg)
  if model_cfg.vision is None:  # text-only training from a multimodal checkpoint
    params.pop("vision", None)
    params.pop("projector", None)
  elif "vision" not in params:
    raise ValueError(f"model.multimodal is true but {cfg.model.init_from_hf} has no vision tower")
  return jax.device_put(params, shardings)


def _restore_params(path: Path, model_cfg: l4.Config, shardings, dtype) -> dict:
  """Params from `llama4-convert hf-to-orbax`'s CKPT_DIR, or from a training checkpoint step
  `WORKDIR/checkpoints/STEP` (params only, cast to `dtype`: how a stage starts from the last)."""
  abstract = jax.eval_shape(lambda: l4.init_params(model_cfg, jax.random.key(0), dtype))
  if isinstance(shardings, jax.sharding.Sharding):  # one sharding for every leaf
    shardings = jax.tree.map(lambda _: shardings, abstract)
  target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        abstract, shardings)
  if (path / "config.json").is_file():
    hf_config = json.loads((path / "config.json").read_text())
    _check_same_model("init_from_checkpoint", str(path), model_cfg, from_hf(hf_config))
    return ocp.StandardCheckpointer().restore((path / "params").absolute(), target)
  if not ((path / "state").is_dir() and (path.parent / "run.json").is_file()):
    raise FileNotFoundError(f"model.init_from_checkpoint={path}: neither a converted checkpoint "
                            f"(config.json + params/) nor a training step (state/, ../run.json)")
  run = config_lib.from_dict(RunConfig, json.loads((path.parent / "run.json").read_text()))
  _check_same_model("init_from_checkpoint", str(path), model_cfg, run.model.build())
  if run.lora is None:
    return _restore_trained(path, target)
  # a LoRA run: its own starting params (frozen, as it trained them) + its adapters, merged
  base = initial_params(run, model_cfg, shardings)
  first = jax.tree.leaves(shardings)[0]
  replicated = NamedSharding(first.mesh, P()) if isinstance(first, NamedSharding) else first
  adapters = _restore_trained(path, jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=replicated),
      lora.adapter_specs(model_cfg, run.lora), is_leaf=l4.is_spec))
  merge = jax.jit(lambda a, b: lora.merge(a, lora.freeze(b, run.lora), run.lora, dtype),
                  out_shardings=shardings)
  return merge(adapters, base)


def _restore_trained(path: Path, target):
  """The `params` of a training step's state (the optimizer state is not read)."""
  args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype), target)
  restore = ocp.args.PyTreeRestore(item={"params": target}, restore_args={"params": args},
                                   partial_restore=True)
  return ocp.PyTreeCheckpointer().restore((path / "state").absolute(), args=restore)["params"]


def _check_vocab(tok, model_cfg: l4.Config) -> None:
  if tok.get_vocab_size() > model_cfg.text.vocab_size:
    raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens but model.text.vocab_size is "
                     f"{model_cfg.text.vocab_size}")
  if model_cfg.vision is not None:
    patch = tokenizer_lib.image_tokens(tok).patch
    if patch != model_cfg.image_token_index:
      raise ValueError(f"the tokenizer's <|patch|> is id {patch} but the model's "
                       f"image_token_index is {model_cfg.image_token_index}")


def _data(cfg: RunConfig, model_cfg: l4.Config, workdir: Path):
  """The data iterator of this host (text, or image-text for a multimodal model); every input
  problem is raised here, before anything compiles."""
  tok = tokenizer_lib.load(cfg.data.tokenizer, image_tokens=model_cfg.vision is not None)
  _check_vocab(tok, model_cfg)
  host = (jax.process_index(), jax.process_count())
  if model_cfg.vision is not None:
    paths = mmdata.resolve_paths(cfg.data, str(workdir))
    return iter(mmdata.make_dataset(cfg.data, paths, tok, model_cfg.vision, *host))
  if cfg.data.chat:
    paths = chat.resolve_paths(cfg.data, str(workdir))
    return iter(chat.make_dataset(cfg.data, paths, tok, *host))
  paths = data.resolve_paths(cfg.data, str(workdir))
  return iter(data.make_dataset(cfg.data, paths, tok, *host))


def _dpo_data(cfg: RunConfig, t, workdir: Path):
  """(data iterator, starting params or None): preference pairs with the reference policy's
  log-probs, computed once from the starting params into WORKDIR/dpo_reference.npy and reused on
  resume; the params that computed them start the run (not loaded twice)."""
  tok = tokenizer_lib.load(cfg.data.tokenizer)
  _check_vocab(tok, t.model_cfg)
  pairs = [p for path in dpo.resolve_pairs(cfg.data, str(workdir)) for p in dpo.read_pairs(path)]
  ref_file, params = workdir / "dpo_reference.npy", None
  if ref_file.exists():
    ref = np.load(ref_file)
    if ref.shape != (len(pairs), 2):
      raise ValueError(f"{ref_file} holds {ref.shape[0]} pairs' reference log-probs but the data "
                       f"has {len(pairs)}: the data changed since this run started")
  else:
    params = initial_params(cfg, t.model_cfg, t.base_shardings, t.table)
    ref = dpo.reference_logps(t.model_cfg, params, dpo.pair_batches(
        pairs, tok, cfg.data.seq_len, cfg.data.batch_size))
    if jax.process_index() == 0:
      np.save(ref_file, ref)
  host = (jax.process_index(), jax.process_count())
  return iter(dpo.make_dataset(cfg.data, pairs, tok, ref, *host)), params


def _rl_data(cfg: RunConfig, t, workdir: Path):
  """(rollouts, starting params): prompts with checkable answers, and the starting policy, which
  stays on the device as the KL reference (a copy: the train state donates its own)."""
  tok = tokenizer_lib.load(cfg.data.tokenizer)
  _check_vocab(tok, t.model_cfg)
  paths = data.resolve_paths(cfg.data, str(workdir))  # configured files are checked there
  records = [r for path in paths for r in chat.read_jsonl(path, rl.check_prompt)]
  params = initial_params(cfg, t.model_cfg, t.base_shardings, t.table)
  reference = jax.tree.map(jnp.copy, params)
  return rl.Rollouts(t.model_cfg, cfg.rl, cfg.data, records, tok, reference), params


def resolve_table(cfg: RunConfig, model_cfg: l4.Config) -> metap.Table:
  """The run's MetaP table: `cfg.metap` against this run's shapes, batch and token budget."""
  batch_tokens = cfg.data.batch_size * cfg.data.seq_len
  return metap.resolve(model_cfg, cfg.metap, cfg.optim, batch_tokens, batch_tokens * cfg.steps)


class Trainer(NamedTuple):
  """Everything a run compiles against: the mesh, shardings, the loss and the jitted step."""
  model_cfg: l4.Config
  table: metap.Table
  mesh: jax.sharding.Mesh
  batch_sharding: NamedSharding
  state_shardings: step_lib.TrainState
  abstract_state: step_lib.TrainState
  tx: optax.GradientTransformation
  loss_fn: Callable
  train_step: Callable
  base_shardings: object = None   # the model params' shardings (LoRA: the frozen base's source)
  abstract_frozen: object = None  # LoRA's frozen base (shapes only)


def build(cfg: RunConfig, model_cfg: l4.Config, devices=None) -> Trainer:
  """Mesh (over `devices`, default all), shardings and the step of `cfg`; errors in the mesh,
  model and kernel pairing raise here, before anything is compiled."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  table = resolve_table(cfg, model_cfg)
  param_dtype = jnp.dtype(cfg.model.param_dtype)
  base = jax.eval_shape(lambda: l4.init_params(model_cfg, jax.random.key(0), param_dtype))
  hooks = sharding.hooks(mesh, cfg.model.attention, cfg.model.grouped_matmul,
                         cfg.mesh.expert_dispatch, cfg.mesh.expert_capacity)
  combine, frozen_sh, frozen = None, None, None
  base_sh = sharding.param_shardings(model_cfg, mesh)
  if cfg.lora is None:
    tx, lr = optim.make(cfg.optim, model_cfg, cfg.steps, cfg.model.frozen(), table)
    param_sh, params = base_sh, base
  else:
    _check_lora(cfg)
    tx, lr = lora.optimizer(cfg.optim, cfg.steps)
    param_sh = lora.adapter_shardings(model_cfg, cfg.lora, mesh, sharding.spec_for)
    params = jax.eval_shape(lambda: lora.init_adapters(model_cfg, cfg.lora, jax.random.key(0)))
    frozen = jax.eval_shape(lambda b: lora.freeze(b, cfg.lora), base)
    frozen_sh = lora.frozen_shardings(frozen, model_cfg, mesh, sharding.spec_for)
    hooks = hooks._replace(weights=lora.materialize)
    combine = lambda adapters, frozen: lora.combine(adapters, frozen, cfg.lora)
  abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)  # no frozen: not saved
  state_sh = step_lib.TrainState(NamedSharding(mesh, P()), param_sh,
                                 sharding.state_shardings(tx, abstract.opt_state, param_sh, mesh),
                                 frozen_sh)
  compute = jnp.dtype(cfg.model.compute_dtype)
  if cfg.dpo is not None:
    loss_fn = dpo.make_loss(model_cfg, cfg.dpo.beta, compute, cfg.model.remat, hooks)
  elif cfg.rl is not None:
    loss_fn = rl.make_loss(model_cfg, cfg.rl, compute, cfg.model.remat, hooks)
  else:
    loss_fn = pretrain.make_loss(model_cfg, compute, cfg.model.remat, cfg.optim.z_loss,
                                 cfg.optim.load_balance, hooks, cfg.optim.loss_chunk,
                                 cfg.model.frozen())
  batch_sh = sharding.batch_sharding(mesh)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(loss_fn, tx, lr, cfg.optim.grad_accum, combine), state_sh, batch_sh)
  return Trainer(model_cfg, table, mesh, batch_sh, state_sh, abstract, tx, loss_fn, train_step,
                 base_sh, frozen)


def _check_lora(cfg: RunConfig) -> None:
  if cfg.model.frozen():
    raise ValueError("lora with model.freeze_*: LoRA already freezes the whole base")
  if cfg.metap.preset != "sp":
    raise ValueError(f"lora with metap.preset={cfg.metap.preset!r}: the adapters take the plain "
                     f"optim settings (use metap.preset: sp)")


def initial_state(cfg: RunConfig, t: Trainer, params=None) -> step_lib.TrainState:
  # every leaf placed as the step's outputs will be: otherwise step 1 retraces
  if params is None:
    params = initial_params(cfg, t.model_cfg, t.base_shardings, t.table)
  init = jax.jit(lambda p, f: step_lib.init_state(p, t.tx, f), out_shardings=t.state_shardings)
  if cfg.lora is None:
    return init(params, None)
  adapters = jax.jit(lambda k: lora.init_adapters(t.model_cfg, cfg.lora, k),
                     out_shardings=t.state_shardings.params)(jax.random.key(cfg.seed + 1))
  return init(adapters, _freeze(cfg, t, params))


def _freeze(cfg: RunConfig, t: Trainer, params=None):
  """LoRA's frozen tree (the base, int4 for QLoRA), from the run's init source."""
  if params is None:
    params = initial_params(cfg, t.model_cfg, t.base_shardings, t.table)
  return jax.jit(lambda p: lora.freeze(p, cfg.lora),
                 out_shardings=t.state_shardings.frozen)(params)


def _resume_or_start(cfg: RunConfig, t: Trainer, ckpt, data_iter, params=None):
  """(first step, state): the newest checkpoint of the workdir that restores, or a fresh start
  (from `params` when they are already loaded)."""
  # restored straight into this run's shardings, whatever mesh saved it
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        t.abstract_state, t.state_shardings.replace(frozen=None))
  start, state = ckpt.restore_newest(target, data_iter)
  if not start:
    return 0, initial_state(cfg, t, params)
  return start, state if cfg.lora is None else state.replace(frozen=_freeze(cfg, t, params))


def _model_key(cfg: RunConfig, model_cfg: l4.Config) -> dict:
  """What a checkpoint's shapes depend on: a run with other values cannot resume it."""
  return {"text": text_to_hf(model_cfg.text), "multimodal": model_cfg.vision is not None,
          "lora": None if cfg.lora is None else to_dict(cfg.lora)}


def _log_table(table: metap.Table, workdir: Path) -> None:
  if jax.process_index() != 0:
    return
  text = metap.format_table(table)
  (workdir / "metap.txt").write_text(text + "\n")
  print(text if table.key["preset"] != "sp" else text.splitlines()[0] + f" ({workdir}/metap.txt)")


def run(cfg: RunConfig) -> dict:
  """Trains per `cfg`; returns the last step's metrics record. Raises workdir.Interrupted after
  saving on SIGTERM, health.Diverged on a non-finite step past `optim.skip_nonfinite`, and
  workdir.Locked when another run holds the workdir. A workdir this call created is removed
  again when it fails before writing any file."""
  model_cfg = cfg.model.build()
  _precheck(cfg, model_cfg)
  workdir = Path(cfg.workdir)
  created = not workdir.exists()
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    with workdir_lib.lock(workdir):
      return _run(cfg, workdir)
  except BaseException:
    if created:
      workdir_lib.remove_if_empty(workdir)
    raise


def _precheck(cfg: RunConfig, model_cfg: l4.Config) -> None:
  """What can be checked before the workdir is touched: devices, init source, tokenizer, files."""
  sharding.resolve(cfg.mesh, jax.device_count())
  if cfg.model.init_from_hf is not None:
    l4.hf_io.inspect(cfg.model.init_from_hf)  # headers only
  source = cfg.model.init_from_checkpoint
  if source is not None and not Path(source).is_dir():
    raise FileNotFoundError(f"model.init_from_checkpoint={source}: no such directory")
  _check_vocab(tokenizer_lib.load(cfg.data.tokenizer, model_cfg.vision is not None), model_cfg)
  if cfg.data.synthetic is None and cfg.data.synthetic_images is None:
    data.check_paths(cfg.data.paths)


def _setup(cfg: RunConfig, workdir: Path):
  """(trainer, data iterator, checkpointer, first step, state): every input is checked here."""
  model_cfg = cfg.model.build()
  params = None  # set when DPO's reference pass has already loaded the starting params
  data_iter = _data(cfg, model_cfg, workdir) if cfg.dpo is None and cfg.rl is None else None
  t = build(cfg, model_cfg)
  if cfg.dpo is not None:
    data_iter, params = _dpo_data(cfg, t, workdir)
  elif cfg.rl is not None:
    data_iter, params = _rl_data(cfg, t, workdir)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", cfg.checkpoint, to_dict(cfg))
  ckpt.agree("model.json", _model_key(cfg, t.model_cfg))
  ckpt.agree("metap.json", t.table.key)  # a different proxy/preset cannot resume these
  _log_table(t.table, workdir)
  start, state = _resume_or_start(cfg, t, ckpt, data_iter, params)
  return t, data_iter, ckpt, start, state


def _run(cfg: RunConfig, workdir: Path) -> dict:
  t, data_iter, ckpt, start, state = _setup(cfg, workdir)
  sinks = metrics_lib.Sinks(workdir, start)  # a bad metrics.jsonl stops the run here
  flops_per_token = metrics_lib.train_flops_per_token(t.model_cfg.text, cfg.data.seq_len)
  peak = _peak(cfg, workdir)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  sigterm, health = workdir_lib.Sigterm(), health_lib.Health(cfg.optim.skip_nonfinite)
  bar = tqdm(total=cfg.steps, initial=start, disable=jax.process_index() != 0, desc="train")
  pending, last, record = None, time.perf_counter(), {}

  def flush(pending):
    nonlocal last
    n, m, host_metrics = pending
    fetched = jax.device_get(m)  # blocks on step n only; step n+1 is already queued
    now = time.perf_counter()
    rec = metrics_lib.to_record(n, fetched, now - last, tokens_per_step, flops_per_token, peak,
                                t.mesh.size)
    last = now
    rec.update(host_metrics)
    try:
      health.check(rec, ckpt.latest_step())
    finally:  # the step that raised the alarm is recorded too
      sinks.write(rec)
    bar.update(1)
    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
    return rec

  try:
    for n in range(start, cfg.steps):
      batch, host_metrics = _next_batch(cfg, t, data_iter, state, n)
      state, m = t.train_step(state, batch)
      if pending is not None:
        record = flush(pending)
      pending = (n, m, host_metrics)
      if sigterm.received or ckpt.should_save(n + 1):
        record, pending = flush(pending), None  # a state is saved only once its step is checked
        ckpt.save(n + 1, state.replace(frozen=None), data_iter, force=sigterm.received)
      if sigterm.received:
        break
    if pending is not None:
      record = flush(pending)
    if ckpt.latest_step() != int(state.step):
      ckpt.save(int(state.step), state.replace(frozen=None), data_iter, force=True)
  finally:
    for closable in (ckpt, sinks, bar, data_iter, sigterm):
      closable.close()
  if sigterm.received:
    raise workdir_lib.Interrupted(int(state.step))
  if cfg.report and jax.process_index() == 0:
    from train import report
    report.write(workdir)
  return record


def _peak(cfg: RunConfig, workdir: Path) -> float:
  """Peak FLOP/s per device, recorded with the recipe in WORKDIR/config.json."""
  peak, source = metrics_lib.peak_flops(cfg.peak_flops_per_device,
                                        jnp.dtype(cfg.model.compute_dtype))
  (workdir / "config.json").write_text(json.dumps({**to_dict(cfg), "peak_flops": peak,
                                                   "peak_source": source}, indent=2))
  return peak


def _next_batch(cfg: RunConfig, t: Trainer, data_iter, state, n: int):
  """(global batch, host metrics) for step n."""
  if cfg.rl is None:
    local = next(data_iter)
    return {k: jax.make_array_from_process_local_data(t.batch_sharding, v)
            for k, v in local.items()}, {}
  rows, host_metrics = data_iter.next_batch(state.params, n)  # every process: the global batch
  return {k: jax.make_array_from_callback(v.shape, t.batch_sharding, lambda i, v=v: v[i])
          for k, v in rows.items()}, host_metrics
