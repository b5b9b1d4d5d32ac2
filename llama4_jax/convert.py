"""HF Llama 4 checkpoints <-> our params: ONE table of names and transforms, and safetensors I/O.

Reference: ../shared/reference/llama4_hf_spec.md §3. Both HF layouts are read and written:
`Llama4ForCausalLM` (`model.*`, `lm_head.weight`) and `Llama4ForConditionalGeneration`
(`language_model.model.*`, `language_model.lm_head.weight`, plus `vision_model.*` and
`multi_modal_projector.*`). Transforms are transposes, reshapes and a concat/split of the fused
expert `gate_up_proj`, so a round trip is bit-exact.
"""
from typing import Callable, Iterator, NamedTuple

import numpy as np

from llama4_jax.config import Config, TextConfig

MM_PREFIX = "language_model."
# Tensors of the multimodal layout that the text model does not use; carried through unchanged.
PASSTHROUGH_PREFIXES = ("vision_model.", "multi_modal_projector.")
PASSTHROUGH_KEY = "hf_passthrough"


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
  import jax
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


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def to_hf_tensors(cfg: Config, params: dict, prefix: str,
                  asarray: Callable = np.asarray) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array) for the text model, layer by layer."""
  t = cfg.text
  for r in top_rules(t):
    yield prefix + r.hf, asarray(r.to_hf(*(asarray(_get(params, p)) for p in r.ours)))
  period = t.period
  for i in range(t.num_hidden_layers):
    block = params["blocks"][i % period]
    for r in block_rules(t, t.is_moe(i)):
      leaves = (asarray(_get(block, p)[i // period]) for p in r.ours)
      yield f"{prefix}model.layers.{i}.{r.hf}", asarray(r.to_hf(*leaves))


def expected_hf_shapes(cfg: Config, prefix: str) -> dict[str, tuple[int, ...]]:
  """HF name -> shape for the text model, derived from our param specs through the table (no
  array is built)."""
  import jax  # local: only needed here, keeps the table importable without tracing
  from llama4_jax import params as params_lib
  shapes = jax.eval_shape(lambda: params_lib.init_params(cfg, jax.random.key(0)))
  hf = jax.eval_shape(lambda p: dict(to_hf_tensors(cfg, p, prefix, lambda a: a)), shapes)
  return {name: tuple(a.shape) for name, a in hf.items()}


def from_hf_tensors(cfg: Config, get: Callable[[str], np.ndarray], prefix: str) -> dict:
  """Builds our params tree; `get(name)` returns one HF tensor (already checked to exist)."""
  t = cfg.text
  params: dict = {}
  for r in top_rules(t):
    for path, leaf in zip(r.ours, r.from_hf(get(prefix + r.hf))):
      _set(params, path, leaf)
  period = t.period
  per_slot: list[dict] = [{} for _ in range(period)]
  for i in range(t.num_hidden_layers):
    for r in block_rules(t, t.is_moe(i)):
      for path, leaf in zip(r.ours, r.from_hf(get(f"{prefix}model.layers.{i}.{r.hf}"))):
        _set(per_slot[i % period], path + (i // period,), leaf)
  params["blocks"] = [_stack_rows(s) for s in per_slot]
  return params


def _stack_rows(tree: dict) -> dict | np.ndarray:
  """{..., leaf: {row: array}} -> {..., leaf: array stacked over rows}."""
  if isinstance(next(iter(tree.values())), np.ndarray):
    return np.stack([tree[g] for g in range(len(tree))])
  return {k: _stack_rows(v) for k, v in tree.items()}
