"""HF Llama 4 checkpoints <-> our params: ONE table of names and transforms, and safetensors I/O.

Reference: docs/hf_reference.md §3. Both HF layouts are read and written:
`Llama4ForCausalLM` (`model.*`, `lm_head.weight`) and `Llama4ForConditionalGeneration`
(`language_model.model.*`, `language_model.lm_head.weight`, plus `vision_model.*` and
`multi_modal_projector.*`): the multimodal one exactly when the Config has a vision tower.
Transforms are transposes, reshapes and a concat/split of the fused expert `gate_up_proj`, so a
round trip is bit-exact. `routes` lists every HF tensor with its rule and where it lives in our
tree (stacked arrays: which row); everything else here is built on it.
"""
from typing import Callable, Iterator, NamedTuple

import jax
import numpy as np

from llama4_jax.config import Config, TextConfig, VisionConfig
from llama4_jax.quant import FP8Tensor

MM_PREFIX = "language_model."  # text tensors of the multimodal layout


class Rule(NamedTuple):
  hf: str                                   # HF name (under model.layers.{i}. for block rules)
  ours: tuple[tuple[str, ...], ...]         # our leaf paths it maps to (two for gate_up_proj)
  to_hf: Callable[..., np.ndarray]          # our leaves -> HF tensor
  from_hf: Callable[[np.ndarray], tuple]    # HF tensor -> our leaves


def _t(w):
  return w.T


def _linear(path: tuple[str, ...]) -> tuple:
  """nn.Linear [out, in] <-> our [in, out]."""
  return (path,), _t, lambda w: (w.T,)


def _proj_in(path, heads: int) -> tuple:
  """q/k/v: HF [heads*H, D] <-> ours [D, heads, H]."""
  return ((path,), lambda w: w.reshape(w.shape[0], -1).T,
          lambda w: (w.T.reshape(w.shape[1], heads, -1),))


def _proj_out(path, heads: int) -> tuple:
  """o: HF [D, heads*H] <-> ours [heads, H, D]."""
  return ((path,), lambda w: w.reshape(-1, w.shape[-1]).T,
          lambda w: (w.T.reshape(heads, -1, w.shape[0]),))


def _concat_last(g, u):
  """np.concatenate, or jnp under tracing (jax.eval_shape derives shapes from this table)."""
  xp = jax.numpy if isinstance(g, jax.core.Tracer) else np
  return xp.concatenate([g, u], axis=-1)


def _same(path) -> tuple:
  return (path,), lambda w: w, lambda w: (w,)


def block_rules(cfg: TextConfig, moe: bool) -> list[Rule]:
  n, k = cfg.num_attention_heads, cfg.num_key_value_heads
  f = cfg.intermediate_size
  rules = [
      Rule("input_layernorm.weight", *_same(("attn_norm",))),
      Rule("post_attention_layernorm.weight", *_same(("ffn_norm",))),
      Rule("self_attn.q_proj.weight", *_proj_in(("q",), n)),
      Rule("self_attn.k_proj.weight", *_proj_in(("k",), k)),
      Rule("self_attn.v_proj.weight", *_proj_in(("v",), k)),
      Rule("self_attn.o_proj.weight", *_proj_out(("o",), n)),
  ]
  if not moe:
    return rules + [Rule(f"feed_forward.{name}_proj.weight", *_linear(("mlp", name)))
                    for name in ("gate", "up", "down")]
  return rules + [
      Rule("feed_forward.router.weight", *_linear(("moe", "router"))),
      # [E, D, 2F], in-major: gate is the first F columns, up the last F.
      Rule("feed_forward.experts.gate_up_proj", (("moe", "gate"), ("moe", "up")),
           _concat_last, lambda w: (w[..., :f], w[..., f:])),
      Rule("feed_forward.experts.down_proj", *_same(("moe", "down"))),
  ] + [Rule(f"feed_forward.shared_expert.{name}_proj.weight", *_linear(("moe", f"shared_{name}")))
       for name in ("gate", "up", "down")]


def top_rules(cfg: TextConfig) -> list[Rule]:
  rules = [Rule("model.embed_tokens.weight", *_same(("embed",))),
           Rule("model.norm.weight", *_same(("final_norm",)))]
  if not cfg.tie_word_embeddings:
    rules.append(Rule("lm_head.weight", *_linear(("lm_head",))))
  return rules


def _norm(hf: str, path: tuple[str, ...]) -> list[Rule]:
  return [Rule(f"{hf}.weight", *_same(path + ("scale",))), Rule(f"{hf}.bias", *_same(path + ("bias",)))]


def _head_bias(path, heads: int) -> tuple:
  """q/k/v bias: HF [heads*H] <-> ours [heads, H]."""
  return (path,), lambda b: b.reshape(-1), lambda b: (b.reshape(heads, -1),)


