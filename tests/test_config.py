"""Config: presets carry the released values; HF dicts in every form seen on the hub."""
import dataclasses

import pytest
import transformers

import llama4_jax as l4
from llama4_jax import config as config_lib


def test_scout_and_maverick_presets():
  s, m = l4.presets.scout().text, l4.presets.maverick().text
  assert (s.num_local_experts, s.use_qk_norm, s.rope_scaling) == (
      16, True, l4.Llama3Scaling(16.0, 1.0, 1.0, 8192))
  assert all(s.is_moe(i) for i in range(48))
  assert (m.num_local_experts, m.use_qk_norm, m.rope_scaling) == (128, False, None)
  assert [i for i in range(48) if m.is_moe(i)] == list(range(1, 48, 2))
  for t in (s, m):  # 36 chunked RoPE layers, 12 full-attention NoPE layers (3, 7, ..., 47)
    assert [i for i in range(48) if not t.uses_rope(i)] == list(range(3, 48, 4))
    assert [t.is_chunked(i) for i in range(48)] == [t.uses_rope(i) for i in range(48)]
    assert t.period == 4


def _hf(**overrides):
  base = config_lib.text_to_hf(l4.presets.tiny().text)
  return {**base, **overrides}


def test_old_rope_scaling_and_new_rope_parameters_forms_agree():
  new = config_lib.text_from_hf(_hf())
  old = _hf(rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64})
  del old["rope_parameters"]
  assert config_lib.text_from_hf(old) == new
  plain = _hf(rope_parameters=None, rope_scaling=None, rope_theta=5e5)
  assert config_lib.text_from_hf(plain).rope_scaling is None
  assert config_lib.text_from_hf(plain).rope_theta == 5e5


def test_hub_quirks():
  old = {k: v for k, v in _hf().items() if k not in ("layer_types", "no_rope_layers")}
  cfg = config_lib.text_from_hf({**old, "attn_temperature_tuning": 4, "no_rope_layers": []})
  assert cfg.attn_temperature_tuning is True
  assert [cfg.uses_rope(i) for i in range(4)] == [True, True, True, False]  # [] = the default
  assert config_lib.text_from_hf({**old, "eos_token_id": 7}).eos_token_id == (7,)


def test_to_hf_loads_in_transformers_and_comes_back_equal():
  for preset in (l4.presets.scout, l4.presets.maverick, l4.presets.tiny):
    text = preset().text
    d = config_lib.text_to_hf(text)
    hf = transformers.Llama4TextConfig(**d)
    assert hf.moe_layers == d["moe_layers"] and hf.no_rope_layers == d["no_rope_layers"]
    back = config_lib.text_from_hf(hf.to_dict())
    n = text.num_hidden_layers
    assert [back.layer_kind(i) for i in range(n)] == [text.layer_kind(i) for i in range(n)]
    strip = dict(moe_layers=None, rope_layers=None, chunked_layers=None)
    assert dataclasses.replace(back, **strip) == dataclasses.replace(text, **strip)


@pytest.mark.parametrize("kw,match", [
    (dict(num_key_value_heads=3), "not a multiple"),
    (dict(head_dim=23), "even"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(rope_layers=(True,)), "rope_layers has 1 entries"),
    (dict(moe_layers=(9,)), "outside"),
])
def test_invalid_configs_name_the_field(kw, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(l4.presets.tiny().text, **kw)


def test_unsupported_hf_settings_are_rejected():
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    config_lib.text_from_hf(_hf(hidden_act="gelu"))
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    config_lib.text_from_hf(_hf(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}))
  with pytest.raises(ValueError, match="model_type is 'mistral'"):
    config_lib.from_hf({"model_type": "mistral"})
