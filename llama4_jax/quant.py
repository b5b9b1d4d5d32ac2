"""Quantized weights, turned back into plain weights one layer at a time inside the layer scan
(`dequantize_layer`, the default `Hooks.weights`): a forward or a decode on quantized params holds
one layer dequantized at a time.

- int4 (the model card's "Scout on one H100"; QLoRA's frozen base, train/lora.py): every block
  matrix, two values per byte with one bf16 scale per group along the last axis.
- fp8 (the layout of Meta's FP8 release, llama4_jax/fp8.py): the routed experts only, float8_e4m3fn
  with one fp32 scale per output channel (absmax / 448, as compressed-tensors computes it).

    q = l4.quantize(params, "int4", group_size=64)  # attention, dense MLP, experts: int4
    q = l4.quantize(params, "fp8")                  # routed experts: fp8
    logits = l4.forward(cfg, q, ids)                # the embedding, norms, router, LM head stay
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np

from llama4_jax.params import BLOCK_MATMULS


@flax.struct.dataclass
class QTensor:
  """A weight in int4: `packed` uint8 [..., n/2] (low nibble = even index, value + 8) and `scale`
  [..., n/group] (absmax/7 rounded up to bf16): |w - dequantize(q)| <= scale/2 elementwise."""
  packed: jax.Array
  scale: jax.Array
  group: int = flax.struct.field(pytree_node=False)


def _group(name: str, n: int, group: int, knob: str) -> int:
  g = min(group, n)
  if n % g or g % 2:
    raise ValueError(f"{name}: last axis {n} cannot be split into int4 groups of {group} (and "
                     f"pairs of nibbles); set {knob} to an even divisor of {n}")
  return g


def quantize_array(w: jax.Array, group: int, name: str = "weight",
                   knob: str = "group_size") -> QTensor:
  """Symmetric absmax int4 over groups of `group` along the last axis."""
  n = w.shape[-1]
  g = _group(name, n, group, knob)
  x = w.astype(jnp.float32).reshape(*w.shape[:-1], n // g, g)
  absmax = jnp.max(jnp.abs(x), axis=-1)
  # rounded *up* into bf16, so |x / scale| <= 7 and nothing clips
  scale = (absmax / 7 * (1 + 2.0 ** -7)).astype(jnp.bfloat16)
  scale = jnp.where(absmax > 0, scale, jnp.ones_like(scale))
  q = jnp.clip(jnp.round(x / scale.astype(jnp.float32)[..., None]), -8, 7)
  u = (q.reshape(w.shape) + 8).astype(jnp.uint8)
  return QTensor(u[..., 0::2] | (u[..., 1::2] << 4), scale, g)


FP8_MAX = 448.0  # the largest finite float8_e4m3fn
EXPERT_MATMULS = ("gate", "up", "down")  # under "moe": the routed experts, [E, In, Out]


@flax.struct.dataclass
class FP8Tensor:
  """A weight [..., In, Out] as `values` float8_e4m3fn and `scale` fp32 [..., 1, Out]: one scale
  per output channel (HF's per-row `weight_scale` [Out, 1], transposed as the weight is)."""
  values: jax.Array
  scale: jax.Array


def quantize_fp8(w) -> FP8Tensor:
  """compressed-tensors' static per-channel FP8: scale = absmax / 448 over the input axis (a zero
  row takes fp32's eps), values = w / scale clipped to +-448, rounded to nearest even. A numpy `w`
  is quantized on the host with numpy's correctly rounded division, bit-exact with
  compressed-tensors (the converter's path); XLA's CPU division may differ by one ulp."""
  xp = np if isinstance(w, np.ndarray) else jnp
  x = w.astype(np.float32)
  scale = xp.max(xp.abs(x), axis=-2, keepdims=True) / np.float32(FP8_MAX)
  scale = xp.where(scale == 0, np.finfo(np.float32).eps, scale).astype(np.float32)
  values = xp.clip(x / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
  return FP8Tensor(values, scale)


def dequantize(q: "QTensor | FP8Tensor", dtype=jnp.float32) -> jax.Array:
  if isinstance(q, FP8Tensor):
    return (q.values.astype(jnp.float32) * q.scale).astype(dtype)
  lo, hi = q.packed & 0xF, q.packed >> 4
  vals = jnp.stack([lo, hi], axis=-1).reshape(*q.packed.shape[:-1], -1).astype(jnp.int32) - 8
  grouped = vals.reshape(*vals.shape[:-1], -1, q.group).astype(jnp.float32)
  w = grouped * q.scale.astype(jnp.float32)[..., None]
  return w.reshape(vals.shape).astype(dtype)


def _keys(path) -> tuple:
  return tuple(getattr(k, "key", None) for k in path)


def quantize(params: dict, kind: str = "int4", group_size: int = 64,
             knob: str = "group_size") -> dict:
  """`params` with every block matrix (`BLOCK_MATMULS`) an int4 `QTensor` (kind "int4"), or every
  routed expert matrix an `FP8Tensor` (kind "fp8"); the rest unchanged."""
  def leaf(path, w):
    keys = _keys(path)
    if kind == "int4" and keys[-1] in BLOCK_MATMULS:
      return quantize_array(w, group_size, jax.tree_util.keystr(path), knob)
    if kind == "fp8" and keys[-2:-1] == ("moe",) and keys[-1] in EXPERT_MATMULS:
      return quantize_fp8(w)
    return w
  if kind not in ("int4", "fp8"):
    raise ValueError(f"quantize kind {kind!r}: expected 'int4' or 'fp8'")
  return {**params, "blocks": jax.tree_util.tree_map_with_path(leaf, params["blocks"])}


def is_quantized(x) -> bool:
  return isinstance(x, (QTensor, FP8Tensor))


def has_quantized(tree) -> bool:
  """Whether any leaf of `tree` (arrays or abstract shapes) is quantized."""
  return any(map(is_quantized, jax.tree.leaves(tree, is_leaf=is_quantized)))


def dequantize_layer(p):
  """One layer's params with quantized leaves as plain weights: int4 in its scales' dtype (bf16),
  fp8 in the dtype of the layer's plain weights (fp32 params: exactly values * scale)."""
  plain = [x.dtype for x in jax.tree.leaves(p, is_leaf=is_quantized) if not is_quantized(x)]
  fp8_dtype = plain[0] if plain else jnp.bfloat16
  dtype = lambda x: x.scale.dtype if isinstance(x, QTensor) else fp8_dtype
  return jax.tree.map(lambda x: dequantize(x, dtype(x)) if is_quantized(x) else x, p,
                      is_leaf=is_quantized)


def nbytes(tree) -> int:
  """Bytes of a params tree (arrays, `QTensor`s or their abstract shapes)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
