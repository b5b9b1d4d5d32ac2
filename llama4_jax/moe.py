"""Llama 4 mixture of experts: top-k sigmoid routing, dropless sorted dispatch, shared expert.

Reference: transformers `modeling_llama4.py` (Llama4Router, Llama4TextMoe, Llama4TextExperts).
HF runs every expert on every token with zero-scaled inputs. Here tokens are sorted by expert and
only the chosen experts run (no capacity, nothing dropped), so the FLOPs follow the *active*
experts. The grouped matmul is `jax.lax.ragged_dot` where it is native (GPU/TPU); on CPU
ragged_dot lowers to a dense dot over all experts, so there rows are padded into per-expert blocks
and a loop runs each block through its expert's weights, sliced in place.
"""
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from llama4_jax import layers


class Routing(NamedTuple):
  weights_RX: jax.Array   # sigmoid of the selected logits, in the activation dtype
  experts_RX: jax.Array   # int32 expert ids
  logits_RE: jax.Array    # raw router logits, fp32


def route(x_RD: jax.Array, router_DE: jax.Array, k: int) -> Routing:
  """Top-k on raw logits; sigmoid of the selected logits only (no softmax, no renormalisation)."""
  # Router logits in fp32: top-k on bf16 logits flips on near-ties.
  logits = jnp.einsum("RD,DE->RE", x_RD, router_DE, preferred_element_type=jnp.float32)
  top_v, top_i = jax.lax.top_k(logits, k)
  return Routing(jax.nn.sigmoid(top_v).astype(x_RD.dtype), top_i.astype(jnp.int32), logits)


