"""The Llama 4 decoder: embeddings (+ image features, `vision.py`), scanned layer groups, final
norm, LM head.

Reference: transformers `modeling_llama4.py` (Llama4TextModel, Llama4TextDecoderLayer,
Llama4ForCausalLM, Llama4ForConditionalGeneration). Pure functions of (config, params pytree, token ids).
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llama4_jax import attention, flash, layers, moe, quant, vision
from llama4_jax.config import Config, TextConfig


class Output(NamedTuple):
  logits: jax.Array | None      # [B, T, V] in the compute dtype (None when with_head=False)
  hidden: jax.Array | None      # [L, B, T, D] each layer's output (before the final norm)
  expert_counts: jax.Array      # [L_moe, E] tokens routed to each expert, MoE layers in order
  router_logits: jax.Array      # [L_moe, B*T, E] fp32 raw router logits
  cache: dict | None            # the updated KV cache when one was passed
  final: jax.Array | None = None  # [B, T, D] the last layer's output, when with_head=False


ACTIVATION_AXES = ("batch", "seq", "act_embed")  # logical axes of the residual stream [B, T, D]


class Hooks(NamedTuple):
  """How the caller places the model's work; the model itself knows no mesh.

  moe_fn: computes an MoE sublayer (`sharding.expert` passes an expert-parallel one).
  constrain: (activation, its logical axes) -> activation; `sharding` passes a sharding constraint,
    applied at block boundaries, around the MoE and on the logits.
  attend_fn: (q, k, v, mask, window) -> attention output, for self-attention without a cache
    (`sharding.context` passes a context-parallel one); None: computed here.
  flash_fn: (q, k, v, segment ids, window) -> self-attention by a flash kernel without a cache
    (`llama4_jax.flash.splash` / `gpu_flash`; `sharding.kernels` wraps them for a mesh); None:
    the XLA path.
  weights: one layer's params (as scanned) -> its plain weight arrays, at the start of the layer
    (inside remat): where int4 weights are dequantized (the default, `quant.dequantize_layer`:
    identity on plain arrays) or adapters added (train/lora.py), one layer at a time.
  scan: the layers run as a `lax.scan` over groups of `period` layers (one compiled group), or
    False: as unrolled Python (longer compiles; XLA:CPU usually runs a small model's train step
    faster, up to ~13%, without per-group weight slices and stacked residual buffers).
  """
  moe_fn: moe.MoeFn = moe.moe
  constrain: Callable[[jax.Array, tuple[str, ...]], jax.Array] = layers.unconstrained
  weights: Callable[[dict], dict] = quant.dequantize_layer
  attend_fn: Callable | None = None
  flash_fn: Callable | None = None
  scan: bool = True


def _block(p: dict, x: jax.Array, ctx: attention.Context, cfg: TextConfig, slot: int,
           kv: dict | None, hooks: Hooks):
  """One decoder layer: pre-norm attention and FFN with residuals."""
  use_rope, chunked, is_moe = cfg.layer_kind(slot)
  x = hooks.constrain(x, ACTIVATION_AXES)
  h, kv = attention.attention(p, layers.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps), ctx, cfg,
                              use_rope, chunked, kv, hooks.attend_fn, hooks.flash_fn)
  x = x + h
  y = layers.rms_norm(x, p["ffn_norm"], cfg.rms_norm_eps)
  aux = {}
  if is_moe:
    y = hooks.constrain(y, ACTIVATION_AXES)
    y, r, counts = hooks.moe_fn(p["moe"], y, cfg.num_experts_per_tok)
    y = hooks.constrain(y, ACTIVATION_AXES)
    aux = {"counts": counts, "logits": r.logits_RE}
  else:
    y = layers.swiglu(y, p["mlp"]["gate"], p["mlp"]["up"], p["mlp"]["down"])
  return x + y, aux, kv


def _decoder(cfg: TextConfig, blocks: list, x: jax.Array, ctx: attention.Context,
             caches: list | None, remat: bool, hooks: Hooks, keep_hidden: bool):
  """Runs all layers: a scan over groups of `period` layers (a Python loop when not hooks.scan)."""
  period = len(blocks)

  def block(p, x, ctx, kv, slot):
    return _block(hooks.weights(p), x, ctx, cfg, slot, kv, hooks)
  if remat:  # per layer: the backward holds one layer's intermediates at a time
    block = jax.checkpoint(block, static_argnums=(4,))

  def group(x, xs):
    block_params, block_caches = xs
    hidden, auxes, new_caches = [], [], []
    for s in range(period):
      kv = None if block_caches is None else block_caches[s]
      x, aux, kv = block(block_params[s], x, ctx, kv, s)
      hidden.append(x)
      auxes.append(aux)
      new_caches.append(kv)
    stacked = jnp.stack(hidden) if keep_hidden else None
    return x, (stacked, auxes, None if block_caches is None else new_caches)
  if hooks.scan:
    x, ys = jax.lax.scan(group, x, (blocks, caches))
  else:
    outs = []
    for xs in _unstack((blocks, caches), cfg.num_hidden_layers // period):
      x, y = group(x, xs)
      outs.append(y)
    ys = jax.tree.map(lambda *a: jnp.stack(a), *outs)
  return x, ys


def _unstack(tree, n: int) -> list:
  """[n, ...] leaves -> n trees of [...] leaves, by one split per leaf.

  The split's transpose is one concatenate of the n gradients. Indexing a[g] per group would
  transpose to n zero-padded [n, ...] gradients that XLA adds (on the bench config, buffers the
  size of each stacked weight written and read again in every step).
  """
  leaves, treedef = jax.tree.flatten(tree)
  parts = [[jnp.squeeze(p, 0) for p in jnp.split(a, n)] for a in leaves]
  return [treedef.unflatten([p[g] for p in parts]) for g in range(n)]


def _ordered_moe_aux(auxes: list, key: str) -> jax.Array | None:
  """Per-slot [G, ...] arrays -> [L_moe, ...] in layer order (layer g * period + slot)."""
  per_slot = [a[key] for a in auxes if a]
  if not per_slot:
    return None
  stacked = jnp.stack(per_slot, axis=1)
  return stacked.reshape(-1, *stacked.shape[2:])


def embed_tokens(cfg: TextConfig, params: dict, input_ids: jax.Array) -> jax.Array:
  if not isinstance(input_ids, jax.core.Tracer):
    ids = np.asarray(input_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
      bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
      raise ValueError(f"input_ids contain {bad.ravel()[:5].tolist()} outside the vocabulary "
                       f"[0, {cfg.vocab_size})")
  # Under jit an out-of-range id reads NaN instead of a silently clamped row; negative ids are
  # sent out of range first (jnp.take would wrap them to valid rows).
  ids = jnp.where(input_ids < 0, cfg.vocab_size, input_ids)
  x = jnp.take(params["embed"], ids, axis=0, mode="fill", fill_value=jnp.nan)
  if cfg.pad_token_id is None:
    return x
  # HF's nn.Embedding(padding_idx=pad_token_id): the pad token's row gets no gradient from the
  # lookup (a tied LM head still trains it, as in HF).
  return jnp.where((input_ids == cfg.pad_token_id)[..., None], jax.lax.stop_gradient(x), x)


def embed(cfg: Config, params: dict, input_ids: jax.Array, pixel_values=None, *,
          remat: bool = False, constrain=layers.unconstrained) -> jax.Array:
  """Token embeddings, with image features in the `image_token_index` positions: of
  `pixel_values` [N, C, S, S] (every image's tiles in order over the batch, as HF), or, for
  training batches, [B, tiles, C, S, S] (each row's own tiles, zero tiles padding a row)."""
  x = embed_tokens(cfg.text, params, input_ids)
  if pixel_values is None:
    return x
  per_row = pixel_values.ndim == 5
  tiles = pixel_values.reshape(-1, *pixel_values.shape[-3:]) if per_row else pixel_values
  _, rows = vision.image_features(cfg, params, tiles, remat=remat, constrain=constrain)
  if per_row:
    rows = rows.reshape(pixel_values.shape[0], -1, rows.shape[-1])
    return vision.merge_rows(x, input_ids, rows, cfg.image_token_index)
  return vision.merge(x, input_ids, rows, cfg.image_token_index)


def head(cfg: TextConfig, params: dict, x_BTD: jax.Array) -> jax.Array:
  x = layers.rms_norm(x_BTD, params["final_norm"], cfg.rms_norm_eps)
  w_DV = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
  return layers.dense(x, w_DV)


def run(cfg: TextConfig, params: dict, x_BTD: jax.Array, ctx: attention.Context,
        caches: list | None = None, *, remat: bool = False,
        return_hidden: bool = False, hooks: Hooks = Hooks(), with_head: bool = True) -> Output:
  """Layers + head on embeddings, with a prepared attention context.

  with_head=False skips the LM head and returns the last layer's output as `final` (for losses that
  apply `head` chunk by chunk and never hold [B, T, V] logits)."""
  mask_axes = ("batch", "seq", "kv_seq")  # [B, T, S] masks split like the queries
  ctx = ctx._replace(full_mask_BTS=hooks.constrain(ctx.full_mask_BTS, mask_axes),
                     chunk_mask_BTS=hooks.constrain(ctx.chunk_mask_BTS, mask_axes))
  x, (hidden, auxes, caches) = _decoder(cfg, params["blocks"], x_BTD, ctx, caches, remat,
                                        hooks, return_hidden)
  n, b, t, d = cfg.num_hidden_layers, *x_BTD.shape
  counts = _ordered_moe_aux(auxes, "counts")
  logits_moe = _ordered_moe_aux(auxes, "logits")
  if counts is None:
    counts = jnp.zeros((0, cfg.num_local_experts), jnp.int32)
    logits_moe = jnp.zeros((0, b * t, cfg.num_local_experts), jnp.float32)
  # hidden: [G, period, B, T, D] -> [L, B, T, D] in layer order.
  hidden = hidden.reshape(n, b, t, d) if return_hidden else None
  if not with_head:
    return Output(None, hidden, counts, logits_moe, caches, x)
  logits = hooks.constrain(head(cfg, params, x), ("batch", "seq", "vocab"))
  return Output(logits, hidden, counts, logits_moe, caches)


def token_context(cfg: TextConfig, batch: int, length: int, attention_mask=None, positions=None,
                  segment_ids=None) -> attention.Context:
  """Attention context for a full (uncached) sequence.

  attention_mask: HF-style 1/0 (left, right or mid-row padding): a 0 hides that key from every
    query; chunks count from each row's first real token and the temperature index counts pads,
    exactly as HF.
  segment_ids: packed rows (0 = padding); every document restarts its chunks, temperature index
    and (when `positions` is None) its RoPE positions.
  """
  idx = jnp.arange(length, dtype=jnp.int32)
  if segment_ids is not None:
    seg_q = seg_k = jnp.asarray(segment_ids, jnp.int32)
    chunk = idx[None, :] - attention.segment_starts(seg_k)
  else:  # HF: every query sees the earlier real keys; chunks count from the first real token
    seg_k = (jnp.ones((batch, length), jnp.int32) if attention_mask is None
             else jnp.asarray(attention_mask, jnp.int32))
    seg_q = jnp.ones_like(seg_k)
    chunk = idx[None, :] - attention.leading_pads(seg_k)[:, None]
  temp_pos = chunk if segment_ids is not None else jnp.broadcast_to(idx, (batch, length))
  if positions is None:
    positions = chunk if segment_ids is not None else jnp.broadcast_to(idx, (batch, length))
  inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
  ctx = attention.make_context(cfg, idx, idx, seg_q, seg_k, chunk, chunk, temp_pos,
                               jnp.asarray(positions, jnp.int32), inv_freq)
  return ctx._replace(ids_BT=flash.ids(cfg, seg_k, chunk))


def apply(cfg: Config, params: dict, input_ids: jax.Array, attention_mask=None,
          pixel_values=None, *, positions=None, segment_ids=None,
          remat: bool = False, return_hidden: bool = False, hooks: Hooks = Hooks(),
          with_head: bool = True) -> Output:
  """Full forward with every output (see `Output`), the one entry point of every stage.
  pixel_values [N, C, S, S]: the tiles of every image in the batch in order, or [B, tiles, C, S,
  S]: each row's own; their features fill the `image_token_index` positions (early fusion, as
  `Llama4ForConditionalGeneration`). Packed rows: `segment_ids` and `positions` [B, T]."""
  t = cfg.text
  b, length = input_ids.shape
  ctx = token_context(t, b, length, attention_mask, positions, segment_ids)
  x = embed(cfg, params, input_ids, pixel_values, remat=remat, constrain=hooks.constrain)
  return run(t, params, x, ctx, remat=remat, return_hidden=return_hidden, hooks=hooks,
             with_head=with_head)


def forward(cfg: Config, params: dict, input_ids: jax.Array, attention_mask=None,
            pixel_values=None, *, positions=None, segment_ids=None, remat: bool = False,
            hooks: Hooks = Hooks()) -> jax.Array:
  """Logits [B, T, V] for token ids [B, T] (and image tiles, for a multimodal model)."""
  return apply(cfg, params, input_ids, attention_mask, pixel_values, positions=positions,
               segment_ids=segment_ids, remat=remat, hooks=hooks).logits
