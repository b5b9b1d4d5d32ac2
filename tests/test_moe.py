"""Dropless MoE: equal to HF's run-every-expert formula, cost that follows the active experts."""
import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama4_jax import moe


def _params(key, d, f, e):
  ks = jax.random.split(key, 7)
  n = lambda k, s, fan: jax.random.normal(k, s) / fan ** 0.5
  return {"router": n(ks[0], (d, e), d), "gate": n(ks[1], (e, d, f), d),
          "up": n(ks[2], (e, d, f), d), "down": n(ks[3], (e, f, d), f),
          "shared_gate": n(ks[4], (d, f), d), "shared_up": n(ks[5], (d, f), d),
          "shared_down": n(ks[6], (f, d), f)}


def hf_formula(p, x_BTD, k):
  """HF Llama4TextMoe: every expert sees every token, input scaled by sigmoid(selected logit)."""
  x = x_BTD.reshape(-1, x_BTD.shape[-1])
  logits = x @ p["router"]
  top_v, top_i = jax.lax.top_k(logits, k)
  scores = jnp.zeros_like(logits).at[jnp.arange(x.shape[0])[:, None], top_i].set(jax.nn.sigmoid(top_v))
  out = jax.nn.silu(x @ p["shared_gate"]) * (x @ p["shared_up"]) @ p["shared_down"]
  for e in range(logits.shape[1]):
    xin = x * scores[:, e:e + 1]
    out = out + (jax.nn.silu(xin @ p["gate"][e]) * (xin @ p["up"][e])) @ p["down"][e]
  return out.reshape(x_BTD.shape)


@pytest.mark.parametrize("e,k", [(4, 1), (8, 2), (16, 1)])
def test_dispatch_equals_hf_formula(e, k):
  p = _params(jax.random.key(e), 32, 48, e)
  x = jax.random.normal(jax.random.key(1), (3, 37, 32))
  want = hf_formula(p, x, k)
  got, _, counts = jax.jit(moe.moe, static_argnums=2)(p, x, k)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert int(counts.sum()) == 3 * 37 * k


def test_blocked_and_ragged_grouped_matmuls_agree():
  p = _params(jax.random.key(0), 16, 24, 8)
  x = jax.random.normal(jax.random.key(1), (200, 16))
  sizes = jnp.asarray([0, 50, 3, 0, 100, 1, 46, 0])  # empty groups and a dominant one
  args = (x, sizes, p["gate"], p["up"], p["down"])
  np.testing.assert_allclose(moe.expert_ffn_blocked(*args), moe.expert_ffn_ragged(*args),
                             atol=1e-5, rtol=0)
  # one expert (every expert on its own device), rows past its group (other devices') give zeros
  one = (x, jnp.asarray([120]), p["gate"][:1], p["up"][:1], p["down"][:1])
  np.testing.assert_allclose(moe.expert_ffn(*one), moe.expert_ffn_ragged(*one), atol=1e-5, rtol=0)
  assert not np.asarray(moe.expert_ffn(*one))[120:].any()
  # routed assignments in chunks that split groups: values and gradients
  token = jnp.asarray(np.random.RandomState(0).randint(0, 50, 200))
  weight = jax.random.uniform(jax.random.key(2), (200,))
  loss = lambda chunk: lambda x, g: jnp.sum(jnp.sin(moe.routed_experts(
      x[:50], token, weight, sizes, {**p, "gate": g}, chunk=chunk)))
  whole = jax.jit(jax.value_and_grad(loss(1024), (0, 1)))(x, p["gate"])
  for chunk in (40, 64):  # 200 assignments: whole chunks, and a padded last chunk
    chunked = jax.jit(jax.value_and_grad(loss(chunk), (0, 1)))(x, p["gate"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), chunked,
                 whole)


def test_no_token_dropped_when_every_token_picks_one_expert():
  p = _params(jax.random.key(2), 16, 24, 8)
  p["router"] = p["router"].at[:, 5].set(0.0).at[0, 5].set(100.0)
  x = jax.random.normal(jax.random.key(3), (2, 64, 16)).at[..., 0].set(1.0)
  got, r, counts = jax.jit(moe.moe, static_argnums=2)(p, x, 1)
  assert counts.tolist() == [0, 0, 0, 0, 0, 128, 0, 0]
  np.testing.assert_allclose(got, hf_formula(p, x, 1), atol=1e-5, rtol=0)


def _moe_flops(num_experts: int, tokens: int = 2048, d: int = 64, f: int = 128) -> float:
  """XLA's FLOPs of the MoE on CPU, its loop over blocks unrolled: the cost analysis counts a
  loop body once."""
  p = jax.eval_shape(lambda: _params(jax.random.key(0), d, f, num_experts))
  x = jax.ShapeDtypeStruct((1, tokens, d), jnp.float32)
  ffn = functools.partial(moe.expert_ffn_blocked, unroll=True)
  compiled = jax.jit(moe.moe, static_argnums=(2, 3)).lower(p, x, 1, ffn).compile()
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_cost_follows_active_experts():
  f8, f64 = _moe_flops(8), _moe_flops(64)
  # active FLOPs: routed expert + shared expert, 2 * 3 * D * F each per token
  active = 2 * 2 * 3 * 64 * 128 * 2048
  assert f64 <= 1.3 * f8, (f8, f64)
  assert f8 <= 2.0 * active, (f8, active)