def _block_size(rows: int, num_experts: int) -> int:
  """Rows per block: padding costs at most E * b rows, so keep E * b <= rows / 2."""
  b = max(1, rows // (2 * num_experts))
  return min(512, 1 << (b.bit_length() - 1))


def expert_ffn_blocked(x_AD: jax.Array, group_sizes_E: jax.Array, gate_EDF: jax.Array,
                       up_EDF: jax.Array, down_EFD: jax.Array, unroll: bool = False) -> jax.Array:
  """SwiGLU experts over rows sorted by expert; blocks of b rows each belong to one expert.

  Rows past sum(group_sizes) belong to no expert and give zeros (as with ragged_dot). `unroll`
  runs the same blocks as straight-line code (XLA's cost analysis counts a loop body once).
  """
  m, d = x_AD.shape
  e = group_sizes_E.shape[0]
  b = _block_size(m, e)
  nblocks = -(-m // b) + e  # sum_e ceil(g_e / b) < m / b + e
  padded_E = -(-group_sizes_E // b) * b
  ends_E = jnp.cumsum(padded_E)
  group_of_row = jnp.repeat(jnp.arange(e), group_sizes_E, total_repeat_length=m)
  row_in_group = jnp.arange(m) - (jnp.cumsum(group_sizes_E) - group_sizes_E)[group_of_row]
  dest_A = (ends_E - padded_E)[group_of_row] + row_in_group
  dest_A = jnp.where(jnp.arange(m) < jnp.sum(group_sizes_E), dest_A, nblocks * b)  # unassigned
  x_padded = jnp.zeros((nblocks * b, d), x_AD.dtype).at[dest_A].set(x_AD, mode="drop")
  # Trailing empty blocks index past the last group; their rows are zero, any expert will do.
  block_expert = jnp.minimum(jnp.searchsorted(ends_E, jnp.arange(nblocks) * b, side="right"), e - 1)
  used = ends_E[-1] // b  # blocks holding rows; the rest are padding
  y = _blocks(unroll, x_padded.reshape(nblocks, b, d), block_expert, used, gate_EDF, up_EDF,
              down_EFD)
  return y.reshape(nblocks * b, d).at[dest_A].get(mode="fill", fill_value=0)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocks(unroll, x_UbD, expert_U, used, gate_EDF, up_EDF, down_EFD):
  """Each of the first `used` blocks [b, D] through its expert's SwiGLU (the rest give zeros): a
  loop over blocks that slices the expert's weights in place (no per-block copies of them), with
  a hand-written backward that adds each block's weight gradient into its expert's in place
  (autodiff of the loop would add a full [E, D, F] zero-padded gradient per block). Padding blocks
  past `used` cost nothing; `unroll` runs all blocks as straight-line code instead."""
  return _blocks_fwd(unroll, x_UbD, expert_U, used, gate_EDF, up_EDF, down_EFD)[0]


def _loop(unroll: bool, used: jax.Array, nblocks: int, body, init):
  """body(i, carry) for i < used (a loop with a dynamic trip count), or over all blocks unrolled."""
  if unroll:
    return jax.lax.fori_loop(0, nblocks, body, init, unroll=True)
  return jax.lax.fori_loop(0, used, body, init)


def _blocks_fwd(unroll, x_UbD, expert_U, used, gate_EDF, up_EDF, down_EFD):
  nblocks, b, _ = x_UbD.shape
  f = gate_EDF.shape[-1]

  def block(i, out):
    x, ex = x_UbD[i], expert_U[i]
    g, u = x @ gate_EDF[ex], x @ up_EDF[ex]
    y = (jax.nn.silu(g) * u) @ down_EFD[ex]
    return tuple(o.at[i].set(v) for o, v in zip(out, (y, g, u)))
  zeros = (jnp.zeros_like(x_UbD), jnp.zeros((nblocks, b, f), x_UbD.dtype),
           jnp.zeros((nblocks, b, f), x_UbD.dtype))
  y, g, u = _loop(unroll, used, nblocks, block, zeros)
  return y, (x_UbD, expert_U, used, gate_EDF, up_EDF, down_EFD, g, u)


def _blocks_bwd(unroll, res, dy_UbD):
  x_UbD, expert_U, used, gate_EDF, up_EDF, down_EFD, g_UbF, u_UbF = res

  def block(i, carry):
    dgate, dup, ddown, dx = carry
    x, ex, g, u, dy = x_UbD[i], expert_U[i], g_UbF[i], u_UbF[i], dy_UbD[i]
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    dh = dy @ down_EFD[ex].T
    dg, du = dh * u * sig * (1 + g * (1 - sig)), dh * silu
    return (dgate.at[ex].add(x.T @ dg), dup.at[ex].add(x.T @ du),
            ddown.at[ex].add((silu * u).T @ dy),
            dx.at[i].set(dg @ gate_EDF[ex].T + du @ up_EDF[ex].T))
  init = (*(jnp.zeros_like(w) for w in (gate_EDF, up_EDF, down_EFD)), jnp.zeros_like(x_UbD))
  dgate, dup, ddown, dx = _loop(unroll, used, x_UbD.shape[0], block, init)
  return (dx, None, None, dgate, dup, ddown)


_blocks.defvjp(_blocks_fwd, _blocks_bwd)


def expert_ffn_ragged(x_AD: jax.Array, group_sizes_E: jax.Array, gate_EDF: jax.Array,
                      up_EDF: jax.Array, down_EFD: jax.Array) -> jax.Array:
  """The same with `jax.lax.ragged_dot` (native grouped GEMM on GPU/TPU)."""
  gs = group_sizes_E.astype(jnp.int32)
  g = jax.lax.ragged_dot(x_AD, gate_EDF, gs)
  u = jax.lax.ragged_dot(x_AD, up_EDF, gs)
  return jax.lax.ragged_dot(jax.nn.silu(g) * u, down_EFD, gs)


def expert_ffn(x_AD, group_sizes_E, gate_EDF, up_EDF, down_EFD) -> jax.Array:
  """SwiGLU experts over rows sorted by expert (rows past sum(group_sizes) give zeros), by the
  default backend's best algorithm. A caller compiling for another target (a TPU topology from a
  CPU host) passes `expert_ffn_ragged` or `expert_ffn_blocked` itself (`sharding.kernels`)."""
  if gate_EDF.shape[0] == 1 and jax.default_backend() == "cpu":
    # one (local) expert: a plain FFN, rows past its group give zeros (no per-block weight copies)
    y = layers.swiglu(x_AD, gate_EDF[0], up_EDF[0], down_EFD[0])
    return jnp.where((jnp.arange(x_AD.shape[0]) < group_sizes_E[0])[:, None], y, 0)
  fn = expert_ffn_blocked if jax.default_backend() == "cpu" else expert_ffn_ragged
  return fn(x_AD, group_sizes_E, gate_EDF, up_EDF, down_EFD)


ROW_CHUNK = 8192  # routed rows whose expert FFN work is held at once (forward and backward)


def routed_experts(x_RD: jax.Array, token_A: jax.Array, weight_A: jax.Array,
                   group_sizes_E: jax.Array, p: dict, chunk: int = ROW_CHUNK,
                   ffn: Callable = expert_ffn) -> jax.Array:
  """sum over assignments a of expert(x[token_a] * weight_a), scattered back to the tokens.

  Assignments are sorted by expert, group_sizes_E of them each (any past their sum give zeros).
  More than `chunk` assignments run as a rematerialised scan over chunks (the last one padded with
  zero-weight rows): only one chunk's gathered rows and [rows, F] intermediates are alive at a
  time, forward and backward.
  """
  a, d = token_A.shape[0], x_RD.shape[1]
  run = lambda tok, w, sizes: ffn(x_RD[tok] * w[:, None], sizes, p["gate"], p["up"], p["down"])
  if a <= chunk:
    return jnp.zeros_like(x_RD).at[token_A].add(run(token_A, weight_A, group_sizes_E))
  # Pad to whole chunks: padded rows lie past sum(group_sizes), so they give zeros.
  token_A, weight_A = (jnp.pad(v, (0, -a % chunk)) for v in (token_A, weight_A))
  ends_E = jnp.cumsum(group_sizes_E)
  chunk_starts = jnp.arange(token_A.shape[0] // chunk)[:, None] * chunk
  clip = lambda v: jnp.clip(v[None, :], chunk_starts, chunk_starts + chunk)
  chunk_sizes = clip(ends_E) - clip(ends_E - group_sizes_E)  # each group's rows in each chunk
  body = jax.checkpoint(lambda _, xs: (None, run(*xs)))
  _, ys = jax.lax.scan(body, None, (token_A.reshape(-1, chunk), weight_A.reshape(-1, chunk),
                                    chunk_sizes))
  return jnp.zeros_like(x_RD).at[token_A].add(ys.reshape(-1, d))


def sort_by_expert(r: Routing, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(token of each sorted assignment, its routing weight, tokens per expert)."""
  n, k = r.experts_RX.shape
  experts_A = r.experts_RX.reshape(-1)
  order_A = jnp.argsort(experts_A, stable=True)
  token_A = (jnp.arange(n * k, dtype=jnp.int32) // k)[order_A]
  counts_E = jnp.bincount(experts_A, length=num_experts).astype(jnp.int32)
  return token_A, r.weights_RX.reshape(-1)[order_A], counts_E


MoeFn = Callable[[dict, jax.Array, int], tuple[jax.Array, Routing, jax.Array]]


def moe(p: dict, x_BTD: jax.Array, k: int,
        ffn: Callable = expert_ffn) -> tuple[jax.Array, Routing, jax.Array]:
  """Shared expert + routed experts (grouped matmul `ffn`). Returns (output, routing, tokens per
  expert)."""
  b, t, d = x_BTD.shape
  x_RD = x_BTD.reshape(b * t, d)
  r = route(x_RD, p["router"], k)
  token_A, weight_A, counts_E = sort_by_expert(r, p["router"].shape[-1])
  # The router score scales the expert *input* (Meta and HF), not its output.
  routed_RD = routed_experts(x_RD, token_A, weight_A, counts_E, p, ffn=ffn)
  shared_RD = layers.swiglu(x_RD, p["shared_gate"], p["shared_up"], p["shared_down"])
  return (shared_RD + routed_RD).reshape(b, t, d), r, counts_E
