"""Llama 4 attention: GQA, RoPE + QK norm or NoPE + temperature tuning, chunked/full causal masks.

Reference: transformers `modeling_llama4.py` (Llama4TextAttention, create_chunked_causal_mask) and
docs/hf_reference.md §2.2-§2.6.

Masks are built once per forward from per-token metadata (cache index, segment id, position in
chunk) and shared by every layer. A segment id of 0 marks padding; HF's left-padded
`attention_mask` is the one-segment special case, so chunks start at each row's first real token.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama4_jax import layers
from llama4_jax.config import TextConfig


QUERY_BLOCK = 256  # queries per block when long self-attention skips invisible keys
REMAT_SCORES = 1 << 20  # T x keys per head above which blocks recompute scores in the backward


class Context(NamedTuple):
  """Per-forward tensors shared by all layers."""
  angles_BTJ: jax.Array      # RoPE angles of the queries/new keys, fp32
  temp_BT: jax.Array         # NoPE query temperature multiplier, fp32
  full_mask_BTS: jax.Array   # causal & same segment & key not padding
  chunk_mask_BTS: jax.Array  # full mask & same attention chunk
  cache_index: jax.Array | None  # where new keys are written into the KV cache (None: no cache)
  ids_BT: tuple | None = None  # (full, chunked) layers' segment ids for flash kernels (flash.ids)


def segment_starts(seg_BS: jax.Array) -> jax.Array:
  """Index of the first token of the run of equal segment ids each token belongs to."""
  s = seg_BS.shape[1]
  idx = jnp.arange(s, dtype=jnp.int32)
  boundary = jnp.concatenate(
      [jnp.ones_like(seg_BS[:, :1], bool), seg_BS[:, 1:] != seg_BS[:, :-1]], axis=1)
  return jax.lax.cummax(jnp.where(boundary, idx, 0), axis=1)


def leading_pads(seg_BS: jax.Array) -> jax.Array:
  """[B] zeros before each row's first non-zero entry (HF's `left_padding_tokens`)."""
  return jnp.sum(jnp.cumsum(seg_BS != 0, axis=1) == 0, axis=1).astype(jnp.int32)


def make_context(cfg: TextConfig, q_idx_T, k_idx_S, seg_q_BT, seg_k_BS, chunk_q_BT, chunk_k_BS,
                 temp_pos_BT, positions_BT, inv_freq, cache_index=None) -> Context:
  """Masks, RoPE angles and temperatures from token metadata (all int32)."""
  full = ((k_idx_S[None, None, :] <= q_idx_T[None, :, None])
          & (seg_k_BS[:, None, :] == seg_q_BT[:, :, None]) & (seg_k_BS[:, None, :] != 0))
  chunk = full
  if cfg.attention_chunk_size is not None:
    c = cfg.attention_chunk_size
    chunk = full & (chunk_k_BS[:, None, :] // c == chunk_q_BT[:, :, None] // c)
  # Temperature tuning (arXiv 2501.19399): log1p(floor((i + 1) / floor_scale)) * attn_scale + 1.
  pos = temp_pos_BT.astype(jnp.float32)
  temp = jnp.log1p(jnp.floor((pos + 1.0) / cfg.floor_scale)) * cfg.attn_scale + 1.0
  return Context(layers.rope_angles(positions_BT, inv_freq), temp, full, chunk, cache_index)


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
  """Softmax attention with grouped KV heads; scores and softmax in fp32.

  Query head n uses KV head n // (N/K) (HF's repeat_kv). The G query heads of a KV head are
  folded into the row axis, so both products are plain batched matmuls over (B, K).
  """
  b, t, n, h = q_BTNH.shape
  k = k_BSKH.shape[2]
  g = n // k
  q_BKQH = q_BTNH.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
  s_BKQS = jnp.einsum("BKQH,BSKH->BKQS", q_BKQH, k_BSKH,
                      preferred_element_type=jnp.float32) * (h ** -0.5)
  s_BKGTS = s_BKQS.reshape(b, k, g, t, -1)
  # A finite fill keeps fully masked rows (padding queries) finite instead of NaN.
  s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, jnp.finfo(jnp.float32).min)
  p_BKQS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKH.dtype).reshape(b, k, g * t, -1)
  o_BKQH = jnp.einsum("BKQS,BSKH->BKQH", p_BKQS, v_BSKH)
  return o_BKQH.reshape(b, k, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def attend_blocked(q_BTNH, k_BTKH, v_BTKH, mask_BTT, window: int | None, block: int) -> jax.Array:
  """`attend` over query blocks, skipping keys no query of the block can see (self-attention only).

  Causality bounds keys by the block's end. A chunked layer's query at index i sees only keys of
  its own chunk, and chunks (even restarted per packed document) start at or after i - window + 1,
  so its keys lie in [start - window + 1, end): O(T * window) work instead of O(T^2).
  Past REMAT_SCORES scores per head (T = 1024 full, or a longer T in 1024-token chunks) each block
  is rematerialised: the backward holds one block's scores at a time, not [T, keys]. Below it
  they are kept (a train step of T = 512 is ~3% faster on CPU without recomputing them).
  """
  t = q_BTNH.shape[1]
  keys = t if window is None else min(window, t)
  attend_block = jax.checkpoint(attend) if t * keys > REMAT_SCORES else attend
  outs = []
  for start in range(0, t, block):
    end = min(start + block, t)
    lo = 0 if window is None else max(0, start - window + 1)
    outs.append(attend_block(q_BTNH[:, start:end], k_BTKH[:, lo:end], v_BTKH[:, lo:end],
                             mask_BTT[:, start:end, lo:end]))
  return jnp.concatenate(outs, axis=1)


def attention(p: dict, x_BTD: jax.Array, ctx: Context, cfg: TextConfig, use_rope: bool,
              chunked: bool, kv: dict | None = None, attend_fn=None,
              flash_fn=None) -> tuple[jax.Array, dict | None]:
  """One attention sublayer. `kv` is this layer's cache {'k','v': [B, S, K, H]} or None.
  attend_fn(q, k, v, mask, window): self-attention computed elsewhere (context parallelism);
  flash_fn(q, k, v, ids, window): a flash kernel on segment ids (llama4_jax/flash.py)."""
  q, k, v = (layers.dense(x_BTD, p[name]) for name in ("q", "k", "v"))
  if use_rope:
    q, k = layers.apply_rope(q, ctx.angles_BTJ), layers.apply_rope(k, ctx.angles_BTJ)
    if cfg.use_qk_norm:  # weightless per-head RMSNorm, after RoPE, RoPE layers only
      q, k = layers.rms_norm(q, None, cfg.rms_norm_eps), layers.rms_norm(k, None, cfg.rms_norm_eps)
  elif cfg.attn_temperature_tuning:
    q = (q.astype(jnp.float32) * ctx.temp_BT[:, :, None, None]).astype(q.dtype)
  if kv is not None:
    at = (0, ctx.cache_index, 0, 0)
    kv = {"k": jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), at),
          "v": jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), at)}
    k, v = kv["k"].astype(q.dtype), kv["v"].astype(q.dtype)
  window = cfg.attention_chunk_size if chunked else None
  mask = ctx.chunk_mask_BTS if chunked else ctx.full_mask_BTS
  if kv is None and flash_fn is not None and ctx.ids_BT is not None:
    o = flash_fn(q, k, v, ctx.ids_BT[int(chunked)], window)  # the [B, T, S] masks go unused
  elif kv is None and attend_fn is not None:
    o = attend_fn(q, k, v, mask, window)
  elif kv is None and q.shape[1] >= 2 * QUERY_BLOCK:
    o = attend_blocked(q, k, v, mask, window, QUERY_BLOCK)
  else:
    o = attend(q, k, v, mask)
  b, t, n, h = o.shape
  return layers.dense(o.reshape(b, t, n * h), p["o"].reshape(n * h, -1)), kv
