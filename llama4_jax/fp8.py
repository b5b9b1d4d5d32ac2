"""The layout of Meta's FP8 release (`Llama-4-Maverick-17B-128E-Instruct-FP8`): compressed-tensors'
"float-quantized" format, as transformers (`SequentialLlama4TextExperts`) and serving stacks read it.

- The routed experts are stored per expert and unfused, HF `nn.Linear` style [Out, In]:
  `...feed_forward.experts.{e}.{gate,up,down}_proj.weight` in float8_e4m3fn, each with
  `...weight_scale` [Out, 1] (static, symmetric, one scale per output channel; fp32 when we write
  it, bf16 or fp32 when we read it), where HF's bf16 layout has the fused `experts.gate_up_proj`
  [E, In, 2F] and `experts.down_proj` [E, F, D].
- Activations are quantized per token at run time by serving stacks (`input_activations`: dynamic),
  so no activation scale is stored.
- Everything else stays in its dtype; `quantization_config.ignore` lists it.

Reading also accepts other per-channel or per-tensor FP8 `nn.Linear` weights (any `X.weight` with
an `X.weight_scale`), dequantized. Here the fused expert tensors are rebuilt from (and split into)
the per-expert ones, so `llama4_jax.convert`'s one table serves both layouts; in our params an FP8
expert matrix is a `quant.FP8Tensor`, whose scale [.., 1, Out] is the HF scale transposed as the
weight is.
"""
from typing import Callable

import numpy as np

from llama4_jax.quant import FP8Tensor, dequantize

FORMAT = "float-quantized"
PARTS = {"experts.gate_up_proj": ("gate_proj", "up_proj"), "experts.down_proj": ("down_proj",)}
SCALE = "_scale"  # `X.weight` -> `X.weight_scale`


def _quantization_config(hf_config: dict) -> dict | None:
  return hf_config.get("quantization_config",
                       (hf_config.get("text_config") or {}).get("quantization_config"))


def is_fp8(hf_config: dict) -> bool:
  """Whether config.json describes the FP8 layout; a quantization_config of another kind is a
  ValueError naming the key."""
  qc = _quantization_config(hf_config)
  if qc is None:
    return False
  key = "config.json quantization_config"
  if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != FORMAT:
    raise ValueError(f"{key}: quant_method={qc.get('quant_method')!r} format={qc.get('format')!r};"
                     f" only compressed-tensors {FORMAT!r} (FP8) checkpoints are read")
  for name, group in (qc.get("config_groups") or {}).items():
    w, a = group.get("weights") or {}, group.get("input_activations") or {}
    want = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
    bad = {k: w.get(k) for k, v in want.items() if w.get(k) != v}
    if w.get("strategy") not in ("channel", "tensor"):
      bad["strategy"] = w.get("strategy")
    if a and not a.get("dynamic", False):
      bad["input_activations.dynamic"] = a.get("dynamic")
    if bad:
      raise ValueError(f"{key}.config_groups.{name}.weights: {bad}; supported: static symmetric "
                       f"8-bit float weights per channel or tensor, dynamic activations")
  return True


def without_quantization(hf_config: dict) -> dict:
  """config.json of the same model with plain (dequantized) weights."""
  out = {k: v for k, v in hf_config.items() if k != "quantization_config"}
  if isinstance(out.get("text_config"), dict):
    out["text_config"] = without_quantization(out["text_config"])
  return out


def quantization_config() -> dict:
  """What we write: the release's scheme (FP8 per-channel weights of the routed experts, FP8
  per-token dynamic activations), everything else listed as not converted."""
  args = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
          "observer": "minmax", "actorder": None, "block_structure": None}
  return {
      "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
      "config_groups": {"group_0": {
          "targets": ["Linear"], "output_activations": None,
          "weights": {**args, "strategy": "channel", "dynamic": False},
          "input_activations": {**args, "strategy": "token", "dynamic": True, "observer": None}}},
      "ignore": ["re:.*self_attn.*", "re:.*router.*", "re:.*shared_expert.*",
                 r"re:.*feed_forward\.(gate|up|down)_proj", "re:.*lm_head", "re:.*vision_model.*",
                 "re:.*multi_modal_projector.*"],
      "kv_cache_scheme": None, "global_compression_ratio": None,
  }


def _split(name: str) -> tuple[str, tuple[str, ...]] | None:
  """`...layers.3.feed_forward.experts.gate_up_proj` -> (`...experts`, ("gate_proj", "up_proj"))."""
  for fused, parts in PARTS.items():
    if name.endswith("." + fused):
      return name[:-len(fused)] + "experts", parts
  return None


def per_expert(name: str, n_experts: int) -> list[tuple[str, int, int]]:
  """The FP8 layout's (weight name, expert, part) for one fused expert tensor; [] for others."""
  split = _split(name)
  if split is None:
    return []
  stem, parts = split
  return [(f"{stem}.{e}.{part}.weight", e, i) for e in range(n_experts)
          for i, part in enumerate(parts)]


def expected(shapes: dict[str, tuple], n_experts: int) -> dict[str, tuple]:
  """HF name -> shape of the FP8 layout, from the bf16 layout's `shapes`."""
  out = {}
  for name, shape in shapes.items():
    pieces = per_expert(name, n_experts)
    if not pieces:
      out[name] = shape
      continue
    out_dim = shape[-1] // (len(pieces) // n_experts)
    for weight, _, _ in pieces:
      out[weight], out[weight + SCALE] = (out_dim, shape[-2]), (out_dim, 1)
  return out


def fuse(name: str, n_experts: int, get: Callable[[str], np.ndarray], suffix: str = "") -> np.ndarray:
  """The bf16 layout's fused tensor `name` [E, In, k*Out] from the per-expert `weight{suffix}`
  tensors [Out, In] (suffix "" or "_scale": then [E, 1, k*Out])."""
  pieces = per_expert(name, n_experts)
  k = len(pieces) // n_experts
  return np.stack([np.concatenate([get(w + suffix).T for w, _, _ in pieces[e * k:(e + 1) * k]], -1)
                   for e in range(n_experts)])


def unfuse(fused: FP8Tensor, name: str, n_experts: int) -> dict[str, np.ndarray]:
  """Per-expert weight and scale tensors (HF layout) of one fused FP8 expert tensor."""
  pieces = per_expert(name, n_experts)
  k = len(pieces) // n_experts
  width = fused.values.shape[-1] // k
  out = {}
  for weight, e, i in pieces:
    cols = slice(i * width, (i + 1) * width)
    out[weight] = np.ascontiguousarray(fused.values[e, :, cols].T)
    out[weight + SCALE] = np.ascontiguousarray(fused.scale[e, :, cols].T, np.float32)
  return out


def reader(get: Callable[[str], np.ndarray], names, n_experts: int, keep: bool) -> Callable:
  """`get` for the bf16 layout's names over an FP8 directory holding `names`: fused expert tensors
  rebuilt (as `FP8Tensor`s when `keep`, else dequantized to fp32), other FP8 weights dequantized
  (`quant.dequantize` on numpy arrays: the host computes what the device would)."""
  names = set(names)

  def read(name: str):
    if per_expert(name, n_experts) and name not in names:
      q = FP8Tensor(fuse(name, n_experts, get), fuse(name, n_experts, get, SCALE).astype(np.float32))
      return q if keep else dequantize(q)
    if name + SCALE in names:
      return dequantize(FP8Tensor(get(name), get(name + SCALE).astype(np.float32)))
    return get(name)
  return read
