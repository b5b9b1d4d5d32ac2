"""Vision tower and early fusion against HF's `Llama4ForConditionalGeneration` (fp32, tiny seeded
towers with weights re-drawn), on processor output: multi-tile images, two images in one prompt."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_reference as ref
import llama4_jax as l4
from conftest import apply_jit
from data.make_processor_golden import image
from llama4_jax import processor, vision

ATOL = 1e-4
# image tokens inside the tiny 256-id vocabulary; 250 is the model's image_token_index (<|patch|>)
IDS = processor.ImageTokens(start=248, end=249, patch=250, image=251, x_sep=252, y_sep=253)
TEXT = {"v56": ref.VARIANTS["mixed"], "v28": ref.VARIANTS["scout"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """variant -> (HF model, our cfg, our params), built once."""
  out = {}
  for i, (name, v) in enumerate(sorted(ref.VISION_VARIANTS.items())):
    hf = ref.multimodal(TEXT[name], seed=11 + i, vision=v)
    path = tmp_path_factory.mktemp(f"mm_{name}")
    hf.save_pretrained(path)
    out[name] = (hf, *l4.load_hf(path))
  return out


def _prompt_batch(cfg: l4.Config, seed: int):
  """Two rows, three images (2x3 tiles + global; 1 tile; 3x1 tiles + global), row 1 holding two."""
  v, rng = cfg.vision, np.random.RandomState(seed)
  text = lambda n: list(rng.randint(3, 240, n))  # noqa: E731
  rows = [text(5) + [IDS.image] + text(7), [IDS.image] + text(3) + [IDS.image] + text(4)]
  images = [[image(40 * v.image_size // 28, 90 * v.image_size // 28, seed)],
            [image(v.image_size, v.image_size, seed + 1), image(130, 40, seed + 2)]]
  ids, pixels = [], []
  for row, imgs in zip(rows, images):
    r, p = processor.prepare(row, imgs, v.image_size, v.tokens_per_tile, max_tiles=6, ids=IDS)
    ids.append(r)
    pixels.append(p)
  width = max(map(len, ids))
  ids = np.asarray([r + text(width - len(r)) for r in ids])
  return ids, np.concatenate(pixels).astype(np.float32), [len(p) for p in pixels]


@pytest.mark.parametrize("name", sorted(ref.VISION_VARIANTS))
def test_features_and_multimodal_logits_match_hf(models, name):
  hf, cfg, params = models[name]
  ids, pixels, per_row = _prompt_batch(cfg, seed=3)
  assert per_row[0] > 1 and per_row[1] > 2  # multi-tile images (with their global tile)
  assert (ids == cfg.image_token_index).sum() == len(pixels) * cfg.vision.tokens_per_tile
  with torch.no_grad():
    pv = torch.as_tensor(pixels)
    want_feats = hf.vision_model(pv).last_hidden_state
    want_rows = hf.multi_modal_projector(want_feats.reshape(-1, want_feats.shape[-1]))
    want_logits = hf(input_ids=torch.as_tensor(ids), pixel_values=pv).logits
  feats, rows = jax.jit(vision.image_features, static_argnums=0)(cfg, params, jnp.asarray(pixels))
  np.testing.assert_allclose(feats, want_feats.numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(rows, want_rows.numpy(), atol=ATOL, rtol=0)
  logits = apply_jit(cfg, params, jnp.asarray(ids), None, jnp.asarray(pixels)).logits
  np.testing.assert_allclose(logits, want_logits.numpy(), atol=ATOL, rtol=0)
  assert np.abs(want_feats.numpy()).max() > 0.5 and np.abs(want_logits.numpy()).max() > 1.0
  # the images matter: the same prompt with other pixels gives other logits
  other = apply_jit(cfg, params, jnp.asarray(ids), None, jnp.asarray(pixels[::-1])).logits
  assert np.abs(np.asarray(other) - np.asarray(logits)).max() > 1e-2


def test_per_row_merge_equals_hf_merge_and_ignores_padding_tiles(models):
  _, cfg, params = models["v56"]
  ids, pixels, (n0, n1) = _prompt_batch(cfg, seed=5)
  emb = l4.model.embed_tokens(cfg.text, params, jnp.asarray(ids))
  _, rows = vision.image_features(cfg, params, jnp.asarray(pixels))
  want = vision.merge(emb, jnp.asarray(ids), rows, cfg.image_token_index)
  # each row takes its own tiles' rows, padded to one tile count with zero rows
  per_tile = cfg.vision.tokens_per_tile
  r0, r1 = rows[:n0 * per_tile], rows[n0 * per_tile:]
  most = (max(n0, n1) + 1) * per_tile
  pad = lambda r: jnp.concatenate([r, jnp.zeros((most - len(r), r.shape[1]))])  # noqa: E731
  got = vision.merge_rows(emb, jnp.asarray(ids), jnp.stack([pad(r0), pad(r1)]), cfg.image_token_index)
  np.testing.assert_array_equal(got, want)


def test_bad_image_inputs_raise_or_poison(models):
  _, cfg, params = models["v56"]
  ids, pixels, _ = _prompt_batch(cfg, seed=7)
  with pytest.raises(ValueError, match=r"pixel_values has shape \(12, 3, 28, 28\); expected tiles \[N, 3, 56, 56\]"):
    l4.forward(cfg, params, jnp.asarray(ids), pixel_values=jnp.asarray(pixels[:, :, :28, :28]))
  with pytest.raises(ValueError, match=r"input_ids hold 48 image-token positions \(id 250\) but the images give 44 feature rows"):
    l4.forward(cfg, params, jnp.asarray(ids), pixel_values=jnp.asarray(pixels[:-1]))
  # under jit the count cannot raise: every logit turns NaN instead of shifting images silently
  def fwd(px):
    return np.asarray(apply_jit(cfg, params, jnp.asarray(ids), None, jnp.asarray(px)).logits)
  assert np.isnan(fwd(pixels[:-1])).all() and np.isfinite(fwd(pixels)).all()
  text_only = dataclasses.replace(cfg, vision=None)
  with pytest.raises(ValueError, match="the model has no vision tower"):
    l4.forward(text_only, params, jnp.asarray(ids), pixel_values=jnp.asarray(pixels))


def test_vision_remat_and_gradients_reach_every_vision_param(models):
  _, cfg, params = models["v28"]
  pixels = jnp.asarray(np.random.RandomState(0).randn(3, 3, 28, 28), jnp.float32)

  def loss(p, remat):
    return jnp.sum(jnp.square(vision.image_features(cfg, p, pixels, remat=remat)[1]))
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g, g_remat = grad(params, False), grad(params, True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g, g_remat)
  zero = [jax.tree_util.keystr(p) for p, a in jax.tree_util.tree_flatten_with_path(
      {"vision": g["vision"], "projector": g["projector"]})[0] if not np.any(np.asarray(a))]
  assert not zero, f"vision params without gradient: {zero}"


@pytest.mark.parametrize("freeze", [("vision",), ("projector", "text")])
def test_training_switches_freeze_vision_and_projector(freeze):
  from train import config as run_config, optim, step as step_lib
  from train.stages import lm as pretrain
  """Each part frozen in one case and trained in the other: frozen params keep every bit."""
  model = run_config.ModelConfig(preset="tiny_multimodal", multimodal=True,
                                 freeze_vision="vision" in freeze,
                                 freeze_projector="projector" in freeze,
                                 freeze_text="text" in freeze)
  cfg = model.build()
  tx, lr = optim.make(run_config.OptimConfig(lr=1e-2, warmup_steps=0), cfg, 10, model.frozen())
  loss_fn = pretrain.make_loss(cfg, jnp.float32, False, 0.0, 0.0, frozen=model.frozen())
  params = l4.init_params(cfg, jax.random.key(0))
  rng = np.random.RandomState(0)
  ids = processor.ImageTokens(262, 263, 264, 265, 266, 267)  # the preset's (byte tokenizer's)
  rows = [processor.prepare([5, ids.image, 6] + list(rng.randint(3, 240, 20)), [image(56, 112, s)],
                            56, 4, max_tiles=2, ids=ids) for s in range(2)]
  tokens = jnp.asarray([r[0][:32] for r in rows], jnp.int32)
  batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
           "positions": jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), tokens.shape),
           "pixel_values": jnp.asarray(np.stack([r[1] for r in rows]), jnp.float32)}
  step_fn = jax.jit(step_lib.make_train_step(loss_fn, tx, lr))
  new, metrics = step_fn(step_fn(step_lib.init_state(params, tx), batch)[0], batch)  # lr(0) = 0
  assert np.isfinite(float(metrics["loss"]))
  for key in ("vision", "projector", "embed", "lm_head"):
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.params[key]),
                                                     jax.tree.leaves(params[key])))
    assert same == (key in model.frozen()), key


def test_prefill_with_images_then_decode_equals_full_forward(models):
  _, cfg, params = models["v28"]
  ids, pixels, _ = _prompt_batch(cfg, seed=9)
  n = ids.shape[1] - 3  # the last 3 tokens (text) are decoded one at a time
  cache = l4.init_cache(cfg, batch=2, max_len=ids.shape[1])
  logits, cache = l4.extend(cfg, params, cache, jnp.asarray(ids[:, :n]),
                            pixel_values=jnp.asarray(pixels))
  steps = [logits]
  for i in range(n, ids.shape[1]):
    step, cache = l4.extend(cfg, params, cache, jnp.asarray(ids[:, i:i + 1]))
    steps.append(step)
  full = l4.forward(cfg, params, jnp.asarray(ids), pixel_values=jnp.asarray(pixels))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def test_our_multimodal_init_saved_loads_in_transformers(tmp_path):
  import transformers
  cfg = l4.presets.tiny_multimodal()
  params = l4.init_params(cfg, jax.random.key(0))
  l4.save_hf(tmp_path / "out", cfg, params)
  hf = transformers.Llama4ForConditionalGeneration.from_pretrained(
      tmp_path / "out", attn_implementation="eager").eval()
  ids = np.asarray([[5, 262, 267, 267, 267, 267, 263, 9, 10]])
  pixels = np.random.RandomState(0).uniform(-1, 1, (1, 3, 56, 56)).astype(np.float32)
  with torch.no_grad():
    want = hf(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pixels)).logits.numpy()
  got = l4.forward(cfg, params, jnp.asarray(ids), pixel_values=jnp.asarray(pixels))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
