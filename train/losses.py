"""Loss functions, pure: every stage picks one of these; the train step never changes."""
import jax
import jax.numpy as jnp


def next_token_targets(batch: dict) -> tuple[jax.Array, jax.Array]:
  """(targets, weights) [B, T]: token t predicts t+1 within its own document only.

  An optional `loss_mask` [B, T] (1 where a token is a training target, e.g. assistant tokens in
  SFT) further restricts the weights.
  """
  tokens, seg = batch["tokens"], batch["segment_ids"]
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
  weights = jnp.concatenate([same_doc, jnp.zeros_like(same_doc[:, :1])], axis=1)
  if "loss_mask" in batch:
    target_mask = jnp.concatenate([batch["loss_mask"][:, 1:],
                                   jnp.zeros_like(batch["loss_mask"][:, :1])], axis=1)
    weights = weights & (target_mask != 0)
  return targets, weights.astype(jnp.float32)


def target_logps(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(log p(target), logsumexp of the logits) [B, T], in fp32: THE token log-prob of every stage."""
  logits = logits_BTV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0] - lse, lse


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array,
                  z_loss: float = 0.0) -> tuple[jax.Array, dict]:
  """Summed (not averaged) weighted NLL and z-loss, in fp32; callers divide by the token count.
  Without a z-loss nothing of it is computed (its metric is 0)."""
  logp, lse = target_logps(logits_BTV, targets_BT)
  nll = -jnp.sum(logp * weights_BT)
  z = z_loss * jnp.sum(jnp.square(lse) * weights_BT) if z_loss else jnp.zeros((), jnp.float32)
  return nll + z, {"nll_sum": nll, "z_sum": z}


def chunked_cross_entropy(head_fn, x_BTD: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array,
                          z_loss: float = 0.0, chunk: int = 0) -> tuple[jax.Array, dict]:
  """`cross_entropy(head_fn(x), ...)` over chunks of `chunk` positions: each chunk's logits are
  computed, reduced and (in the backward pass) recomputed, so [B, T, V] is never held at once.
  chunk=0, or one that does not divide T into several chunks, is one chunk."""
  b, t, d = x_BTD.shape
  if chunk <= 0 or chunk >= t or t % chunk:
    return cross_entropy(head_fn(x_BTD), targets_BT, weights_BT, z_loss)
  split = lambda a: jnp.swapaxes(a.reshape(b, t // chunk, chunk, *a.shape[2:]), 0, 1)

  @jax.checkpoint
  def body(carry, xs):
    x, targets, weights = xs
    out = cross_entropy(head_fn(x), targets, weights, z_loss)
    return jax.tree.map(jnp.add, carry, out), None

  zero = jnp.zeros((), jnp.float32)
  init = (zero, {"nll_sum": zero, "z_sum": zero})
  out, _ = jax.lax.scan(body, init, (split(x_BTD), split(targets_BT), split(weights_BT)))
  return out


def load_balance(router_logits_LNE: jax.Array, counts_LE: jax.Array, k: int) -> jax.Array:
  """Switch-style auxiliary loss E * sum_e f_e * P_e, averaged over MoE layers.

  f_e: fraction of routed assignments to expert e (no gradient); P_e: mean router softmax
  probability. Llama 4 routes by sigmoid; the softmax here only measures how peaked routing is.
  """
  if router_logits_LNE.shape[0] == 0:
    return jnp.zeros((), jnp.float32)
  e = counts_LE.shape[-1]
  f = counts_LE.astype(jnp.float32) / jnp.maximum(jnp.sum(counts_LE, -1, keepdims=True), 1)
  p = jnp.mean(jax.nn.softmax(router_logits_LNE, axis=-1), axis=1)
  return e * jnp.mean(jnp.sum(jax.lax.stop_gradient(f) * p, axis=-1)) / k
