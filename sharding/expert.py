"""Expert parallelism: dropless MoE dispatch across the `expert` mesh axis.

Each device of the expert axis holds E / ep experts; the tokens are split over the batch axes
(data, fsdp, expert), so the ep devices of one expert group hold different tokens. Two dispatches,
selected by `mesh.expert_dispatch`, compute the same function (nothing is dropped, shapes static):

- `all_to_all` (default): each device sorts its token assignments by expert and sends each one
  only to the device owning its expert (`sharding.exchange`: `ragged_all_to_all` on TPU/GPU, a
  dense all_to_all of padded slots on CPU); the receiver runs its local experts (the grouped
  matmul) and sends the outputs back. Per device and direction that is k x tokens x D values,
  the lower bound. Receive buffers have a fixed slot of C = ceil(capacity x A / ep) rows per
  source device (A = k x local tokens, `mesh.expert_capacity`, default 2): a buffer of
  capacity x A rows. Assignments past a full slot (skewed routing) go in a second pass, run
  only when some slot of the mesh overflowed (`lax.cond`), whose slots hold the A - C rows that
  may be left: its buffer is the worst case, ep x (A - C) rows, as large as the all-gather's,
  reserved by the compiled program but filled and sent only on overflow.
- `all_gather`: the devices of a group all-gather their tokens and routing, each runs its local
  experts on the assignments routed to them, and a reduce-scatter sums the outputs back to the
  token owners: (ep - 1) x local tokens x D values each way. The reference, and an option for
  small groups (at ep = 2, k = 1 it moves as much as the padded all-to-all) with no second pass.

The local math is `llama4_jax.moe`'s; the model only receives a different `moe_fn`.
"""
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from llama4_jax import layers, moe
from sharding.exchange import exchange
from sharding.rules import RULES

DISPATCHES = ("all_to_all", "all_gather")


