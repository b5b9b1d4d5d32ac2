"""LoRA and QLoRA fine-tuning on the shared train step.

The trained params are only the adapters: for each targeted block matrix W (attention q/k/v/o, the
dense MLP, every routed expert and the shared expert) a pair A [In, r], B [r, Out] (one pair per
expert for expert weights), with W' = W + (alpha / r) * A @ B reshaped to W. A starts normal(1/In),
B at zero: the model starts exactly at the base. The base is the train state's `frozen` tree: no
gradient, no optimizer state, never checkpointed (it is rebuilt from the run's init source on
resume). QLoRA stores the frozen block matrices as int4 (two per byte, one bf16 scale per group of
`group_size` along the last axis) and dequantizes them one layer at a time inside the scan.

The model knows none of this: `Lora` and `QTensor` leaves reach it through `l4.Hooks.weights`,
which turns a layer's params into plain weights at the start of the layer (inside remat, so the
backward recomputes them instead of storing them).
"""
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import llama4_jax as l4
from llama4_jax.quant import dequantize, dequantize_layer, is_quantized
from train import optim
from train.config import LoraConfig, OptimConfig


@flax.struct.dataclass
class Lora:
  """A base weight (array or QTensor) with its adapter pair."""
  w: Any
  a: jax.Array
  b: jax.Array
  scale: float = flax.struct.field(pytree_node=False)


def _merged(x):
  """A `Lora` leaf as its base (dequantized to the adapters' dtype) + the adapter product."""
  if not isinstance(x, Lora):
    return x
  w = dequantize(x.w, x.a.dtype) if is_quantized(x.w) else x.w
  delta = jnp.matmul(x.a, x.b).reshape(w.shape)  # [(E,) In, r] @ [(E,) r, Out]
  return w.astype(x.a.dtype) + (x.scale * delta).astype(x.a.dtype)


def materialize(params):
  """Plain weights from a tree with `Lora` and quantized leaves (`l4.Hooks.weights`); the merge.
  Quantized leaves without adapters go through the model's own `quant.dequantize_layer`."""
  merged = jax.tree.map(_merged, params, is_leaf=lambda x: isinstance(x, Lora))
  return dequantize_layer(merged)


def adapter_specs(model_cfg: l4.Config, cfg: LoraConfig) -> dict:
  """{"blocks": [per slot: {name: {"a": ParamSpec, "b": ParamSpec}} (nested as the params)]}."""
  def pair(spec: l4.ParamSpec):
    lead = 2 if spec.axes[1] == "expert" else 1
    n_in = len(spec.fan_in)
    dims, axes = spec.shape[lead:], spec.axes[lead:]
    d_in, d_out = math.prod(dims[:n_in]), math.prod(dims[n_in:])
    std = d_in ** -0.5
    a = l4.ParamSpec((*spec.shape[:lead], d_in, cfg.rank), (*spec.axes[:lead], axes[0], "lora_rank"),
                     lambda k, s, dt: (std * jax.random.normal(k, s, jnp.float32)).astype(dt))
    b = l4.ParamSpec((*spec.shape[:lead], cfg.rank, d_out),
                     (*spec.axes[:lead], "lora_rank", axes[n_in]),
                     lambda k, s, dt: jnp.zeros(s, dt))
    return {"a": a, "b": b}

  def slot(block: dict) -> dict:
    out = {}
    for name, v in block.items():
      if isinstance(v, dict):
        sub = slot(v)
        if sub:
          out[name] = sub
      elif name in cfg.targets:
        out[name] = pair(v)
    return out
  blocks = [slot(b) for b in l4.param_specs(model_cfg)["blocks"]]
  if not any(blocks):
    raise ValueError(f"lora.targets={list(cfg.targets)} match no weight of this model")
  return {"blocks": blocks}


def init_adapters(model_cfg: l4.Config, cfg: LoraConfig, key: jax.Array) -> dict:
  leaves, treedef = jax.tree.flatten(adapter_specs(model_cfg, cfg), is_leaf=l4.is_spec)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [s.init(k, s.shape, jnp.float32)
                                      for s, k in zip(leaves, keys)])


def freeze(base: dict, cfg: LoraConfig) -> dict:
  """The frozen tree: `base`, with every block matrix int4 when cfg.quantize (QLoRA); the
  embedding, norms, router and LM head stay in their dtype."""
  if not cfg.quantize:
    return base

  return l4.quantize(base, "int4", cfg.group_size, "lora.group_size")


def combine(adapters: dict, frozen: dict, cfg: LoraConfig) -> dict:
  """The model's params: the frozen tree with each targeted leaf a `Lora` of (base, a, b)."""
  scale = cfg.alpha / cfg.rank

  def wrap(base: dict, ad: dict) -> dict:
    out = dict(base)
    for k, v in ad.items():
      out[k] = Lora(base[k], v["a"], v["b"], scale) if set(v) == {"a", "b"} else wrap(base[k], v)
    return out
  return {**frozen, "blocks": [wrap(b, a) for b, a in zip(frozen["blocks"], adapters["blocks"])]}


def merge(adapters: dict, frozen: dict, cfg: LoraConfig, dtype=jnp.float32) -> dict:
  """Plain params: base (dequantized) + adapters, in `dtype` — a model for export or a next stage."""
  merged = materialize(combine(adapters, frozen, cfg))
  return jax.tree.map(lambda a: a.astype(dtype), merged)


def adapter_shardings(model_cfg: l4.Config, cfg: LoraConfig, named) -> dict:
  """Shardings of the adapters, `named(name, shape, logical axes)` for each."""
  return jax.tree_util.tree_map_with_path(
      lambda path, s: named(jax.tree_util.keystr(path), s.shape, s.axes),
      adapter_specs(model_cfg, cfg), is_leaf=l4.is_spec)


def optimizer(g: OptimConfig, total_steps: int):
  """(AdamW over the adapters, lr schedule): clipping, the run's schedule, decay on A and B."""
  schedule_fn = optim.schedule(g, total_steps)
  tx = optax.chain(optim.clip_by_global_norm(g.clip_norm),
                   optax.adamw(schedule_fn, g.b1, g.b2, g.eps, weight_decay=g.weight_decay))
  return tx, schedule_fn


def check_run(cfg) -> None:
  """LoRA's own rules for a recipe: the whole base is frozen already, adapters take plain SP."""
  if cfg.model.frozen():
    raise ValueError("lora with model.freeze_*: LoRA already freezes the whole base")
  if cfg.metap.preset != "sp":
    raise ValueError(f"lora with metap.preset={cfg.metap.preset!r}: the adapters take the plain "
                     f"optim settings (use metap.preset: sp)")
