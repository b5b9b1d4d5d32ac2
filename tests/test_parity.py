"""Numerical parity with HF transformers' Llama 4 (fp32, tiny seeded models, weights re-drawn)."""
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import hf_reference as ref
import llama4_jax as l4
from conftest import apply_jit

T = 28  # 3.5 attention chunks of 8; floor_scale 4 makes temperature tuning act from position 3
ATOL = 1e-4


def _ids(seed=0, batch=2, length=T):
  return np.random.RandomState(seed).randint(0, 256, (batch, length))


@pytest.mark.parametrize("variant", sorted(ref.VARIANTS))
def test_logits_and_hidden_states_match_hf(hf_causal, variant):
  model, path = hf_causal(variant)
  cfg, params = l4.load_hf(path, dtype=jnp.float32)
  ids = _ids()
  hf_logits, hf_hidden = ref.run(model, ids)
  out = apply_jit(cfg, params, jnp.asarray(ids), return_hidden=True)
  # HF's hidden_states: embeddings, layers 0..L-2, then the *normed* output of the last layer.
  for i in range(cfg.text.num_hidden_layers - 1):
    np.testing.assert_allclose(out.hidden[i], hf_hidden[i + 1], atol=ATOL, rtol=0,
                               err_msg=f"layer {i}")
  np.testing.assert_allclose(out.logits, hf_logits, atol=ATOL, rtol=0)
  assert np.abs(hf_logits).max() > 1.0  # O(1) logits: the tolerance is meaningful


@pytest.mark.parametrize("variant", sorted(ref.VARIANTS))
def test_left_padded_batch_matches_hf(hf_causal, variant):
  model, path = hf_causal(variant)
  cfg, params = l4.load_hf(path)
  ids = _ids(seed=1, batch=3)
  mask = np.ones_like(ids)
  mask[1, :5] = 0   # chunks of row 1 start at its first real token
  mask[2, :11] = 0  # more than one chunk of padding
  hf_logits, _ = ref.run(model, ids, mask)
  logits = apply_jit(cfg, params, jnp.asarray(ids), jnp.asarray(mask)).logits
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], hf_logits[valid], atol=ATOL, rtol=0)


def test_multimodal_layout_gives_the_causal_text_logits(tmp_path):
  text = ref.VARIANTS["mixed"]
  mm = ref.multimodal(text, seed=7)
  mm.save_pretrained(tmp_path / "mm")
  cfg, params = l4.load_hf(tmp_path / "mm")
  assert cfg.vision is not None and cfg.image_token_index == 250
  ids = _ids(seed=2)
  hf_logits, _ = ref.run(mm, ids)
  logits = np.asarray(apply_jit(cfg, params, jnp.asarray(ids)).logits)
  np.testing.assert_allclose(logits, hf_logits, atol=ATOL, rtol=0)
  # HF's own causal export of the same language model loads to bit-identical text logits.
  causal = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "mm")
  causal.save_pretrained(tmp_path / "causal")
  cfg_c, params_c = l4.load_hf(tmp_path / "causal")
  np.testing.assert_array_equal(apply_jit(cfg_c, params_c, jnp.asarray(ids)).logits, logits)