def vision_rules() -> list[Rule]:
  """Unstacked tensors of the vision tower, adapter and projector (full HF names)."""
  v = "vision_model."
  return [
      Rule(v + "patch_embedding.linear.weight", *_linear(("vision", "patch"))),
      Rule(v + "class_embedding", *_same(("vision", "cls"))),
      Rule(v + "positional_embedding_vlm", *_same(("vision", "pos"))),
      *_norm(v + "layernorm_pre", ("vision", "ln_pre")),
      *_norm(v + "layernorm_post", ("vision", "ln_post")),
      Rule(v + "vision_adapter.mlp.fc1.weight", *_linear(("vision", "adapter", "fc1"))),
      Rule(v + "vision_adapter.mlp.fc2.weight", *_linear(("vision", "adapter", "fc2"))),
      Rule("multi_modal_projector.linear_1.weight", *_linear(("projector",))),
  ]


def vision_layer_rules(v: VisionConfig) -> list[Rule]:
  """One encoder layer (under vision_model.model.layers.{i}.)."""
  k = v.num_attention_heads
  rules = [Rule(f"self_attn.{n}_proj.weight", *_proj_in((n,), k)) for n in "qkv"]
  rules += [Rule(f"self_attn.{n}_proj.bias", *_head_bias((f"{n}_bias",), k)) for n in "qkv"]
  return rules + [
      Rule("self_attn.o_proj.weight", *_proj_out(("o",), k)),
      Rule("self_attn.o_proj.bias", *_same(("o_bias",))),
      *[Rule(f"mlp.{n}.weight", *_linear((n,))) for n in ("fc1", "fc2")],
      *[Rule(f"mlp.{n}.bias", *_same((f"{n}_bias",))) for n in ("fc1", "fc2")],
      *_norm("input_layernorm", ("ln1",)), *_norm("post_attention_layernorm", ("ln2",)),
  ]


class Route(NamedTuple):
  rule: Rule
  base: tuple          # our path above the rule's leaves (e.g. ("blocks", slot))
  row: int | None      # the row of the stacked leaves, None when not stacked


def layout_prefix(cfg: Config) -> str:
  return MM_PREFIX if cfg.vision is not None else ""


def routes(cfg: Config) -> dict[str, Route]:
  """HF name -> Route for every tensor of the model's HF layout, in `save_pretrained` order."""
  t, prefix = cfg.text, layout_prefix(cfg)
  out = {}
  if cfg.vision is not None:
    for r in vision_rules()[:-1]:
      out[r.hf] = Route(r, (), None)
    for i in range(cfg.vision.num_hidden_layers):
      for r in vision_layer_rules(cfg.vision):
        out[f"vision_model.model.layers.{i}.{r.hf}"] = Route(r, ("vision", "layers"), i)
    projector = vision_rules()[-1]
    out[projector.hf] = Route(projector, (), None)
  for r in top_rules(t):
    out[prefix + r.hf] = Route(r, (), None)
  for i in range(t.num_hidden_layers):
    for r in block_rules(t, t.is_moe(i)):
      out[f"{prefix}model.layers.{i}.{r.hf}"] = Route(r, ("blocks", i % t.period), i // t.period)
  return out


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def to_hf_tensors(cfg: Config, params: dict,
                  asarray: Callable = np.asarray) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array), one tensor at a time."""
  for name, (rule, base, row) in routes(cfg).items():
    leaves = (_get(params, base + p) for p in rule.ours)
    leaves = (asarray(a if row is None else a[row]) for a in leaves)
    yield name, asarray(rule.to_hf(*leaves))


def expected_hf_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
  """HF name -> shape, derived from our param specs through the table (no array is built)."""
  from llama4_jax import params as params_lib
  shapes = jax.eval_shape(lambda: params_lib.init_params(cfg, jax.random.key(0)))
  hf = jax.eval_shape(lambda p: dict(to_hf_tensors(cfg, p, lambda a: a)), shapes)
  return {name: tuple(a.shape) for name, a in hf.items()}


def leaves_from_hf(rule: Rule, x) -> tuple:
  """`rule.from_hf` of one HF tensor, or of an `FP8Tensor`'s values and scale alike."""
  if isinstance(x, FP8Tensor):
    return tuple(FP8Tensor(v, s) for v, s in zip(rule.from_hf(x.values), rule.from_hf(x.scale)))
  return rule.from_hf(x)


def from_hf_tensors(cfg: Config, get: Callable[[str], np.ndarray]) -> dict:
  """Builds our params tree; `get(name)` returns one HF tensor (already checked to exist), or an
  `FP8Tensor` for an FP8 expert tensor kept in FP8."""
  params: dict = {}
  rows: dict[tuple, dict[int, np.ndarray]] = {}
  for name, (rule, base, row) in routes(cfg).items():
    for path, leaf in zip(rule.ours, leaves_from_hf(rule, get(name))):
      if row is None:
        _set(params, base + path, leaf)
      else:
        rows.setdefault(base + path, {})[row] = leaf
  for path, by_row in rows.items():
    _set(params, path, jax.tree.map(lambda *xs: np.stack(xs), *[by_row[i] for i in range(len(by_row))]))
  params["blocks"] = [params["blocks"][s] for s in range(cfg.text.period)]  # slot dict -> list
  return params
