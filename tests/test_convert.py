"""Streaming HF <-> orbax conversion: bit-exact round trips (both layouts, both dtypes), the
converted checkpoint restored onto an expert-sharded mesh equal to
HF's logits, and bad input."""
import copy
import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import hf_reference as ref
import llama4_jax as l4
import sharding
from test_hf_io import _assert_same_files, _tensors
from train import chat, config as config_lib, convert, loop, params as params_lib, tokenizer as tokenizer_lib
from train_util import TINY


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_round_trip_is_bit_exact(hf_causal, tmp_path, dtype):
  model, _ = hf_causal("scout")
  src = tmp_path / "src"
  copy.deepcopy(model).to(dtype).save_pretrained(src, max_shard_size="100KB")
  ckpt = convert.hf_to_orbax(src, tmp_path / "ckpt", progress=False)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
  out = convert.orbax_to_hf(ckpt, tmp_path / "out", max_shard_bytes=100_000, progress=False)
  assert (out / "model.safetensors.index.json").is_file()
  _assert_same_files(src, out)
  assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_dtype_conversion_and_transformers_loads_the_export(hf_causal, tmp_path):
  model, src = hf_causal("maverick")
  convert.main(["hf-to-orbax", str(src), str(tmp_path / "ckpt"), "--dtype", "bf16"])
  convert.main(["orbax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")])
  got, want = _tensors(tmp_path / "out"), _tensors(src)
  assert sorted(got) == sorted(want)
  for name, a in want.items():
    assert got[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got[name], a.astype(ml_dtypes.bfloat16), err_msg=name)
  reloaded = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
  ids = torch.as_tensor(np.random.RandomState(0).randint(0, 256, (1, 12)))
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(ids).logits.numpy(), model(ids).logits.numpy(), atol=0.1)


def test_multimodal_round_trip_is_bit_exact(tmp_path):
  mm = ref.multimodal(ref.VARIANTS["mixed"], seed=4)
  mm.save_pretrained(tmp_path / "src")
  chat.save_tokenizer(tokenizer_lib.byte_tokenizer(), tmp_path / "src")  # travels with the model
  convert.hf_to_orbax(tmp_path / "src", tmp_path / "ckpt", progress=False)
  assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
  # the vision tower is part of the params checkpoint, restorable by orbax as l4's tree
  cfg, want = l4.load_hf(tmp_path / "src")
  restored = ocp.StandardCheckpointer().restore((tmp_path / "ckpt" / "params").absolute())
  assert sorted(restored) == sorted(want) and "vision" in restored
  # both metadata files read back through orbax's public API
  tree = ocp.StandardCheckpointer().metadata((tmp_path / "ckpt" / "params").absolute()).item_metadata
  assert tree["projector"].shape == want["projector"].shape
  step = ocp.metadata.get_step_metadata((tmp_path / "ckpt" / "params").absolute())
  assert step.item_handlers.endswith("StandardCheckpointHandler") and step.commit_timestamp_nsecs
  jax.tree.map(np.testing.assert_array_equal, restored["vision"], want["vision"])
  np.testing.assert_array_equal(restored["projector"], want["projector"])
  convert.orbax_to_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_bytes=50_000, progress=False)
  _assert_same_files(tmp_path / "src", tmp_path / "out")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "src" / name).read_bytes()


def test_restored_onto_an_expert_sharded_mesh_equals_hf(tmp_path):
  text = dataclasses.replace(config_lib.from_dict(config_lib.RunConfig, TINY).model.build().text,
                             num_local_experts=8)
  hf = ref.causal_lm(text, seed=5)
  hf.save_pretrained(tmp_path / "hf")
  convert.hf_to_orbax(tmp_path / "hf", tmp_path / "ckpt", progress=False)
  model = {**TINY["model"], "text": {"num_local_experts": 8},
           "init_from_checkpoint": str(tmp_path / "ckpt")}
  cfg = config_lib.from_dict(config_lib.RunConfig, {**TINY, "model": model,
                                                    "mesh": {"fsdp": 2, "expert": 4}})
  t = loop.build(cfg, cfg.model.build())
  params = params_lib.initial_params(cfg, t.model_cfg, t.state_shardings.params)
  gate = next(b["moe"]["gate"] for b in params["blocks"] if "moe" in b)
  assert gate.sharding.spec[1] == "expert" and len(gate.sharding.device_set) == 8
  ids = np.random.RandomState(1).randint(0, 256, (8, 16))
  logits = jax.jit(lambda p, i: l4.apply(t.model_cfg, p, i, hooks=sharding.hooks(t.mesh)).logits,
                   in_shardings=(t.state_shardings.params, t.batch_sharding))(params, ids)
  with torch.no_grad():
    want = hf(torch.as_tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=0)


def test_bad_input_is_named_and_leaves_no_output(hf_causal, tmp_path, monkeypatch):
  _, good = hf_causal("scout")
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text((good / "config.json").read_text())
  (broken / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:-100])
  with pytest.raises(l4.CheckpointError, match=r"model\.safetensors: cannot read"):
    convert.hf_to_orbax(broken, tmp_path / "out")
  (broken / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
  assert convert.main(["hf-to-orbax", str(broken), str(tmp_path / "out")]) == 2
  tensors = load_file(good / "model.safetensors")
  tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float64)
  from safetensors.numpy import save_file
  (broken / "model.safetensors.index.json").unlink()
  save_file(tensors, broken / "model.safetensors")
  with pytest.raises(l4.CheckpointError, match=r"model\.norm\.weight has dtype F64"):
    convert.hf_to_orbax(broken, tmp_path / "out")
  with pytest.raises(l4.CheckpointError, match="neither a converted checkpoint"):
    convert.orbax_to_hf(good, tmp_path / "out")
  # a conversion that dies half way leaves nothing under the output name, nor a temporary
  calls = []

  def dying_write(self, *a, **k):
    calls.append(1)
    if len(calls) > 5:
      raise KeyboardInterrupt
    return real_write(self, *a, **k)
  real_write = convert.ts.TensorStore.write
  monkeypatch.setattr(convert.ts.TensorStore, "write", dying_write)
  with pytest.raises(KeyboardInterrupt):
    convert.hf_to_orbax(good, tmp_path / "out", progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
