"""On-the-fly int4 inference (`l4.quantize`): the forward on int4 params equals the forward on the
same weights dequantized (the per-layer dequantization is exact), its error against bf16 stays
within the stated bound, KV-cache decoding on int4 equals the int4 full forward, and the released
models' memory is computed without allocating."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference as ref
import llama4_jax as l4
from llama4_jax import convert

CFG = l4.presets.tiny()
forward = jax.jit(l4.forward, static_argnums=0)


@pytest.fixture(scope="module")
def params():
  hf = ref.causal_lm(CFG.text, seed=0)  # O(1) activations (weights N(0, 1/fan_in))
  p = convert.from_hf_tensors(CFG, lambda n: hf.state_dict()[n].numpy())
  return jax.tree.map(lambda w: jnp.asarray(w, jnp.bfloat16), p)


def test_int4_forward_is_the_dequantized_model_and_near_bf16(params):
  q = l4.quantize(params, group_size=8)
  assert l4.quant.nbytes(q) < 0.5 * l4.quant.nbytes(params)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 272, (2, 28)))
  plain = {**q, "blocks": [l4.quant.dequantize_layer(b) for b in q["blocks"]]}
  got = np.asarray(forward(CFG, q, ids), np.float32)
  np.testing.assert_allclose(got, np.asarray(forward(CFG, plain, ids), np.float32), atol=1e-5)
  # the stated bound: int4 (groups of 8) moves logits by at most 2 and on average by 0.2 standard
  # deviations of the bf16 logits (measured: max 1.50, mean 0.16 at std 1.01)
  want = np.asarray(forward(CFG, params, ids), np.float32)
  diff = np.abs(got - want)
  assert diff.max() <= 2 * want.std() and diff.mean() <= 0.2 * want.std()


def test_int4_decode_equals_the_int4_forward(params):
  q = l4.quantize(params, group_size=8)
  prompt = np.random.RandomState(1).randint(0, 256, (1, 9)).astype(np.int32)
  toks, _ = jax.jit(l4.generate, static_argnums=(0, 5))(
      CFG, q, jnp.asarray(prompt), jnp.ones_like(jnp.asarray(prompt)), jax.random.key(0), 6)
  ids = list(prompt[0])
  for _ in range(6):  # right-padded to one width (causal: one compile)
    row = np.zeros((1, 16), np.int32)
    row[0, :len(ids)] = ids
    ids.append(int(jnp.argmax(forward(CFG, q, jnp.asarray(row))[0, len(ids) - 1])))
  assert np.asarray(toks[0]).tolist() == ids[9:]


def test_released_models_int4_memory_without_allocating():
  for name, bf16_gib, int4_gib in (("scout", 200.74, 56.16), ("maverick", 746.38, 201.11)):
    cfg = dataclasses.replace(getattr(l4.presets, name)(), vision=None)
    init = lambda: l4.init_params(cfg, jax.random.key(0), jnp.bfloat16)
    p = jax.eval_shape(init)
    q = jax.eval_shape(lambda: l4.quantize(init(), "int4", 64))
    assert l4.quant.nbytes(p) / 2**30 == pytest.approx(bf16_gib, abs=0.01)
    assert l4.quant.nbytes(q) / 2**30 == pytest.approx(int4_gib, abs=0.01)
