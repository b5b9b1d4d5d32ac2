"""The parameter tree of the Llama 4 text model: shapes, logical axes and initialisers in one place.

Layers are stored stacked for `jax.lax.scan`: `params['blocks']` is a list with one entry per layer
of the repeating pattern (`TextConfig.period`), each leaf carrying a leading `layers` axis of
length num_hidden_layers / period. Layer i lives in slot i % period, row i // period.

Logical axis names (mapped to mesh axes by `sharding/`): layers, vocab, embed, norm, q_heads,
kv_heads, head_dim, mlp, expert, router; the vision tower's vision_patch, vision_embed, vision_pos,
vision_heads, vision_mlp, vision_proj and bias (norms, biases and the CLS embedding are not decayed).

Each spec also declares what per-tensor hyperparameter rules need (train/metap.py): `fan_in`, the
axes the forward pass contracts (never `expert` or `layers`: each expert is its own matrix), and
`module`, the group whose tunable constants it takes.
"""
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from llama4_jax.config import Config, TextConfig, VisionConfig

Init = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


class ParamSpec(NamedTuple):
  shape: tuple[int, ...]
  axes: tuple[str, ...]        # one logical axis name per dimension
  init: Init
  fan_in: tuple[str, ...] = ()  # axes contracted in the forward pass (the first dim of each name)
  module: str = ""              # embedding | attn | ffn_dense | ffn_expert | ffn_shared | router |
                                # norm | readout | vision | projector


# The matmul weights of a block by their leaf names (attention; the dense MLP or every routed
# expert as gate/up/down; the shared expert): what LoRA may adapt and QLoRA quantizes.
BLOCK_MATMULS = ("q", "k", "v", "o", "gate", "up", "down", "shared_gate", "shared_up",
                 "shared_down")


def _normal(std: float) -> Init:
  return lambda key, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def _zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def _block_specs(cfg: TextConfig, slot: int, groups: int) -> dict:
  d, h, f, e = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.num_local_experts
  n, k = cfg.num_attention_heads, cfg.num_key_value_heads
  w = _normal(cfg.initializer_range)

  def spec(shape, axes, module, fan_in=("embed",), init=w):
    return ParamSpec((groups, *shape), ("layers", *axes), init, fan_in, module)

  block = {
      "attn_norm": spec((d,), ("norm",), "norm", (), _ones),
      "ffn_norm": spec((d,), ("norm",), "norm", (), _ones),
      "q": spec((d, n, h), ("embed", "q_heads", "head_dim"), "attn"),
      "k": spec((d, k, h), ("embed", "kv_heads", "head_dim"), "attn"),
      "v": spec((d, k, h), ("embed", "kv_heads", "head_dim"), "attn"),
      "o": spec((n, h, d), ("q_heads", "head_dim", "embed"), "attn", ("q_heads", "head_dim")),
  }
  if cfg.is_moe(slot):
    block["moe"] = {
        "router": spec((d, e), ("embed", "router"), "router"),
        "gate": spec((e, d, f), ("expert", "embed", "mlp"), "ffn_expert"),
        "up": spec((e, d, f), ("expert", "embed", "mlp"), "ffn_expert"),
        "down": spec((e, f, d), ("expert", "mlp", "embed"), "ffn_expert", ("mlp",)),
        "shared_gate": spec((d, f), ("embed", "mlp"), "ffn_shared"),
        "shared_up": spec((d, f), ("embed", "mlp"), "ffn_shared"),
        "shared_down": spec((f, d), ("mlp", "embed"), "ffn_shared", ("mlp",)),
    }
  else:
    fm = cfg.intermediate_size_mlp
    block["mlp"] = {"gate": spec((d, fm), ("embed", "mlp"), "ffn_dense"),
                    "up": spec((d, fm), ("embed", "mlp"), "ffn_dense"),
                    "down": spec((fm, d), ("mlp", "embed"), "ffn_dense", ("mlp",))}
  return block


