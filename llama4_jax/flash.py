"""Flash attention for the model's self-attention: Pallas splash attention (TPU) and the Pallas GPU
flash kernel, neither of which holds [T, S] scores or masks in HBM.

Every Llama 4 attention layer is causal attention with a "same id" mask: a full (NoPE) layer
attends within its document, a chunked RoPE layer within its (document, chunk). `ids` turns both
into per-token segment ids (`model.token_context` computes them), so each layer is plain causal
attention with segment ids, which both kernels support. Padding has id 0 (it attends only to
padding, so no row is empty); outputs at padding positions are unspecified, as for HF.

The functions here are per device: on a mesh `sharding.kernels` runs them under `shard_map`
(Mosaic kernels cannot be auto-partitioned). `interpret=True` runs a kernel with XLA on any backend
(slow; for tests on CPU).
"""
import jax
import jax.numpy as jnp

BLOCK = 512  # query / key rows per splash tile (rows are padded to whole tiles)


def ids(cfg, seg_BT: jax.Array, chunk_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(full-layer ids, chunked-layer ids) [B, T]: the segment id, refined by the chunk index."""
  full = seg_BT.astype(jnp.int32)
  if cfg.attention_chunk_size is None:
    return full, full
  per_segment = seg_BT.shape[1] // cfg.attention_chunk_size + 2
  chunked = full * per_segment + jnp.maximum(chunk_BT, 0) // cfg.attention_chunk_size + 1
  return full, jnp.where(full != 0, chunked, 0)


def _pad(q_BTNH, k_BSKH, v_BSKH, ids_BT, lanes: int = 128):
  """Pads the row to whole kernel tiles (a multiple of `lanes`, then of BLOCK) with tokens of id
  -1, which no real token sees. Returns the padded arrays and the tile size."""
  t = q_BTNH.shape[1]
  tile = min(BLOCK, -(-t // lanes) * lanes)
  extra = -t % tile
  if extra:
    pad = lambda x, v=0: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2),
                                 constant_values=v)
    q_BTNH, k_BSKH, v_BSKH, ids_BT = pad(q_BTNH), pad(k_BSKH), pad(v_BSKH), pad(ids_BT, -1)
  return q_BTNH, k_BSKH, v_BSKH, ids_BT, tile


def splash(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, ids_BT: jax.Array,
           window: int | None, interpret: bool = False) -> jax.Array:
  """TPU splash attention (GQA native). A chunked layer's static mask is a causal window of
  `window` keys, so tiles outside every chunk are skipped: O(T x window) work. Mosaic rejects
  bf16 operands under `jax_default_matmul_precision=highest`: trace it at the default precision
  (the kernel accumulates in fp32 regardless)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)
  t, h = q_BTNH.shape[1], q_BTNH.shape[3]
  q_BTNH, k_BSKH, v_BSKH, ids_BT, bq = _pad(q_BTNH, k_BSKH, v_BSKH, ids_BT)
  b, s, n, _ = q_BTNH.shape
  bk = bq
  mask = (mask_lib.CausalMask((s, s)) if window is None or window >= s else
          mask_lib.LocalMask((s, s), (window - 1, 0), offset=0))
  blocks = kernel_lib.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                                 block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                                 block_kv_dq=bk)
  kernel = kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([mask] * n), block_sizes=blocks,
                                      head_shards=1, q_seq_shards=1, interpret=interpret)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, heads, T, H]
  q = heads_first(q_BTNH * jnp.asarray(h ** -0.5, q_BTNH.dtype))  # the kernel does not scale
  segments = kernel_lib.SegmentIds(q=ids_BT, kv=ids_BT)
  o = jax.vmap(kernel)(q, heads_first(k_BSKH), heads_first(v_BSKH), segments)
  return heads_first(o)[:, :t]


def gpu_flash(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, ids_BT: jax.Array,
              window: int | None, interpret: bool = False) -> jax.Array:
  """The Pallas GPU (Triton) flash kernel. It takes as many KV heads as query heads, so GQA's KV
  heads are repeated; it has no window, so chunked layers cost O(T^2) (masked by their ids)."""
  from jax.experimental.pallas.ops.gpu import attention as kernel_lib
  del window  # the chunk restriction is in the ids
  t, n, h = q_BTNH.shape[1:]
  g = n // k_BSKH.shape[2]
  q, k, v, ids_BT, _ = _pad(q_BTNH, k_BSKH, v_BSKH, ids_BT, lanes=64)
  b = 64  # Triton tiles
  blocks = kernel_lib.BlockSizes(block_q=b, block_k=b, block_q_dkv=b, block_kv_dkv=b,
                                 block_q_dq=b, block_kv_dq=b)
  k, v = (jnp.repeat(a, g, axis=2) for a in (k, v))
  o = kernel_lib.mha(q, k, v, ids_BT, sm_scale=h ** -0.5, causal=True, block_sizes=blocks,
                     interpret=interpret)
  return o[:, :t]
