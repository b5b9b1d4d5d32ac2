"""Invariants HF cannot show: causality, packing, scan == unrolled, remat, KV cache, bf16."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama4_jax as l4
from conftest import apply_jit, extend_jit
from llama4_jax import model

# 8 layers (2 scan groups of the 4-layer pattern), top-2 routing.
CFG = l4.Config(text=dataclasses.replace(l4.presets.tiny().text, num_hidden_layers=8,
                                         num_experts_per_tok=2, initializer_range=0.125))


@pytest.fixture(scope="module")
def params():
  # initializer_range 1/sqrt(D) keeps activations O(1), so the tolerances below mean something
  return jax.jit(l4.init_params, static_argnums=0)(CFG, jax.random.key(0))


def _ids(seed, shape=(2, 24)):
  return jnp.asarray(np.random.RandomState(seed).randint(0, 256, shape))


def test_causality_gradient_is_exactly_zero_after_t(params):
  t = CFG.text
  ids = _ids(0)
  x = model.embed_tokens(t, params, ids)
  ctx = model.token_context(t, 2, 24)
  grad_fn = jax.jit(jax.grad(lambda x, pos: model.run(t, params, x, ctx).logits[:, pos].sum()))
  for pos in (0, 9, 17):
    grad = grad_fn(x, pos)
    assert np.all(np.asarray(grad[:, pos + 1:]) == 0.0), pos
    assert np.abs(np.asarray(grad[:, :pos + 1])).max() > 0


def test_packed_documents_equal_separate_sequences(params):
  a, b = _ids(1, (1, 13)), _ids(2, (1, 11))
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.asarray([[1] * 13 + [2] * 11])
  out = apply_jit(CFG, params, packed, segment_ids=seg).logits
  np.testing.assert_allclose(out[:, :13], apply_jit(CFG, params, a).logits, atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[:, 13:], apply_jit(CFG, params, b).logits, atol=1e-5, rtol=0)
  # A padded tail (segment 0) changes nothing for the documents.
  padded = jnp.concatenate([packed, jnp.zeros((1, 4), packed.dtype)], axis=1)
  seg_p = jnp.concatenate([seg, jnp.zeros((1, 4), seg.dtype)], axis=1)
  out_p = apply_jit(CFG, params, padded, segment_ids=seg_p).logits
  np.testing.assert_allclose(out_p[:, :24], out, atol=1e-5, rtol=0)


def test_scan_equals_unrolled_and_remat_equals_no_remat(params):
  ids = _ids(3)
  scanned = apply_jit(CFG, params, ids, return_hidden=True)
  unrolled = apply_jit(CFG, params, ids, hooks=l4.Hooks(scan=False), return_hidden=True)
  np.testing.assert_allclose(scanned.logits, unrolled.logits, atol=1e-6, rtol=0)
  np.testing.assert_allclose(scanned.hidden, unrolled.hidden, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(scanned.expert_counts, unrolled.expert_counts)

  def loss(p, remat, scan=True):
    logits = l4.forward(CFG, p, ids, remat=remat, hooks=l4.Hooks(scan=scan))
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])
  g0 = jax.jit(jax.grad(loss), static_argnums=(1, 2))(params, False)
  g1 = jax.jit(jax.grad(loss), static_argnums=(1, 2))(params, True)
  g2 = jax.jit(jax.grad(loss), static_argnums=(1, 2))(params, False, False)  # unrolled layers
  for g in (g1, g2):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), g0, g)


def test_expert_counts_cover_every_token(params):
  out = apply_jit(CFG, params, _ids(4))
  t = CFG.text
  moe_layers = [i for i in range(t.num_hidden_layers) if t.is_moe(i)]
  assert out.expert_counts.shape == (len(moe_layers), t.num_local_experts)
  np.testing.assert_array_equal(out.expert_counts.sum(-1), 2 * 24 * t.num_experts_per_tok)
  # counts agree with the top-k of the returned router logits
  top = np.argsort(-np.asarray(out.router_logits), axis=-1)[..., :t.num_experts_per_tok]
  want = np.stack([np.bincount(top[l].ravel(), minlength=t.num_local_experts)
                   for l in range(len(moe_layers))])
  np.testing.assert_array_equal(out.expert_counts, want)


def test_kv_cache_decode_equals_full_forward(params):
  ids = _ids(5, (2, 20))
  mask = np.ones((2, 20), np.int32)
  mask[1, :3] = 0  # left-padded prompt
  full = apply_jit(CFG, params, ids, jnp.asarray(mask)).logits
  cache = l4.init_cache(CFG, 2, 32)
  logits, cache = extend_jit(CFG, params, cache, ids[:, :12], jnp.asarray(mask[:, :12]))
  steps = [logits]
  for i in range(12, 20):
    logits, cache = extend_jit(CFG, params, cache, ids[:, i:i + 1])
    steps.append(logits)
  got = np.concatenate(steps, axis=1)
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], np.asarray(full)[valid], atol=1e-5, rtol=0)
  assert int(cache["length"]) == 20


def test_bf16_stays_close_to_fp32_where_routing_agrees(params):
  ids = _ids(6)
  out32 = apply_jit(CFG, params, ids)
  p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  out16 = apply_jit(CFG, p16, ids)
  assert out16.logits.dtype == jnp.bfloat16
  k = CFG.text.num_experts_per_tok
  top = lambda o: np.sort(np.argsort(-np.asarray(o.router_logits), -1)[..., :k], -1)
  same = (top(out32) == top(out16)).all(-1).all(0).reshape(2, 24)  # per token, every MoE layer
  # a flip at token s changes later tokens through attention: keep rows' agreeing prefixes
  prefix = np.cumprod(same, axis=1).astype(bool)
  assert prefix.sum() >= 12, "too few tokens route identically to compare"
  diff = np.abs(np.asarray(out16.logits, np.float32) - np.asarray(out32.logits))[prefix]
  scale = np.abs(np.asarray(out32.logits)).max()
  # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); ~10 roundings along 8 layers.
  assert diff.max() <= 0.05 * scale, (diff.max(), scale)


def test_out_of_vocab_ids_are_rejected(params):
  with pytest.raises(ValueError, match=r"\[272\] outside the vocabulary \[0, 272\)"):
    l4.forward(CFG, params, jnp.asarray([[1, 2, 272]]))
  with pytest.raises(ValueError, match=r"\[-1\] outside"):
    l4.forward(CFG, params, jnp.asarray([[-1, 2]]))


def test_param_counts_of_released_models():
  # HF's own count on the meta device (the seeds' 109.7B counts the embedding twice).
  scout, maverick = l4.presets.scout(), l4.presets.maverick()
  assert l4.param_count(scout) == 108_641_793_536  # with the vision tower and projector
  assert l4.param_count(maverick) == 401_583_781_376
  assert l4.param_count(scout.text) == 107_769_861_120  # Llama4ForCausalLM
  assert l4.param_count(maverick.text) == 400_711_848_960


@pytest.mark.parametrize("window,remat", [(None, False), (24, False), (None, True), (24, True)])
def test_blocked_attention_equals_dense(window, remat, monkeypatch):
  from llama4_jax import attention
  monkeypatch.setattr(attention, "REMAT_SCORES", 0 if remat else 1 << 20)  # recomputed / kept
  t = CFG.text
  seg = jnp.asarray([[1] * 40 + [2] * 24, [0] * 5 + [1] * 59])
  ctx = model.token_context(dataclasses.replace(t, attention_chunk_size=window), 2, 64,
                            segment_ids=seg)
  mask = ctx.full_mask_BTS if window is None else ctx.chunk_mask_BTS
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(k1, (2, 64, 4, 8))
  k, v = jax.random.normal(k2, (2, 64, 2, 8)), jax.random.normal(k3, (2, 64, 2, 8))
  valid = np.asarray(seg != 0)
  want = np.asarray(attention.attend(q, k, v, mask))[valid]
  got = np.asarray(attention.attend_blocked(q, k, v, mask, window, 16))[valid]
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  live = jnp.asarray(valid)[..., None, None]
  sq = lambda f: lambda q, k, v: jnp.sum(jnp.where(live, f(q, k, v), 0) ** 2)
  g_want = jax.grad(sq(lambda q, k, v: attention.attend(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
  g_got = jax.grad(sq(lambda q, k, v: attention.attend_blocked(q, k, v, mask, window, 16)),
                   argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
