"""Meta's own PyTorch Llama 4 (`llama_models.llama4.model.Transformer`, built in
tests/meta_reference.py) as a second numerical reference beside HF transformers: fp32 logits of
Meta's model, HF's and ours agree on a sequence crossing 3+ attention chunks, with dense and MoE
layers, RoPE and NoPE layers, QK norm or not, llama3 scaling or not, and temperature tuning."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference as ref
import llama4_jax as l4
import meta_reference as meta
from llama4_jax import convert

T = 30  # 3.75 chunks of 8; floor_scale 4 makes temperature tuning act from position 3
ATOL = 1e-4
# Meta derives head_dim = dim / heads and one hidden size for dense and expert FFNs
_BASE = dataclasses.replace(l4.presets.tiny().text, head_dim=16, intermediate_size=96,
                            intermediate_size_mlp=96,
                            rope_scaling=l4.Llama3Scaling(8.0, 1.0, 4.0, 8192))
VARIANTS = {
    "tiny": _BASE,  # dense L0 L2, MoE L1 L3, NoPE L3, QK norm, all three llama3 bands
    "scout": dataclasses.replace(_BASE, interleave_moe_layer_step=1, rope_theta=500000.0,
                                 rope_scaling=l4.Llama3Scaling(16.0, 1.0, 1.0, 8192)),
    "maverick": dataclasses.replace(_BASE, use_qk_norm=False, rope_scaling=None,
                                    num_hidden_layers=8),
}


@pytest.fixture(scope="module")
def models():
  cache = {}

  def get(name):
    if name not in cache:
      hf = ref.causal_lm(VARIANTS[name], seed=3)
      cache[name] = hf, meta.transformer(VARIANTS[name], hf)
    return cache[name]
  return get


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_metas_and_hfs(models, variant):
  hf, meta_model = models(variant)
  ids = np.random.RandomState(0).randint(0, 272, (2, T))
  want_meta, (want_hf, _) = meta.logits(meta_model, ids), ref.run(hf, ids)
  cfg = l4.Config(text=VARIANTS[variant])
  params = convert.from_hf_tensors(cfg, lambda n: hf.state_dict()[n].numpy())
  ours = np.asarray(l4.apply(cfg, params, jnp.asarray(ids)).logits)
  assert np.abs(want_meta).max() > 1.0  # O(1) logits: the tolerance is meaningful
  np.testing.assert_allclose(ours, want_meta, atol=ATOL, rtol=0)
  np.testing.assert_allclose(want_hf, want_meta, atol=ATOL, rtol=0)


def test_metas_one_token_decode_ignores_the_chunk_mask(models):
  """Documented in docs/reference_models.md: Meta's forward builds masks only for more than one
  token, so its step-by-step decode attends across chunk boundaries in chunked layers. Within
  the first chunk it equals the full forward; past it, it does not. Our decode follows the full
  forward (tests/test_model.py), as HF's does."""
  _, meta_model = models("tiny")
  ids = np.random.RandomState(1).randint(0, 272, (1, 20))
  full = meta.logits(meta_model, ids)
  meta.logits(meta_model, ids[:, :4])  # prefill 4 tokens, then one at a time
  steps = np.concatenate([meta.logits(meta_model, ids[:, p:p + 1], start=p)
                          for p in range(4, 20)], axis=1)
  np.testing.assert_allclose(steps[:, :4], full[:, 4:8], atol=ATOL, rtol=0)
  assert np.abs(steps[:, 4:] - full[:, 8:]).max() > 100 * ATOL
