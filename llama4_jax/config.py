"""Llama 4 configuration: frozen dataclasses and conversion from/to HF config dicts.

Reference: transformers `configuration_llama4.py` (Llama4TextConfig, Llama4VisionConfig, Llama4Config).
Field names follow HF so a reader can map them one to one. Layer patterns that HF derives in
`__post_init__` (moe_layers, no_rope_layers, layer_types) stay derivable here: `None` means "the
default pattern", so `dataclasses.replace(cfg, num_hidden_layers=8)` keeps working.
"""
import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
  """llama3 RoPE frequency scaling (`rope_type: llama3`)."""
  factor: float = 16.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 1.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= 0:
      raise ValueError(f"llama3 rope scaling factors must be > 0, got {self}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The language model (HF `Llama4TextConfig`); defaults are Scout's released values."""
  vocab_size: int = 202048
  hidden_size: int = 5120
  intermediate_size: int = 8192        # routed experts and the shared expert
  intermediate_size_mlp: int = 16384   # dense FFN layers
  num_hidden_layers: int = 48
  num_attention_heads: int = 40
  num_key_value_heads: int = 8
  head_dim: int = 128
  num_local_experts: int = 16
  num_experts_per_tok: int = 1
  interleave_moe_layer_step: int = 1
  moe_layers: tuple[int, ...] | None = None        # None: every `interleave_moe_layer_step`-th layer
  no_rope_layer_interval: int = 4
  rope_layers: tuple[bool, ...] | None = None      # HF `no_rope_layers` (1 = uses RoPE); None: default
  chunked_layers: tuple[bool, ...] | None = None   # HF `layer_types == chunked_attention`; None: = rope
  use_qk_norm: bool = True
  rope_theta: float = 500000.0
  rope_scaling: Llama3Scaling | None = Llama3Scaling()
  attention_chunk_size: int | None = 8192
  attn_temperature_tuning: bool = True
  floor_scale: int = 8192
  attn_scale: float = 0.1
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 10485760
  router_aux_loss_coef: float = 0.001
  initializer_range: float = 0.02
  bos_token_id: int | None = 200000
  eos_token_id: tuple[int, ...] = (200001, 200007, 200008)
  pad_token_id: int | None = 200018

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "num_local_experts", "num_experts_per_tok", "interleave_moe_layer_step",
                 "no_rope_layer_interval", "floor_scale"):
      if getattr(self, name) < 1:
        raise ValueError(f"TextConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.num_experts_per_tok > self.num_local_experts:
      raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} > "
                       f"num_local_experts={self.num_local_experts}")
    if self.attention_chunk_size is not None and self.attention_chunk_size < 1:
      raise ValueError(f"attention_chunk_size must be >= 1 or None, got {self.attention_chunk_size}")
    n = self.num_hidden_layers
    for name in ("rope_layers", "chunked_layers"):
      v = getattr(self, name)
      if v is not None and len(v) != n:
        raise ValueError(f"TextConfig.{name} has {len(v)} entries, num_hidden_layers is {n}")
    if self.moe_layers is not None and any(not 0 <= i < n for i in self.moe_layers):
      raise ValueError(f"TextConfig.moe_layers={self.moe_layers} names a layer outside 0..{n - 1}")

  def is_moe(self, i: int) -> bool:
    if self.moe_layers is not None:
      return i in self.moe_layers
    return (i + 1) % self.interleave_moe_layer_step == 0

  def uses_rope(self, i: int) -> bool:
    if self.rope_layers is not None:
      return bool(self.rope_layers[i])
    return (i + 1) % self.no_rope_layer_interval != 0

  def is_chunked(self, i: int) -> bool:
    if self.chunked_layers is not None:
      return bool(self.chunked_layers[i])
    return self.uses_rope(i)

  def layer_kind(self, i: int) -> tuple[bool, bool, bool]:
    """(uses RoPE, chunked attention, MoE FFN): what distinguishes one layer's code from another's."""
    return self.uses_rope(i), self.is_chunked(i), self.is_moe(i)

  @property
  def period(self) -> int:
    """Length of the repeating layer pattern; layers are scanned over groups of this many."""
    n = self.num_hidden_layers
    kinds = [self.layer_kind(i) for i in range(n)]
    for p in range(1, n + 1):
      if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
        return p
    return n


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower (HF `Llama4VisionConfig`); defaults are the released Scout/Maverick values."""
  hidden_size: int = 1408
  num_hidden_layers: int = 34
  num_attention_heads: int = 16
  num_channels: int = 3
  intermediate_size: int = 5632
  vision_output_dim: int = 4096
  image_size: int = 336
  patch_size: int = 14
  norm_eps: float = 1e-5
  pixel_shuffle_ratio: float = 0.5
  projector_input_dim: int = 4096
  projector_output_dim: int = 4096
  rope_theta: float = 10000.0
  initializer_range: float = 0.02

  def __post_init__(self):
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "intermediate_size", "vision_output_dim", "image_size", "patch_size",
                 "projector_input_dim", "projector_output_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"VisionConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.hidden_size % self.num_attention_heads or (self.head_dim % 4):
      raise ValueError(f"VisionConfig: hidden_size={self.hidden_size} / num_attention_heads="
                       f"{self.num_attention_heads} must be a head size divisible by 4 (2-D RoPE)")
    if self.image_size % self.patch_size:
      raise ValueError(f"VisionConfig: image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}")
    if self.pixel_shuffle_ratio != 0.5 or self.grid % 2:
      raise ValueError(f"VisionConfig: pixel_shuffle_ratio={self.pixel_shuffle_ratio} with a "
                       f"{self.grid}x{self.grid} patch grid; Llama 4 uses 0.5 on an even grid")
    # HF's adapter fc1 takes `intermediate_size` inputs (the shuffled width) and fc2 maps
    # projector_output_dim -> projector_output_dim, so these must agree (as in every release).
    shuffled = self.hidden_size * 4
    if self.intermediate_size != shuffled:
      raise ValueError(f"VisionConfig: intermediate_size={self.intermediate_size} must equal "
                       f"4 * hidden_size = {shuffled} (the pixel-shuffled width)")
    if not self.projector_input_dim == self.projector_output_dim == self.vision_output_dim:
      raise ValueError(f"VisionConfig: projector_input_dim={self.projector_input_dim}, "
                       f"projector_output_dim={self.projector_output_dim} and vision_output_dim="
                       f"{self.vision_output_dim} must be equal")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def grid(self) -> int:
    """Patches per tile side."""
    return self.image_size // self.patch_size

  @property
  def tokens_per_tile(self) -> int:
    """`<|patch|>` tokens (feature rows) per tile after the pixel shuffle."""
    return self.grid * self.grid // 4


@dataclasses.dataclass(frozen=True)
class Config:
  """A whole Llama 4 model: text, plus the vision tower for `Llama4ForConditionalGeneration`."""
  text: TextConfig = TextConfig()
  vision: VisionConfig | None = None
  boi_token_index: int = 200080
  eoi_token_index: int = 200081
  image_token_index: int = 200092


# ---------------------------------------------------------------------------------------------
# HF config dicts.

_TEXT_MODEL_TYPE, _MM_MODEL_TYPE = "llama4_text", "llama4"
# Keys of HF's Llama4TextConfig that our math ignores; listed so a surprise is visible in review.
_IGNORED_TEXT_KEYS = {"hidden_act", "attention_bias", "attention_dropout", "use_cache",
                      "output_router_logits", "router_jitter_noise", "layer_types",
                      "no_rope_layers", "rope_parameters", "rope_scaling", "model_type",
                      "rope_theta", "num_hidden_layers", "eos_token_id"}


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, Llama3Scaling | None]:
  """Reads both the new `rope_parameters` and the old `rope_theta` + `rope_scaling` forms."""
  rp = dict(d.get("rope_parameters") or {})
  if d.get("rope_scaling"):
    rp = {**d["rope_scaling"], **rp}
  theta = float(rp.get("rope_theta", d.get("rope_theta", 500000.0)))
  rope_type = rp.get("rope_type", rp.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    raise ValueError(f"rope_type {rope_type!r} is not supported by Llama 4 (expected 'llama3' or 'default')")
  orig = rp.get("original_max_position_embeddings", d.get("max_position_embeddings"))
  return theta, Llama3Scaling(float(rp["factor"]), float(rp["low_freq_factor"]),
                              float(rp["high_freq_factor"]), int(orig))


def text_from_hf(d: dict[str, Any]) -> TextConfig:
  """HF `Llama4TextConfig` dict (a `text_config` or a causal-LM config.json) -> TextConfig."""
  if d.get("model_type", _TEXT_MODEL_TYPE) != _TEXT_MODEL_TYPE:
    raise ValueError(f"text config model_type is {d['model_type']!r}, expected {_TEXT_MODEL_TYPE!r}")
  if d.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={d['hidden_act']!r} is not supported (Llama 4 uses 'silu')")
  if d.get("attention_bias", False):
    raise ValueError("attention_bias=true is not supported (no released Llama 4 has attention biases)")
  n = int(d.get("num_hidden_layers", TextConfig.num_hidden_layers))
  theta, scaling = _rope_from_hf(d)
  kw = {f.name: d[f.name] for f in dataclasses.fields(TextConfig)
        if f.name in d and f.name not in _IGNORED_TEXT_KEYS}
  if kw.get("head_dim") is None:
    kw["head_dim"] = d.get("hidden_size", TextConfig.hidden_size) // d.get(
        "num_attention_heads", TextConfig.num_attention_heads)
  if kw.get("num_key_value_heads") is None:
    kw["num_key_value_heads"] = kw.get("num_attention_heads", TextConfig.num_attention_heads)
  kw["attn_temperature_tuning"] = bool(d.get("attn_temperature_tuning", True))  # old hub files: 4
  if d.get("moe_layers") is not None:
    kw["moe_layers"] = tuple(int(i) for i in d["moe_layers"])
  if d.get("no_rope_layers"):  # [] and None both mean the default every-4th-layer pattern
    kw["rope_layers"] = tuple(bool(v) for v in d["no_rope_layers"])
  if d.get("layer_types"):
    kw["chunked_layers"] = tuple(t == "chunked_attention" for t in d["layer_types"])
  eos = d.get("eos_token_id", TextConfig.eos_token_id)
  kw["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
  return TextConfig(num_hidden_layers=n, rope_theta=theta, rope_scaling=scaling, **kw)


def text_to_hf(cfg: TextConfig) -> dict[str, Any]:
  """TextConfig -> HF `Llama4TextConfig` dict with every derived field written out."""
  skip = {"moe_layers", "rope_layers", "chunked_layers", "rope_theta", "rope_scaling", "eos_token_id"}
  d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}
  n = cfg.num_hidden_layers
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta,
            **dataclasses.asdict(cfg.rope_scaling)}
  eos = list(cfg.eos_token_id)
  d.update(model_type=_TEXT_MODEL_TYPE, hidden_act="silu", attention_bias=False,
           moe_layers=[i for i in range(n) if cfg.is_moe(i)],
           no_rope_layers=[int(cfg.uses_rope(i)) for i in range(n)],
           layer_types=["chunked_attention" if cfg.is_chunked(i) else "full_attention"
                        for i in range(n)],
           rope_parameters=rope, eos_token_id=eos[0] if len(eos) == 1 else eos)
  return d


def vision_from_hf(d: dict[str, Any]) -> VisionConfig:
  if d.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"vision_config.hidden_act={d['hidden_act']!r} is not supported (Llama 4 "
                     f"uses 'gelu')")
  kw = {f.name: d[f.name] for f in dataclasses.fields(VisionConfig) if f.name in d}
  rp = d.get("rope_parameters") or {}
  kw["rope_theta"] = float(rp.get("rope_theta", d.get("rope_theta", VisionConfig.rope_theta)))
  for name in ("image_size", "patch_size"):
    v = kw.get(name)
    if isinstance(v, (list, tuple)):
      if len(set(v)) != 1:
        raise ValueError(f"vision_config.{name}={v}: only square sizes are supported")
      kw[name] = v[0]
  return VisionConfig(**kw)


def vision_to_hf(cfg: VisionConfig) -> dict[str, Any]:
  d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "rope_theta"}
  d.update(model_type="llama4_vision_model", hidden_act="gelu",
           rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
  return d


def from_hf(d: dict[str, Any]) -> Config:
  """A config.json dict of `Llama4ForCausalLM` or `Llama4ForConditionalGeneration` -> Config."""
  model_type = d.get("model_type")
  if model_type == _TEXT_MODEL_TYPE:
    return Config(text=text_from_hf(d))
  if model_type != _MM_MODEL_TYPE:
    raise ValueError(f"config.json model_type is {model_type!r}; expected "
                     f"{_TEXT_MODEL_TYPE!r} or {_MM_MODEL_TYPE!r}")
  if not d.get("vision_config"):
    raise ValueError(f"config.json has model_type {_MM_MODEL_TYPE!r} but no vision_config")
  return Config(text=text_from_hf(d.get("text_config") or {}),
                vision=vision_from_hf(d["vision_config"]),
                **{k: int(d[k]) for k in ("boi_token_index", "eoi_token_index", "image_token_index")
                   if k in d})


def to_hf(cfg: Config, *, dtype: str) -> dict[str, Any]:
  """Config -> config.json dict: `Llama4ForConditionalGeneration` when cfg has a vision tower,
  else `Llama4ForCausalLM`."""
  text = text_to_hf(cfg.text)
  if cfg.vision is None:
    return {**text, "architectures": ["Llama4ForCausalLM"], "dtype": dtype}
  return {"model_type": _MM_MODEL_TYPE, "architectures": ["Llama4ForConditionalGeneration"],
          "dtype": dtype, "text_config": text, "vision_config": vision_to_hf(cfg.vision),
          "boi_token_index": cfg.boi_token_index, "eoi_token_index": cfg.eoi_token_index,
          "image_token_index": cfg.image_token_index, "tie_word_embeddings": False}
