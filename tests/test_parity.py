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


@pytest.mark.parametrize("variant", ["mixed"])
def test_masks_with_holes_match_hf(hf_causal, variant):
  """Zeros mid-row (not left/right padding): keys hidden, chunks still counted from the first
  real token, as HF's `left_padding_tokens`; every position equals HF, the holes included."""
  model, path = hf_causal(variant)
  cfg, params = l4.load_hf(path)
  ids = _ids(seed=3, batch=2)
  mask = np.ones_like(ids)
  mask[0, 5:9] = 0            # a hole inside the first chunk's successor
  mask[1, :3] = 0             # left padding and two holes later
  mask[1, 12] = mask[1, 20:22] = 0
  hf_logits, _ = ref.run(model, ids, mask)
  logits = np.asarray(apply_jit(cfg, params, jnp.asarray(ids), jnp.asarray(mask)).logits)
  np.testing.assert_allclose(logits[0], hf_logits[0], atol=ATOL, rtol=0)
  np.testing.assert_allclose(logits[1, 3:], hf_logits[1, 3:], atol=ATOL, rtol=0)


def test_pad_token_embedding_gets_no_gradient_like_hf(hf_causal):
  """HF's nn.Embedding(padding_idx=pad_token_id): the same embedding gradient, zero on the pad
  row, when the batch contains pad tokens."""
  import jax
  import torch
  model, path = hf_causal("maverick")
  cfg, params = l4.load_hf(path)
  pad = cfg.text.pad_token_id
  ids = _ids(seed=4, batch=2, length=12)
  ids[:, -3:] = pad
  w = np.random.RandomState(5).randn(2, 12, cfg.text.vocab_size).astype(np.float32)
  model.zero_grad()
  (model(input_ids=torch.as_tensor(ids)).logits * torch.as_tensor(w)).sum().backward()
  hf_grad = model.model.embed_tokens.weight.grad.numpy()
  grad = jax.grad(lambda p: jnp.sum(apply_jit(cfg, p, jnp.asarray(ids)).logits * w))(params)
  assert np.abs(hf_grad[pad]).max() == 0 and np.abs(np.asarray(grad["embed"][pad])).max() == 0
  np.testing.assert_allclose(grad["embed"], hf_grad, atol=1e-4, rtol=0)
  assert np.abs(hf_grad).max() > 1e-2
