"""Expert-parallel MoE dispatch (`sharding/expert.py`) on 8 fake CPU devices: both dispatches
equal the single-device MoE (forward and gradients) on three meshes, for top-1, top-2 and a router
that sends every token to one expert; the all-to-all path's compiled program moves the tokens,
not an all-gather of them, within 2x the lower bound."""
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import sharding as sh
from llama4_jax import moe
from train import hlo

D, F, E = 32, 64, 8
TOKENS = (8, 16)  # [B, T]: 16 tokens a device on 8 devices
MESHES = {"expert8": dict(expert=8), "fsdp2-expert4": dict(fsdp=2, expert=4),
          "data2-expert2-fsdp2": dict(data=2, expert=2, fsdp=2)}
ROUTINGS = {"top1": 1, "top2": 2, "one_expert": 2}  # one_expert: a zero router, every token to 0, 1


def make_params(key, routing: str = "top1") -> dict:
  ks = jax.random.split(key, 7)
  n = lambda k, shape: jax.random.normal(k, shape) * 0.2
  p = {"router": n(ks[0], (D, E)), "gate": n(ks[1], (E, D, F)), "up": n(ks[2], (E, D, F)),
       "down": n(ks[3], (E, F, D)), "shared_gate": n(ks[4], (D, F)),
       "shared_up": n(ks[5], (D, F)), "shared_down": n(ks[6], (F, D))}
  if routing == "one_expert":  # all logits tie: top-k takes the lowest indices for every token
    p["router"] = jnp.zeros_like(p["router"])
  return p


def _loss(fn, k, p, x):
  out, _, counts = fn(p, x, k)
  return jnp.sum(jnp.sin(out)), (out, counts)


@pytest.fixture(scope="module")
def reference():
  """routing -> (params, x, loss, (out, counts), grads) of the single-device MoE."""
  x = jax.random.normal(jax.random.key(1), (*TOKENS, D))
  out = {}
  for name, k in ROUTINGS.items():
    p = make_params(jax.random.key(0), name)
    grad = jax.jit(jax.value_and_grad(partial(_loss, moe.moe, k), (0, 1), has_aux=True))
    out[name] = (p, x, *grad(p, x))
  return out


def _close(a, b):
  """Equal up to fp32 reordering: sharded sums add in another order, so the absolute tolerance is
  1e-5 or, if more, 2e-6 of the array's largest entry (a [32, 64] gradient with entries near 13
  differed by 1.7e-5, ~18 ulps of 13, on an AVX-512 host; the same at the commit before this
  stop's changes)."""
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, atol=max(1e-5, 2e-6 * float(np.max(np.abs(b)))),
                             rtol=1e-5)


@pytest.mark.parametrize("dispatch", ["all_to_all", "all_gather"])
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("mesh_name", MESHES)
def test_dispatch_equals_single_device_forward_and_gradients(reference, mesh_name, routing,
                                                             dispatch):
  p, x, (loss, (out, counts)), grads = reference[routing]
  mesh = sh.make_mesh(sh.MeshConfig(**MESHES[mesh_name]))
  fn = sh.expert.moe_fn(mesh, moe.expert_ffn_blocked, dispatch)
  grad = jax.jit(jax.value_and_grad(partial(_loss, fn, ROUTINGS[routing]), (0, 1), has_aux=True))
  (s_loss, (s_out, s_counts)), s_grads = grad(p, jax.device_put(x, sh.batch_sharding(mesh)))
  np.testing.assert_array_equal(np.asarray(s_counts), np.asarray(counts))  # nothing dropped
  if routing == "one_expert":
    assert np.asarray(counts)[:2].tolist() == [128, 128]
  _close(s_out, out)
  _close(s_loss, loss)
  jax.tree.map(_close, s_grads, grads)


def test_one_pass_when_the_slots_hold_everything(reference):
  """capacity = ep: a slot holds a device's every assignment, no second pass is compiled."""
  p, x, (_, (out, _)), grads = reference["one_expert"]
  mesh = sh.make_mesh(sh.MeshConfig(expert=8))
  fn = sh.expert.moe_fn(mesh, moe.expert_ffn_blocked, "all_to_all", capacity=8.0)
  grad = jax.jit(jax.value_and_grad(partial(_loss, fn, 2), (0, 1), has_aux=True))
  assert "conditional" not in grad.lower(p, x).compile().as_text()
  (_, (s_out, _)), s_grads = grad(p, x)
  _close(s_out, out)
  jax.tree.map(_close, s_grads, grads)


def _program(dispatch: str, k: int, of_grad: bool) -> str:
  """Optimized HLO of the MoE layer (or its gradient in x) on (expert 8), 64 tokens a device."""
  mesh = sh.make_mesh(sh.MeshConfig(expert=8))
  fn = sh.expert.moe_fn(mesh, moe.expert_ffn_blocked, dispatch)
  p = make_params(jax.random.key(0))
  p = jax.device_put(p, {n: NamedSharding(mesh, P("expert" if n in ("gate", "up", "down")
                                                    else None)) for n in p})
  x = jax.device_put(jnp.zeros((8, 64, D)), sh.batch_sharding(mesh))
  f = (lambda x: fn(p, x, k)[0]) if not of_grad else jax.grad(lambda x: jnp.sum(fn(p, x, k)[0]))
  return jax.jit(f).lower(x).compile().as_text()


@pytest.mark.parametrize("k", [1, 2])
def test_all_to_all_moves_tokens_once_within_twice_the_lower_bound(k):
  bound = k * 64 * D * 4  # k x tokens x D x fp32 bytes, each way (dispatch, combine)
  for of_grad, directions in ((False, 2), (True, 4)):  # the gradient adds both transposes
    text = _program("all_to_all", k, of_grad)
    sent = hlo.collective_bytes(text, 8)
    gathers = [l for l in text.splitlines() if re.search(r"\sall-gather(-start)?\(", l)]
    assert gathers and all(not re.search(r"\bf(32|16)\[", l) for l in gathers)  # ids only
    metadata = sent["all-gather"] + sent["all-reduce"]
    assert metadata < 0.05 * bound and sent["reduce-scatter"] == 0
    assert 0 < sent["all-to-all"] <= 2 * directions * bound
    overflow = hlo.collective_bytes(text, 8, conditional=True)  # runs only when a slot overflows
    assert 0 < overflow["all-to-all"] <= 8 * directions * bound
  gathered = hlo.collective_bytes(_program("all_gather", k, False), 8)
  assert gathered["all-gather"] >= 7 * 64 * D * 4  # every token to every device of the group