def _gather_moe(p: dict, x_RD: jax.Array, r: moe.Routing, ffn) -> jax.Array:
  """Routed output of the local tokens, by all-gather + local experts + reduce-scatter."""
  local_experts, k = p["gate"].shape[0], r.experts_RX.shape[1]
  first = jax.lax.axis_index("expert") * local_experts
  gather = partial(jax.lax.all_gather, axis_name="expert", axis=0, tiled=True)
  x_all, w_all, e_all = gather(x_RD), gather(r.weights_RX), gather(r.experts_RX)
  # Assignments to other devices' experts sort last, into a group of their own that is not run.
  local = e_all.reshape(-1) - first
  mine = (local >= 0) & (local < local_experts)
  key = jnp.where(mine, local, local_experts)
  order = jnp.argsort(key, stable=True)
  token = (jnp.arange(key.shape[0], dtype=jnp.int32) // k)[order]
  sizes = jnp.bincount(key, length=local_experts + 1)[:local_experts].astype(jnp.int32)
  partial_out = moe.routed_experts(x_all, token, w_all.reshape(-1)[order], sizes, p, ffn=ffn)
  return jax.lax.psum_scatter(partial_out, "expert", scatter_dimension=0, tiled=True)


def _pass(p: dict, rows_AD: jax.Array, counts_ZE: jax.Array, lo: int, slot: int, ffn,
          ragged: bool) -> jax.Array:
  """Outputs of this device's sorted assignments whose place in their destination's chunk is in
  [lo, lo + slot) (zeros for the others). counts_ZE: every source's assignments per expert."""
  ep, num_experts = counts_ZE.shape
  local = num_experts // ep
  me = jax.lax.axis_index("expert")
  to_dev = _per_device(counts_ZE)
  mine = to_dev[me]
  starts = jnp.cumsum(mine) - mine
  send = jnp.clip(mine - lo, 0, slot)
  recv = jnp.clip(to_dev[:, me] - lo, 0, slot)
  got = exchange(rows_AD, starts + lo, send, recv, slot, "expert", ragged)  # [ep * slot, D]
  # Each source's chunk is sorted by expert: its counts give each received row's local expert.
  ends = jnp.cumsum(jax.lax.dynamic_slice_in_dim(counts_ZE, me * local, local, axis=1), axis=1)
  place = lo + jnp.arange(slot)
  expert = jnp.sum(ends[:, None, :] <= place[None, :, None], axis=-1)  # [source, slot]
  key = jnp.where(jnp.arange(slot)[None, :] < recv[:, None], expert, local).reshape(-1)
  order = jnp.argsort(key, stable=True)
  sizes = jnp.bincount(key, length=local + 1)[:local].astype(jnp.int32)
  ones = jnp.ones(key.shape, rows_AD.dtype)  # the router weight already scaled the rows
  out = moe.routed_experts(got, order, ones, sizes, p, ffn=ffn)
  back = exchange(out, jnp.arange(ep) * slot, recv, send, slot, "expert", ragged)
  a = jnp.arange(rows_AD.shape[0])
  dest = jnp.searchsorted(jnp.cumsum(mine), a, side="right")
  at = a - starts[jnp.minimum(dest, ep - 1)] - lo
  here = (at >= 0) & (at < slot)
  return jnp.where(here[:, None], back.at[dest * slot + at].get(mode="fill", fill_value=0), 0)


def _per_device(counts_ZE: jax.Array) -> jax.Array:
  """[source, destination device] assignments, from every source's counts per expert."""
  ep = counts_ZE.shape[0]
  return counts_ZE.reshape(ep, ep, -1).sum(-1)


def _a2a_moe(p: dict, x_RD: jax.Array, r: moe.Routing, ffn, capacity: float, ragged: bool,
             all_axes: tuple) -> jax.Array:
  """Routed output of the local tokens, by all-to-all dispatch and combine."""
  num_experts = p["router"].shape[-1]
  token_A, weight_A, counts_E = moe.sort_by_expert(r, num_experts)
  rows_AD = x_RD[token_A] * weight_A[:, None]  # the score scales the expert input
  counts_ZE = jax.lax.all_gather(counts_E, "expert")  # [ep, E] int32: the routing metadata
  ep, a = counts_ZE.shape[0], token_A.shape[0]
  slot = min(a, math.ceil(capacity * a / ep))
  out = _pass(p, rows_AD, counts_ZE, 0, slot, ffn, ragged)
  if slot < a:
    overflow = jnp.max(_per_device(counts_ZE)) > slot
    overflow = jax.lax.psum(overflow.astype(jnp.int32), all_axes) > 0  # the same on every device
    second = partial(_pass, p, rows_AD, counts_ZE, slot, a - slot, ffn, ragged)
    out = out + jax.lax.cond(overflow, second, lambda: jnp.zeros_like(rows_AD))
  return jnp.zeros_like(x_RD).at[token_A].add(out)


def moe_fn(mesh: Mesh, ffn=moe.expert_ffn, dispatch: str = "all_to_all",
           capacity: float = 2.0, ragged: bool | None = None) -> moe.MoeFn:
  """An expert-parallel drop-in for `llama4_jax.moe.moe` on `mesh` with grouped matmul `ffn`; the
  plain one when the expert axis has size 1 (GSPMD then shards the MoE like any other layer).
  `ragged`: the all-to-all's implementation (default: ragged unless the mesh's devices are CPUs)."""
  if dispatch not in DISPATCHES:
    raise ValueError(f"mesh.expert_dispatch={dispatch!r}: expected one of {DISPATCHES}")
  batch_axes = tuple(a for a in RULES["batch"] if mesh.shape[a] > 1)
  ep = mesh.shape["expert"]
  if ep == 1:
    return partial(moe.moe, ffn=ffn)
  if ragged is None:
    ragged = mesh.devices.flat[0].platform.lower() != "cpu"

  def body(p: dict, x_BTD: jax.Array, k: int):
    b, t, d = x_BTD.shape
    x_RD = x_BTD.reshape(b * t, d)
    r = moe.route(x_RD, p["router"], k)
    if dispatch == "all_gather":
      routed = _gather_moe(p, x_RD, r, ffn)
    else:
      routed = _a2a_moe(p, x_RD, r, ffn, capacity, ragged, batch_axes)
    shared = layers.swiglu(x_RD, p["shared_gate"], p["shared_up"], p["shared_down"])
    counts = jnp.bincount(r.experts_RX.reshape(-1), length=p["router"].shape[-1])
    return (shared + routed).reshape(b, t, d), r, jax.lax.psum(counts.astype(jnp.int32),
                                                                batch_axes)

  def fn(p: dict, x_BTD: jax.Array, k: int):
    num_experts = p["gate"].shape[0]
    if num_experts % ep:
      raise ValueError(f"{num_experts} experts are not divisible by the expert axis ({ep})")
    specs = {name: P() for name in p} | {n: P("expert") for n in ("gate", "up", "down")}
    routing = moe.Routing(P(batch_axes), P(batch_axes), P(batch_axes))
    return jax.shard_map(partial(body, k=k), mesh=mesh, in_specs=(specs, P(batch_axes)),
                         out_specs=(P(batch_axes), routing, P()), check_vma=False)(p, x_BTD)
  return fn
