"""Context parallelism: a long row split over the `context` mesh axis.

The residual stream is sharded over `context` along the sequence (RULES["seq"]); everything but
self-attention is per token. For attention each device keeps its own queries and all-gathers the
keys and values of its row (GQA keeps them small: K heads, not N). A chunked RoPE layer then
reads only the keys its query block can see — its own chunk, at most `window - 1` tokens back —
so its work per device is O(T/C x window); a NoPE layer attends over the whole row, causally.
Masks, RoPE angles and temperatures are per token and arrive sharded like the queries.
"""
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from llama4_jax import attention
from sharding.rules import RULES


def _local(q_BTNH, k_BSKH, v_BSKH, mask_BTS, window: int | None, block: int):
  """This device's queries [offset, offset + T) against the whole row's keys [0, S)."""
  k_BSKH = jax.lax.all_gather(k_BSKH, "context", axis=1, tiled=True)
  v_BSKH = jax.lax.all_gather(v_BSKH, "context", axis=1, tiled=True)
  t, s = q_BTNH.shape[1], k_BSKH.shape[1]
  offset = jax.lax.axis_index("context") * t
  attend_block = jax.checkpoint(attention.attend)
  outs = []
  for start in range(0, t, block):
    end = min(start + block, t)
    q, mask = q_BTNH[:, start:end], mask_BTS[:, start:end]
    if window is None:  # every earlier key of the row
      outs.append(attend_block(q, k_BSKH, v_BSKH, mask))
      continue
    size = min(s, end - start + window - 1)  # the keys this block's chunks can reach
    lo = jnp.clip(offset + start - window + 1, 0, s - size)
    window_of = partial(jax.lax.dynamic_slice_in_dim, start_index=lo, slice_size=size)
    outs.append(attend_block(q, window_of(k_BSKH, axis=1), window_of(v_BSKH, axis=1),
                             window_of(mask, axis=2)))
  return jnp.concatenate(outs, axis=1)


def attend_fn(mesh: Mesh, block: int = attention.QUERY_BLOCK):
  """`l4.Hooks.attend_fn` for `mesh`: None when the context axis has size 1."""
  if mesh.shape["context"] == 1:
    return None
  batch = tuple(a for a in RULES["batch"] if mesh.shape[a] > 1) or None
  heads = "tensor" if mesh.shape["tensor"] > 1 else None
  tokens = P(batch, "context", heads)

  def fn(q, k, v, mask, window):
    body = partial(_local, window=window, block=block)
    return jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens, P(batch, "context")),
                         out_specs=tokens, check_vma=False)(q, k, v, mask)
  return fn
