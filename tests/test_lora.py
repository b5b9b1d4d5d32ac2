"""LoRA / QLoRA: int4 error bound and memory, adapters that start at the base and merge exactly,
a base that stays bit-identical through training, and the merged export loading in HF's layout."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import llama4_jax as l4
import sharding
from train import (checkpoint, config as config_lib, convert, lora, loop, params as params_lib,
                   tokenizer as tokenizer_lib)
from train.config import LoraConfig
from train_util import TINY

CFG = l4.presets.tiny()
LCFG = LoraConfig(rank=4, alpha=8.0, group_size=8)


def test_int4_error_is_at_most_half_a_step_and_memory_is_a_quarter_of_bf16():
  key = jax.random.key(0)
  spread = jnp.exp(jax.random.normal(jax.random.key(1), (3, 16, 1)) * 2)  # groups of very different scale
  w = jax.random.normal(key, (3, 16, 128)) * spread
  q = l4.quant.quantize_array(w, 32)
  back = l4.quant.dequantize(q)
  step = np.repeat(np.asarray(q.scale, np.float32), 32, axis=-1)
  err = np.abs(np.asarray(back) - np.asarray(w))
  assert np.all(err <= step / 2 * (1 + 1e-6)), float(np.max(err / step))
  assert float(np.mean(err / step)) > 0.2  # a real rounding, not a lossless copy
  levels = np.asarray(back).reshape(3, 16, 4, 32) / np.asarray(q.scale, np.float32)[..., None]
  np.testing.assert_array_equal(levels, np.round(levels))  # integer multiples of the scale
  assert levels.min() >= -8 and levels.max() <= 7 and len(np.unique(levels)) == 15
  bf16 = w.size * 2
  assert q.packed.dtype == jnp.uint8 and l4.quant.nbytes(q) == w.size // 2 + w.size // 32 * 2
  assert l4.quant.nbytes(l4.quant.quantize_array(w, 64)) / bf16 == pytest.approx(0.25 + 1 / 64)
  with pytest.raises(ValueError, match="blocks.*cannot be split"):
    l4.quant.quantize_array(jnp.ones((4, 24)), 16, "blocks[0]['q']")


@pytest.fixture(scope="module")
def trained_pieces():
  """A base, adapters with non-zero B, and the jitted forwards of both forms."""
  base = jax.jit(l4.init_params, static_argnums=0)(CFG, jax.random.key(0))
  adapters = jax.jit(lambda k: jax.tree.map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape),
      lora.init_adapters(CFG, LCFG, k)))(jax.random.key(1))
  ids = jax.random.randint(jax.random.key(3), (2, 20), 0, CFG.text.vocab_size)
  hooked = jax.jit(lambda p: l4.apply(CFG, p, ids, hooks=l4.Hooks(weights=lora.materialize)).logits)
  plain = jax.jit(lambda p: l4.forward(CFG, p, ids))
  return base, adapters, hooked, plain


@pytest.mark.parametrize("quantize", [False, True])
def test_merged_forward_equals_base_plus_adapter_forward(trained_pieces, quantize):
  base, adapters, hooked, plain = trained_pieces
  cfg = dataclasses.replace(LCFG, quantize=quantize)
  frozen = jax.jit(lambda b: lora.freeze(b, cfg))(base)
  if quantize:  # every block matrix int4, the rest as it was
    kinds = {type(x) for x in jax.tree.leaves(frozen["blocks"], is_leaf=lambda x: isinstance(
        x, l4.quant.QTensor))}
    assert l4.quant.QTensor in kinds and l4.quant.nbytes(frozen) < 0.45 * l4.quant.nbytes(base)
  got = hooked(lora.combine(adapters, frozen, cfg))
  want = plain(jax.jit(lambda a, f: lora.merge(a, f, cfg))(adapters, frozen))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
  assert float(jnp.max(jnp.abs(want - plain(base)))) > 1e-2  # the adapters do change the model


def test_fresh_adapters_are_the_base_exactly(trained_pieces):
  base, _, hooked, plain = trained_pieces
  fresh = jax.jit(lambda k: lora.init_adapters(CFG, LCFG, k))(jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(hooked(lora.combine(fresh, base, LCFG))),
                                np.asarray(plain(base)))
  specs = lora.adapter_specs(CFG, LCFG)
  moe_slot = specs["blocks"][1]["moe"]  # one pair per routed expert, the shared expert's too
  assert moe_slot["gate"]["a"].shape == (1, 4, 64, 4) and moe_slot["down"]["b"].shape == (1, 4, 4, 64)
  assert specs["blocks"][0]["o"]["a"].shape == (1, 4 * 24, 4) and "shared_up" in moe_slot
  with pytest.raises(ValueError, match="lora.targets"):
    LoraConfig(targets=("q", "embed"))


def _recipe(tmp_path, **lora_cfg):
  d = yaml.safe_load(yaml.safe_dump(TINY))
  d.update(workdir=str(tmp_path / "run"), steps=4, lora={"rank": 4, "alpha": 8.0, **lora_cfg})
  d["checkpoint"] = {"every": 4, "keep": 1, "async_save": False}
  return config_lib.from_dict(config_lib.RunConfig, d)


@pytest.mark.slow
def test_qlora_trains_adapters_only_resumes_and_exports_merged(tmp_path):
  cfg = _recipe(tmp_path, quantize=True, group_size=8)
  model_cfg = cfg.model.build()
  t = loop.build(cfg, model_cfg)
  batches, _ = t.stage.data(t, tmp_path, tokenizer_lib.for_model(config_lib.DataConfig(), model_cfg))
  state = loop.initial_state(cfg, t)
  frozen0, adapters0 = jax.device_get((state.frozen, state.params))
  losses = []
  for _ in range(4):
    state, m = t.train_step(state, batches.next(state, int(state.step))[0])
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), frozen0)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), jax.device_get(state.params),
                       adapters0)
  assert min(jax.tree.leaves(moved)) > 0  # every adapter trained (B from zero)
  # checkpointed as the loop does (adapters + optimizer, no base); resumed with the base rebuilt
  ckpt = checkpoint.Checkpointer(tmp_path / "run/checkpoints", cfg.checkpoint,
                                 config_lib.to_dict(cfg))
  ckpt.save(4, state.replace(frozen=None), batches, force=True)
  start, resumed = loop.resume_or_start(cfg, t, ckpt, batches)
  ckpt.close()
  assert start == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(state))
  # a next stage starts from base + adapters merged; the export goes through merge-lora
  step_dir = tmp_path / "run" / "checkpoints" / "4"
  merged = params_lib.restore_params(step_dir, model_cfg, sharding.one_device(), jnp.float32)
  merge = jax.jit(lambda a, f: lora.merge(a, f, cfg.lora))
  jax.tree.map(np.testing.assert_array_equal, merged, jax.device_get(merge(state.params, state.frozen)))
  with pytest.raises(Exception, match="merge-lora"):
    convert.orbax_to_hf(step_dir, tmp_path / "hf_direct", progress=False)
  assert convert.main(["merge-lora", str(step_dir), str(tmp_path / "merged")]) == 0
  assert convert.main(["orbax-to-hf", str(tmp_path / "merged"), str(tmp_path / "hf")]) == 0
  _, loaded = l4.load_hf(tmp_path / "hf")
  jax.tree.map(np.testing.assert_array_equal, loaded, merged)
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama4_text"
