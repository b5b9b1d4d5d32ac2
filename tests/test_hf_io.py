"""HF directories: bit-exact round trips in both layouts and dtypes, sharding, and bad input."""
import copy
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import hf_reference as ref
import llama4_jax as l4


def _tensors(path) -> dict:
  out = {}
  for f in sorted(path.glob("*.safetensors")):
    out.update(load_file(f))
  return out


def _assert_same_files(a, b):
  ta, tb = _tensors(a), _tensors(b)
  assert sorted(ta) == sorted(tb)
  for name in ta:
    assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
    assert ta[name].tobytes() == tb[name].tobytes(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_round_trip_is_bit_exact_and_loads_in_transformers(hf_causal, tmp_path, dtype):
  model, _ = hf_causal("scout")
  src = tmp_path / "src"
  copy.deepcopy(model).to(dtype).save_pretrained(src, max_shard_size="100KB")  # shards + index
  assert (src / "model.safetensors.index.json").is_file()
  cfg, params = l4.load_hf(src)
  l4.save_hf(tmp_path / "out", cfg, params)
  _assert_same_files(src, tmp_path / "out")
  reloaded = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype)
  ids = torch.as_tensor(np.random.RandomState(0).randint(0, 256, (2, 20)))
  with torch.no_grad():
    want = transformers.Llama4ForCausalLM.from_pretrained(src, dtype=dtype)(ids).logits
    assert torch.equal(reloaded(ids).logits, want)


def test_multimodal_round_trip_is_bit_exact(tmp_path):
  mm = ref.multimodal(ref.VARIANTS["maverick"], seed=3)
  mm.save_pretrained(tmp_path / "src")
  cfg, params = l4.load_hf(tmp_path / "src")
  l4.save_hf(tmp_path / "out", cfg, params, max_shard_bytes=50_000)
  assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
  _assert_same_files(tmp_path / "src", tmp_path / "out")
  out_cfg = ref.config_json(tmp_path / "out")
  assert out_cfg["model_type"] == "llama4" and out_cfg["vision_config"]["image_size"] == 56
  reloaded = transformers.Llama4ForConditionalGeneration.from_pretrained(
      tmp_path / "out", attn_implementation="eager")
  ids = torch.as_tensor(np.random.RandomState(0).randint(0, 248, (1, 12)))
  with torch.no_grad():
    assert torch.equal(reloaded(input_ids=ids).logits, mm(input_ids=ids).logits)


def test_save_of_our_own_init_loads_in_transformers(tmp_path):
  cfg = l4.presets.tiny()
  import jax
  params = l4.init_params(cfg, jax.random.key(0))
  l4.save_hf(tmp_path / "out", cfg, params)
  model = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "out")
  ids = np.random.RandomState(0).randint(0, 256, (1, 20))
  with torch.no_grad():
    want = model(torch.as_tensor(ids)).logits.numpy()
  got = np.asarray(l4.forward(cfg, params, jnp.asarray(ids)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error naming the problem.

@pytest.fixture
def good_dir(hf_causal, tmp_path):
  _, path = hf_causal("maverick")
  dst = tmp_path / "ckpt"
  shutil.copytree(path, dst)
  return dst


def _rewrite(path, fn):
  from safetensors.numpy import save_file
  tensors = load_file(path / "model.safetensors")
  fn(tensors)
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(good_dir):
  _rewrite(good_dir, lambda t: t.pop("model.layers.1.feed_forward.router.weight"))
  with pytest.raises(l4.CheckpointError, match=r"missing.*model\.layers\.1\.feed_forward\.router"):
    l4.load_hf(good_dir)


def test_unexpected_tensor_is_named(good_dir):
  _rewrite(good_dir, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(4, np.float32)}))
  with pytest.raises(l4.CheckpointError, match=r"unexpected.*q_norm"):
    l4.load_hf(good_dir)


def test_wrong_shape_is_named(good_dir):
  def shrink(t):
    t["model.layers.2.self_attn.k_proj.weight"] = t["model.layers.2.self_attn.k_proj.weight"][:24]
  _rewrite(good_dir, shrink)
  with pytest.raises(l4.CheckpointError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight.*\(24, 64\).*\(48, 64\)"):
    l4.load_hf(good_dir)


def test_unsupported_dtype_is_named(good_dir):
  _rewrite(good_dir, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.int32)}))
  with pytest.raises(l4.CheckpointError, match=r"model\.norm\.weight.*I32"):
    l4.load_hf(good_dir)


def test_wrong_model_type(good_dir):
  d = json.loads((good_dir / "config.json").read_text())
  (good_dir / "config.json").write_text(json.dumps({**d, "model_type": "llama"}))
  with pytest.raises(l4.CheckpointError, match=r"model_type is 'llama'"):
    l4.load_hf(good_dir)


def test_truncated_file_and_missing_shard(good_dir):
  f = good_dir / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-100])
  with pytest.raises(l4.CheckpointError, match=r"model\.safetensors: cannot read"):
    l4.load_hf(good_dir)
  index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
  (good_dir / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(l4.CheckpointError, match=r"shard model-00002-of-00002\.safetensors.*does not exist"):
    l4.load_hf(good_dir)


def test_failed_save_leaves_no_directory_and_keeps_the_old_one(tmp_path, monkeypatch):
  cfg = l4.presets.tiny()
  import jax
  params = l4.init_params(cfg, jax.random.key(0))
  from llama4_jax import hf_io

  def fail(*a, **k):
    raise OSError("disk full")
  monkeypatch.setattr(hf_io, "_safetensors_header", fail)  # fails mid-write
  with pytest.raises(OSError, match="disk full"):
    l4.save_hf(tmp_path / "new", cfg, params)
  assert list(tmp_path.iterdir()) == []
  monkeypatch.undo()
  l4.save_hf(tmp_path / "old", cfg, params)
  before = sorted(p.name for p in (tmp_path / "old").iterdir())
  monkeypatch.setattr(hf_io, "_safetensors_header", fail)  # fails mid-write
  with pytest.raises(OSError):
    l4.save_hf(tmp_path / "old", cfg, params, overwrite=True)
  assert sorted(p.name for p in (tmp_path / "old").iterdir()) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
