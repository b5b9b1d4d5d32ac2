"""Expert parallelism: dropless MoE dispatch across the `expert` mesh axis.

Each device of the expert axis holds E / ep experts. Inside `shard_map`, the devices of one
expert group all-gather their tokens and routing decisions, each runs its local experts on the
assignments routed to them (any number: nothing is dropped, shapes stay static), and a
reduce-scatter sums the partial outputs back to the devices that own the tokens. The local math is
`llama4_jax.moe`'s; the model only receives a different `moe_fn`.
"""
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from llama4_jax import layers, moe
from sharding.rules import RULES


def _local_moe(p: dict, x_BTD: jax.Array, k: int, num_experts: int, batch_axes: tuple, ffn):
  b, t, d = x_BTD.shape
  x_ND = x_BTD.reshape(b * t, d)
  r = moe.route(x_ND, p["router"], k)
  local_experts = p["gate"].shape[0]
  first = jax.lax.axis_index("expert") * local_experts
  gather = partial(jax.lax.all_gather, axis_name="expert", axis=0, tiled=True)
  x_all, w_all, e_all = gather(x_ND), gather(r.weights_NK), gather(r.experts_NK)
  # Assignments to other devices' experts sort last, into a group of their own that is not run.
  local = e_all.reshape(-1) - first
  mine = (local >= 0) & (local < local_experts)
  key = jnp.where(mine, local, local_experts)
  order = jnp.argsort(key, stable=True)
  token = (jnp.arange(key.shape[0], dtype=jnp.int32) // k)[order]
  sizes = jnp.bincount(key, length=local_experts + 1)[:local_experts].astype(jnp.int32)
  partial_out = moe.routed_experts(x_all, token, w_all.reshape(-1)[order], sizes, p, ffn=ffn)
  routed = jax.lax.psum_scatter(partial_out, "expert", scatter_dimension=0, tiled=True)
  shared = layers.swiglu(x_ND, p["shared_gate"], p["shared_up"], p["shared_down"])
  counts = jnp.bincount(r.experts_NK.reshape(-1), length=num_experts).astype(jnp.int32)
  counts = jax.lax.psum(counts, batch_axes)
  return (shared + routed).reshape(b, t, d), r, counts


def moe_fn(mesh: Mesh, ffn=moe.expert_ffn) -> moe.MoeFn:
  """An expert-parallel drop-in for `llama4_jax.moe.moe` on `mesh` with grouped matmul `ffn`; the
  plain one when the expert axis has size 1 (GSPMD then shards the MoE like any other layer)."""
  batch_axes = tuple(a for a in RULES["batch"] if mesh.shape[a] > 1)
  ep = mesh.shape["expert"]
  if ep == 1:
    return partial(moe.moe, ffn=ffn)

  def fn(p: dict, x_BTD: jax.Array, k: int):
    num_experts = p["gate"].shape[0]
    if num_experts % ep:
      raise ValueError(f"{num_experts} experts are not divisible by the expert axis ({ep})")
    specs = {name: P() for name in p} | {n: P("expert") for n in ("gate", "up", "down")}
    routing = moe.Routing(P(batch_axes), P(batch_axes), P(batch_axes))
    body = partial(_local_moe, k=k, num_experts=num_experts, batch_axes=batch_axes, ffn=ffn)
    return jax.shard_map(body, mesh=mesh, in_specs=(specs, P(batch_axes)),
                         out_specs=(P(batch_axes), routing, P()), check_vma=False)(p, x_BTD)
  return fn