def _vision_specs(v: VisionConfig) -> dict:
  """The vision tower and adapter (HF `vision_model.*`); encoder layers stacked for a scan."""
  d, f, k, h, n = (v.hidden_size, v.intermediate_size, v.num_attention_heads, v.head_dim,
                   v.num_hidden_layers)
  w, emb = _normal(v.initializer_range), _normal(d ** -0.5)

  def norm(*lead):
    axes = ("layers",) if lead else ()
    return {"scale": ParamSpec((*lead, d), (*axes, "norm"), _ones, (), "vision"),
            "bias": ParamSpec((*lead, d), (*axes, "norm"), _zeros, (), "vision")}

  def stacked(shape, axes, fan_in=("vision_embed",), init=w):
    return ParamSpec((n, *shape), ("layers", *axes), init, fan_in, "vision")

  def single(shape, axes, fan_in, init=w):
    return ParamSpec(shape, axes, init, fan_in, "vision")

  qkv = {name: stacked((d, k, h), ("vision_embed", "vision_heads", "head_dim")) for name in "qkv"}
  qkv_bias = {f"{name}_bias": stacked((k, h), ("vision_heads", "bias"), (), _zeros) for name in "qkv"}
  return {
      "patch": single((v.num_channels * v.patch_size ** 2, d), ("vision_patch", "vision_embed"),
                      ("vision_patch",)),
      "cls": single((d,), ("norm",), (), emb),
      "pos": single((v.grid ** 2 + 1, d), ("vision_pos", "vision_embed"), (), emb),
      "ln_pre": norm(), "ln_post": norm(),
      "layers": {
          "ln1": norm(n), "ln2": norm(n), **qkv, **qkv_bias,
          "o": stacked((k, h, d), ("vision_heads", "head_dim", "vision_embed"),
                       ("vision_heads", "head_dim")),
          "o_bias": stacked((d,), ("bias",), (), _zeros),
          "fc1": stacked((d, f), ("vision_embed", "vision_mlp")),
          "fc1_bias": stacked((f,), ("bias",), (), _zeros),
          "fc2": stacked((f, d), ("vision_mlp", "vision_embed"), ("vision_mlp",)),
          "fc2_bias": stacked((d,), ("bias",), (), _zeros),
      },
      "adapter": {
          "fc1": single((f, v.projector_input_dim), ("vision_mlp", "vision_proj"), ("vision_mlp",)),
          "fc2": single((v.projector_output_dim,) * 2, ("vision_proj", "vision_proj"),
                        ("vision_proj",)),
      },
  }


def param_specs(cfg: Config) -> dict:
  """The tree of ParamSpec: the text model, plus `vision` and `projector` when cfg.vision is set."""
  t = cfg.text
  p = t.period
  groups = t.num_hidden_layers // p
  w = _normal(t.initializer_range)
  specs = {
      "embed": ParamSpec((t.vocab_size, t.hidden_size), ("vocab", "embed"), w, (), "embedding"),
      "blocks": [_block_specs(t, s, groups) for s in range(p)],
      "final_norm": ParamSpec((t.hidden_size,), ("norm",), _ones, (), "norm"),
  }
  if not t.tie_word_embeddings:
    specs["lm_head"] = ParamSpec((t.hidden_size, t.vocab_size), ("embed", "vocab"), w, ("embed",),
                                 "readout")
  if cfg.vision is not None:
    specs["vision"] = _vision_specs(cfg.vision)
    specs["projector"] = ParamSpec((cfg.vision.vision_output_dim, t.hidden_size),
                                   ("vision_proj", "embed"), w, ("vision_proj",), "projector")
  return specs


def init_params(cfg: Config, key: jax.Array, dtype=jnp.float32) -> dict:
  """Random parameters (normal(initializer_range) matrices, unit norms), like HF's init."""
  leaves, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=is_spec)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [s.init(k, s.shape, dtype) for s, k in zip(leaves, keys)])


def param_axes(cfg: Config) -> dict:
  """The same tree with each leaf's logical axis names."""
  return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=is_spec)


def param_count(cfg: Config | TextConfig) -> int:
  """Exact parameter count, from `jax.eval_shape` of the initialiser (nothing is allocated)."""
  if isinstance(cfg, TextConfig):
    cfg = Config(text=cfg)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
