"""Where a run's parameters come from: MetaP-scaled init, a HF checkpoint, a converted orbax
checkpoint or another run's training step (LoRA runs merged); the MetaP table of a run."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

import llama4_jax as l4
import sharding
from llama4_jax import fp8
from llama4_jax.config import from_hf, text_to_hf
from train import config as config_lib, lora, metap
from train.config import RunConfig


def check_same_model(key: str, source: str, model_cfg: l4.Config, their_cfg: l4.Config) -> None:
  """Raises naming `model.{key}={source}` when `their_cfg` is another text model."""
  # Compare the canonical HF form: explicit and derived layer patterns are the same model.
  ours, theirs = text_to_hf(model_cfg.text), text_to_hf(their_cfg.text)
  diff = sorted(k for k in ours if ours[k] != theirs.get(k))
  if diff:
    raise ValueError(f"model.{key}={source}: its config differs from the recipe's model in "
                     f"{diff} (set model.text to match)")


def resolve_table(cfg: RunConfig, model_cfg: l4.Config) -> metap.Table:
  """The run's MetaP table: `cfg.metap` against this run's shapes, batch and token budget."""
  batch_tokens = cfg.data.batch_size * cfg.data.seq_len
  return metap.resolve(model_cfg, cfg.metap, cfg.optim, batch_tokens, batch_tokens * cfg.steps)


def initial_params(cfg: RunConfig, model_cfg: l4.Config, shardings,
                   table: metap.Table | None = None) -> dict:
  """The run's starting params placed on `shardings` (one sharding, or a tree of them)."""
  dtype = jnp.dtype(cfg.model.param_dtype)
  if cfg.model.init_from_checkpoint is not None:  # restored shard by shard onto `shardings`
    return restore_params(Path(cfg.model.init_from_checkpoint), model_cfg, shardings, dtype)
  if cfg.model.init_from_hf is None:  # the MetaP table scales each tensor's init std
    table = table or resolve_table(cfg, model_cfg)
    init = jax.jit(lambda key: metap.init_params(model_cfg, table, key, dtype),
                   out_shardings=shardings)
    return init(jax.random.key(cfg.seed))
  hf_cfg, params = l4.load_hf(cfg.model.init_from_hf, dtype=dtype)
  check_same_model("init_from_hf", cfg.model.init_from_hf, model_cfg, hf_cfg)
  if model_cfg.vision is None:  # text-only training from a multimodal checkpoint
    params.pop("vision", None)
    params.pop("projector", None)
  elif "vision" not in params:
    raise ValueError(f"model.multimodal is true but {cfg.model.init_from_hf} has no vision tower")
  return jax.device_put(params, shardings)


def abstract_params(model_cfg: l4.Config, dtype, init_from_checkpoint=None) -> dict:
  """The shapes of a run's starting params: FP8 experts when its checkpoint is a CKPT_DIR of
  `hf-to-orbax --keep-fp8`."""
  init = lambda: l4.init_params(model_cfg, jax.random.key(0), dtype)
  config = init_from_checkpoint and Path(init_from_checkpoint) / "config.json"
  if config and config.is_file() and fp8.is_fp8(json.loads(config.read_text())):
    return jax.eval_shape(lambda: l4.quantize(init(), "fp8"))
  return jax.eval_shape(init)


def restore_params(path: Path, model_cfg: l4.Config, shardings, dtype) -> dict:
  """Params from `llama4-convert hf-to-orbax`'s CKPT_DIR (FP8 experts stay FP8), or from a
  training checkpoint step `WORKDIR/checkpoints/STEP` (params only, cast to `dtype`: how a stage
  starts from the last)."""
  abstract = abstract_params(model_cfg, dtype, path)
  if isinstance(shardings, jax.sharding.Sharding):  # one sharding for every leaf
    shardings = jax.tree.map(lambda _: shardings, abstract)
  target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        abstract, shardings)
  if (path / "config.json").is_file():
    hf_config = json.loads((path / "config.json").read_text())
    check_same_model("init_from_checkpoint", str(path), model_cfg, from_hf(hf_config))
    return ocp.StandardCheckpointer().restore((path / "params").absolute(), target)
  if not ((path / "state").is_dir() and (path.parent / "run.json").is_file()):
    raise FileNotFoundError(f"model.init_from_checkpoint={path}: neither a converted checkpoint "
                            f"(config.json + params/) nor a training step (state/, ../run.json)")
  run = config_lib.from_dict(RunConfig, json.loads((path.parent / "run.json").read_text()))
  check_same_model("init_from_checkpoint", str(path), model_cfg, run.model.build())
  if run.lora is None:
    return _restore_trained(path, target)
  # a LoRA run: its own starting params (frozen, as it trained them) + its adapters, merged
  base = initial_params(run, model_cfg, shardings)
  replicated = sharding.replicated_like(jax.tree.leaves(shardings)[0])
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


def starting_params(cfg: RunConfig) -> dict:
  """A recipe's starting params, on one device."""
  return initial_params(cfg, cfg.model.build(), sharding.one_device())


def final_params(cfg: RunConfig) -> dict:
  """A finished run's last step's params, on one device."""
  step = Path(cfg.workdir) / "checkpoints" / str(cfg.steps)
  return restore_params(step, cfg.model.build(), sharding.one_device(),
                        jnp.dtype(cfg.model.param_dtype))
