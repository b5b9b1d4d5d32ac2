"""The FP8 release's layout (compressed-tensors "float-quantized", per-expert unfused experts with
per-channel scales). The checkpoint is written with the compressed-tensors package's own
quantizer (`calculate_qparams` + `quantize`), so our reader and writer are checked against it:
it loads dequantized or kept in FP8 (== the dequantized model == transformers), converts both ways
bit-exactly, serves as LoRA's frozen base, generates (one device or a mesh), and bad input is one
line."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
import yaml
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams

import hf_reference as ref
import llama4_jax as l4
import sharding
from llama4_jax import fp8, hf_io
from train import config as config_lib, convert, generate, loop, params as params_lib
from train import tokenizer as tokenizer_lib
from train_util import TINY

ARGS = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
forward = jax.jit(l4.forward, static_argnums=0)


def ct_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """compressed-tensors' static per-channel FP8 of an nn.Linear weight [Out, In]."""
  scale, zero = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), ARGS)
  return ct_quantize(w, scale, zero, ARGS, dtype=torch.float8_e4m3fn), scale


def write_fp8(model, path) -> None:
  """`model` saved in the FP8 release's layout: routed experts per expert, unfused, FP8."""
  tensors = {}
  for name, v in model.state_dict().items():
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
      f = v.shape[-1] // 2
      parts = ({"gate_proj": v[:, :, :f], "up_proj": v[:, :, f:]} if "gate_up" in name
               else {"down_proj": v})
      stem = name.rsplit(".", 1)[0]
      for e in range(v.shape[0]):
        for part, w in parts.items():
          q, scale = ct_fp8(w[e].T.contiguous())
          tensors[f"{stem}.{e}.{part}.weight"], tensors[f"{stem}.{e}.{part}.weight_scale"] = q, scale
    else:
      tensors[name] = v.contiguous()
  path.mkdir()
  safetensors.torch.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
  config = model.config.to_dict()
  config["quantization_config"] = fp8.quantization_config()
  (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
  """(the fp32 HF model, its FP8 directory): the tiny preset, so recipes can start from it."""
  model = ref.causal_lm(l4.presets.tiny().text, seed=3)
  path = tmp_path_factory.mktemp("fp8") / "hf"
  write_fp8(model, path)
  return model, path


def _tensors(path) -> dict[str, np.ndarray]:
  f = path / "model.safetensors"
  return {k: hf_io._read_raw(f, k) for k in hf_io._offsets(f)[1] if k != "__metadata__"}


def test_our_fp8_quantizer_is_bit_exact_with_compressed_tensors():
  w = np.random.default_rng(0).standard_normal((48, 40)).astype(np.float32) * 30
  w[:, 5] = 0  # a zero output channel: compressed-tensors' eps scale
  q = l4.quant.quantize_fp8(w)  # ours: [In, Out], scale [1, Out]
  values, scale = ct_fp8(torch.tensor(w.T))
  np.testing.assert_array_equal(q.values.view(np.uint8).T, values.view(torch.uint8).numpy())
  np.testing.assert_array_equal(q.scale.T, scale.numpy())


def test_loads_dequantized_or_kept_equal_to_transformers(fp8_dir):
  _, path = fp8_dir
  cfg, plain = l4.load_hf(path, dtype=jnp.float32)
  _, kept = l4.load_hf(path, keep_fp8=True)
  moe = kept["blocks"][1]["moe"]
  assert moe["gate"].values.dtype == jnp.float8_e4m3fn and moe["gate"].scale.shape == (1, 4, 1, 40)
  assert moe["shared_gate"].dtype == jnp.float32  # not quantized in the release
  ids = np.random.default_rng(1).integers(0, 256, (2, 24))
  ours, ours_kept = forward(cfg, plain, jnp.asarray(ids)), forward(cfg, kept, jnp.asarray(ids))
  hf = transformers.Llama4ForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager",
      quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
  theirs, _ = ref.run(hf, ids)
  np.testing.assert_allclose(np.asarray(ours_kept), np.asarray(ours), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5, rtol=0)


def test_conversions_are_bit_exact_both_ways(fp8_dir, tmp_path):
  _, path = fp8_dir
  original = _tensors(path)
  assert convert.main(["hf-to-orbax", str(path), str(tmp_path / "kept"), "--keep-fp8"]) == 0
  convert.hf_to_orbax(path, tmp_path / "plain", np.float32, progress=False)
  assert convert.main(["orbax-to-hf", str(tmp_path / "kept"), str(tmp_path / "hf_kept")]) == 0
  convert.orbax_to_hf(tmp_path / "plain", tmp_path / "hf_requant", progress=False, quantize="fp8")
  for out in ("hf_kept", "hf_requant"):  # kept: as stored; requantized: the dequantized values
    tensors = _tensors(tmp_path / out)
    assert sorted(tensors) == sorted(original)
    for name, a in original.items():
      assert tensors[name].dtype == a.dtype and tensors[name].tobytes() == a.tobytes(), (out, name)
    assert fp8.is_fp8(json.loads((tmp_path / out / "config.json").read_text()))
  assert not fp8.is_fp8(json.loads((tmp_path / "plain" / "config.json").read_text()))
  cfg, kept = l4.load_hf(path, keep_fp8=True)
  restored = params_lib.restore_params(tmp_path / "kept", cfg, sharding.one_device(), jnp.float32)
  jax.tree.map(np.testing.assert_array_equal, restored, kept)


def _recipe(tmp_path, init, lora=True):
  d = yaml.safe_load(yaml.safe_dump(TINY))
  d.update(workdir=str(tmp_path / "run"), steps=3)
  d["model"]["init_from_checkpoint"] = str(init)
  if lora:
    d["lora"] = {"rank": 4, "alpha": 8.0}
  return config_lib.from_dict(config_lib.RunConfig, d)


@pytest.mark.slow
def test_lora_on_the_fp8_base_starts_at_the_dequantized_model(fp8_dir, tmp_path):
  _, path = fp8_dir
  convert.hf_to_orbax(path, tmp_path / "kept", keep_fp8=True, progress=False)
  convert.hf_to_orbax(path, tmp_path / "plain", np.float32, progress=False)
  first, frozen = {}, {}
  for name in ("kept", "plain"):
    cfg = _recipe(tmp_path / name, tmp_path / name)
    t = loop.build(cfg, cfg.model.build())
    batches, _ = t.stage.data(t, tmp_path / name, tokenizer_lib.for_model(cfg.data, t.model_cfg))
    state = loop.initial_state(cfg, t)
    frozen0 = jax.device_get(state.frozen)
    losses = []
    for _ in range(3):
      state, m = t.train_step(state, batches.next(state, int(state.step))[0])
      losses.append(float(m["loss"]))
    first[name], frozen[name] = losses, frozen0
    b = state.params["blocks"][1]["moe"]["gate"]["b"]
    assert float(jnp.max(jnp.abs(b))) > 0  # the experts' adapters trained (B starts at zero)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), frozen0)
  gate = frozen["kept"]["blocks"][1]["moe"]["gate"]
  assert isinstance(gate, l4.quant.FP8Tensor) and gate.values.dtype == jnp.float8_e4m3fn
  # same data, same adapters: the FP8 base dequantizes exactly to the plain one
  np.testing.assert_allclose(first["kept"], first["plain"], rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="frozen base: add a lora section"):
    loop.build(_recipe(tmp_path, tmp_path / "kept", lora=False), l4.presets.tiny())


def test_generate_fp8_equals_the_dequantized_model_on_one_device_and_a_mesh(fp8_dir, tmp_path):
  _, path = fp8_dir
  tok = tokenizer_lib.byte_tokenizer()
  cfg, params, _ = generate.load(str(path), keep_fp8=True)
  _, plain = l4.load_hf(path, dtype=jnp.float32)
  ids, _ = generate.encode({"prompt": "12+7="}, tok, cfg, "test")
  run = lambda p: generate.Generator(cfg, p, tok, 6, 0.0, 1.0)([ids], [None], jax.random.key(0))[0]
  one = run(params)
  assert one == run(plain)  # the dequantized model's decode (random weights: the full forward's
  # argmax is checked on peaked models in test_generate.py)
  meshed = generate.place(cfg, params, "fsdp=2,expert=2,tensor=2", None, False)
  assert meshed["blocks"][1]["moe"]["gate"].values.sharding.spec[1] == "expert"
  assert run(meshed) == one
  # a plain checkpoint quantized on the fly: the same experts as the release's
  quantized = generate.place(cfg, plain, None, None, True)
  np.testing.assert_array_equal(quantized["blocks"][1]["moe"]["up"].values.view(np.uint8),
                                params["blocks"][1]["moe"]["up"].values.view(np.uint8))


def test_bad_fp8_input_is_one_line_and_writes_nothing(fp8_dir, tmp_path, capsys):
  model, path = fp8_dir
  config = json.loads((path / "config.json").read_text())
  cases = {
      "quant_method='bitsandbytes'": {"quant_method": "bitsandbytes"},
      "'strategy': 'group'": {"config_groups": {"group_0": {"weights": {
          **config["quantization_config"]["config_groups"]["group_0"]["weights"],
          "strategy": "group"}}}},
  }
  for i, (match, change) in enumerate(cases.items()):
    bad = tmp_path / f"bad{i}"
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(path / "model.safetensors")
    (bad / "config.json").write_text(json.dumps(
        {**config, "quantization_config": {**config["quantization_config"], **change}}))
    assert convert.main(["hf-to-orbax", str(bad), str(tmp_path / f"out{i}")]) != 0
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / f"out{i}").exists()
  # a missing scale is named; --keep-fp8 of a plain checkpoint is refused
  tensors = {k: v for k, v in safetensors.torch.load_file(path / "model.safetensors").items()
             if not k.endswith("experts.3.down_proj.weight_scale")}
  (tmp_path / "noscale").mkdir()
  safetensors.torch.save_file(tensors, tmp_path / "noscale" / "model.safetensors")
  (tmp_path / "noscale" / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf_io.CheckpointError, match=r"missing .*experts\.3\.down_proj\.weight_scale"):
    l4.load_hf(tmp_path / "noscale")
  model.save_pretrained(tmp_path / "plain_hf")
  with pytest.raises(hf_io.CheckpointError, match="not an FP8 checkpoint"):
    convert.hf_to_orbax(tmp_path / "plain_hf", tmp_path / "o", keep_fp8=True, progress=False)
  assert not (tmp_path / "o").exists()
