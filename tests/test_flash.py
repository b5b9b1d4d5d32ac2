"""Flash attention kernels (Pallas interpret mode on CPU) against the XLA path: forward and
gradients in fp32 on every kind of Llama 4 attention row, and the full model against HF."""
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference as ref
import llama4_jax as l4
from llama4_jax import attention, flash, model

KERNELS = {"splash": partial(flash.splash, interpret=True),
           "gpu_flash": partial(flash.gpu_flash, interpret=True)}
B, T, CHUNK, H = 2, 80, 16, 16  # 5 attention chunks per row


def _context(layout: str):
  """A tiny config's context for left-padded rows (HF mask) or packed rows whose second and
  third documents start mid-chunk (chunks restart at each document)."""
  cfg = dataclasses.replace(l4.presets.tiny().text, attention_chunk_size=CHUNK)
  if layout == "left_padded":
    mask = np.ones((B, T), np.int32)
    mask[1, :21] = 0
    return model.token_context(cfg, B, T, attention_mask=jnp.asarray(mask)), mask.astype(bool)
  seg = np.zeros((B, T), np.int32)
  seg[0, :37], seg[0, 37:70] = 1, 2  # padding at the end
  seg[1, :9], seg[1, 9:] = 1, 2
  return model.token_context(cfg, B, T, segment_ids=jnp.asarray(seg)), seg != 0


CASES = [(kernel, layout, chunked, group) for kernel in KERNELS
         for layout, group in (("left_padded", 2), ("packed", 4)) for chunked in (False, True)]


@pytest.mark.parametrize("kernel,layout,chunked,group", CASES)
def test_kernel_equals_the_xla_path_forward_and_gradients(kernel, layout, chunked, group):
  ctx, valid = _context(layout)
  kv_heads = 2
  r = np.random.RandomState(hash((layout, group)) % 2**31)
  q, k, v = (jnp.asarray(r.randn(B, T, n, H), jnp.float32)
             for n in (kv_heads * group, kv_heads, kv_heads))
  w = jnp.asarray(r.randn(B, T, kv_heads * group, H) * valid[:, :, None, None], jnp.float32)
  mask = ctx.chunk_mask_BTS if chunked else ctx.full_mask_BTS
  window = CHUNK if chunked else None
  ids = ctx.ids_BT[int(chunked)]
  xla = lambda q, k, v: jnp.sum(attention.attend(q, k, v, mask) * w)
  fast = lambda q, k, v: jnp.sum(KERNELS[kernel](q, k, v, ids, window) * w)
  want = attention.attend(q, k, v, mask)
  got = KERNELS[kernel](q, k, v, ids, window)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5, rtol=0)
  for g_want, g_got, name in zip(jax.grad(xla, (0, 1, 2))(q, k, v),
                                 jax.grad(fast, (0, 1, 2))(q, k, v), "qkv"):
    np.testing.assert_allclose(g_got, g_want, atol=1e-5, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_full_model_with_a_kernel_equals_hf(hf_causal, kernel):
  """NoPE + chunked RoPE layers, MoE + dense, 16 chunks of 8 with a left-padded row."""
  model_, path = hf_causal("mixed")
  cfg, params = l4.load_hf(path)
  ids = np.random.RandomState(6).randint(0, 256, (2, 128))
  mask = np.ones_like(ids)
  mask[1, :13] = 0
  hf_logits, _ = ref.run(model_, ids, mask)
  hooks = l4.Hooks(flash_fn=KERNELS[kernel])
  logits = jax.jit(lambda p, i, m: l4.apply(cfg, p, i, m, hooks=hooks).logits)(
      params, jnp.asarray(ids), jnp.asarray(mask))
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], hf_logits[valid], atol=1e-4, rtol=0)
