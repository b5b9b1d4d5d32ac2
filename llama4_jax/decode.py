"""KV-cache decoding: prefill a prompt, then extend one (or a few) tokens at a time.

Every layer keeps a full-length cache and the §1.8 masks are applied on absolute cache indices, so
chunked layers respect chunk boundaries during decode exactly as HF does (HF keeps only the last
chunk for those layers; the attention result is the same). Rows share one cache index: prompts are
left-padded, with `attention_mask` marking the pads. `generate` samples on top of it (greedy or
temperature / top-p), stopping each row at its first stop token.
"""
import jax
import jax.numpy as jnp

from llama4_jax import attention, layers, model
from llama4_jax.config import Config


def init_cache(cfg: Config, batch: int, max_len: int, dtype=jnp.float32) -> dict:
  """An empty cache for `max_len` tokens."""
  t = cfg.text
  groups = t.num_hidden_layers // t.period
  shape = (groups, batch, max_len, t.num_key_value_heads, t.head_dim)
  kv = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(t.period)]
  return {"kv": kv, "seg": jnp.zeros((batch, max_len), jnp.int32),
          "length": jnp.zeros((), jnp.int32), "next_pos": jnp.zeros((batch,), jnp.int32)}


def extend(cfg: Config, params: dict, cache: dict, input_ids: jax.Array, attention_mask=None,
           positions=None, pixel_values=None) -> tuple[jax.Array, dict]:
  """Appends tokens [B, T] to the cache; returns their logits [B, T, V] and the new cache.

  pixel_values: the tiles of the images whose `<|patch|>` tokens are among these (a prefill).
  attention_mask (1/0 for these tokens, prefill only) defaults to continuing each row's sequence.
  More tokens than the cache has room for raise (under jit: NaN logits).
  positions default to the previous position + 1 (starting at 0), like HF without position_ids.
  """
  t = cfg.text
  b, n = input_ids.shape
  offset = cache["length"]
  max_len = cache["seg"].shape[1]
  if not isinstance(offset, jax.core.Tracer) and int(offset) + n > max_len:
    raise ValueError(f"extend: {int(offset)} cached + {n} new tokens exceed the cache's max_len "
                     f"{max_len} (init_cache(..., max_len=) larger)")
  if attention_mask is None:
    last = jax.lax.dynamic_index_in_dim(cache["seg"], jnp.maximum(offset - 1, 0), 1, False)
    seg_new = jnp.broadcast_to(jnp.where(offset > 0, last, 1)[:, None], (b, n))
  else:
    seg_new = jnp.asarray(attention_mask, jnp.int32)
  seg_k = jax.lax.dynamic_update_slice(cache["seg"], seg_new, (0, offset))
  k_idx = jnp.arange(max_len, dtype=jnp.int32)
  q_idx = offset + jnp.arange(n, dtype=jnp.int32)
  chunk_k = k_idx[None, :] - attention.leading_pads(seg_k)[:, None]  # as HF: from the first real token
  chunk_q = jax.lax.dynamic_slice_in_dim(chunk_k, offset, n, axis=1)
  if positions is None:
    positions = cache["next_pos"][:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
  positions = jnp.asarray(positions, jnp.int32)
  inv_freq = layers.rope_inv_freq(t.head_dim, t.rope_theta, t.rope_scaling)
  ctx = attention.make_context(t, q_idx, k_idx, jnp.ones_like(seg_new), seg_k, chunk_q, chunk_k,
                               jnp.broadcast_to(q_idx, (b, n)), positions, inv_freq, offset)
  out = model.run(t, params, model.embed(cfg, params, input_ids, pixel_values), ctx, cache["kv"])
  new_cache = {"kv": out.cache, "seg": seg_k, "length": offset + n,
               "next_pos": positions[:, -1] + 1}
  # Under jit an overflowing write would be clamped onto the last slots: NaN logits instead.
  logits = jnp.where(offset + n > max_len, jnp.nan, out.logits)
  return logits, new_cache


def pick(logits_BV: jax.Array, key, temperature: float, top_p: float) -> jax.Array:
  """Next tokens [B]: argmax at temperature 0, else sampled from the top-p nucleus."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV.astype(jnp.float32) / temperature
  if top_p < 1:
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the first token is always kept
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(cfg: Config, params: dict, prompt_BT, prompt_mask_BT, key, max_new: int,
             temperature: float = 0.0, top_p: float = 1.0, stop_ids: tuple[int, ...] = (),
             pixel_values=None, on_token=None) -> tuple[jax.Array, jax.Array]:
  """(tokens [B, max_new], live [B, max_new]) after left-padded prompts; `live` is 1 up to and
  including each row's first token in `stop_ids`. Jit with cfg, max_new, temperature, top_p,
  stop_ids and on_token static. `on_token(tokens [B], live [B])`, when given, is called on the
  host after every step, in order (to stream text)."""
  b, p = prompt_BT.shape
  cache = init_cache(cfg, b, p + max_new, jax.tree.leaves(params)[0].dtype)
  logits, cache = extend(cfg, params, cache, prompt_BT, prompt_mask_BT,
                         pixel_values=pixel_values)
  stops = jnp.asarray(stop_ids or (-1,), jnp.int32)

  def step(carry, key):
    cache, last, done = carry
    tok = pick(last, key, temperature, top_p)
    if on_token is not None:
      jax.debug.callback(on_token, tok, ~done, ordered=True)
    logits, cache = extend(cfg, params, cache, tok[:, None])
    return (cache, logits[:, -1], done | jnp.isin(tok, stops)), (tok, ~done)
  init = (cache, logits[:, -1], jnp.zeros((b,), bool))
  _, (toks, live) = jax.lax.scan(step, init, jax.random.split(key, max_new))
  return toks.T, live.T.astype(jnp.int32)
