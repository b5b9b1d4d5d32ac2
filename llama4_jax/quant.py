"""On-the-fly int4 weights (the model card's "Scout on one H100"): the block matrices of a params
tree stored as int4, two per byte with one bf16 scale per group along the last axis, and turned
back into plain weights one layer at a time inside the layer scan (`dequantize_layer`, the default
`Hooks.weights`), so a forward or a decode on quantized params holds one layer dequantized at a
time. QLoRA's frozen base is the same format (train/lora.py).

    q = l4.quantize(params, group_size=64)      # attention, dense MLP, experts: int4
    logits = l4.forward(cfg, q, ids)           # the embedding, norms, router, LM head stay
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


def dequantize(q: QTensor, dtype=jnp.float32) -> jax.Array:
  lo, hi = q.packed & 0xF, q.packed >> 4
  vals = jnp.stack([lo, hi], axis=-1).reshape(*q.packed.shape[:-1], -1).astype(jnp.int32) - 8
  grouped = vals.reshape(*vals.shape[:-1], -1, q.group).astype(jnp.float32)
  w = grouped * q.scale.astype(jnp.float32)[..., None]
  return w.reshape(vals.shape).astype(dtype)


def quantize(params: dict, group_size: int = 64, knob: str = "group_size") -> dict:
  """`params` with every block matrix (`BLOCK_MATMULS`) an int4 `QTensor`; the rest unchanged."""
  def leaf(path, w):
    if getattr(path[-1], "key", None) in BLOCK_MATMULS:
      return quantize_array(w, group_size, jax.tree_util.keystr(path), knob)
    return w
  return {**params, "blocks": jax.tree_util.tree_map_with_path(leaf, params["blocks"])}


def dequantize_layer(p):
  """One layer's params with `QTensor` leaves as plain weights (bf16, the scales' dtype)."""
  return jax.tree.map(lambda x: dequantize(x, x.scale.dtype) if isinstance(x, QTensor) else x, p,
                      is_leaf=lambda x: isinstance(x, QTensor))


def nbytes(tree) -> int:
  """Bytes of a params tree (arrays, `QTensor`s or their abstract shapes)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
