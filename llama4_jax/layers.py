"""Pure building blocks: RMSNorm, Llama 4 RoPE (interleaved pairs, llama3 scaling), SwiGLU.

Reference: transformers `modeling_llama4.py` (Llama4TextRMSNorm, Llama4TextL2Norm, apply_rotary_emb,
Llama4TextMLP) and `modeling_rope_utils._compute_llama3_parameters`.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from llama4_jax.config import Llama3Scaling


def unconstrained(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """The default `constrain` hook: activations placed wherever the compiler likes."""
  del axes
  return x


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
  """RMSNorm in fp32, cast back to x.dtype *before* the weight multiply (as HF does)."""
  x32 = x.astype(jnp.float32)
  y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
  if weight is None:
    return y
  return y * jnp.expand_dims(weight.astype(x.dtype), tuple(range(x.ndim - 1)))


def rope_inv_freq(head_dim: int, theta: float, scaling: Llama3Scaling | None) -> np.ndarray:
  """Inverse frequencies [head_dim/2] in float32, with llama3 scaling when given.

  Computed with NumPy at trace time: they depend on the config only.
  """
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
  if scaling is None:
    return inv
  s = scaling
  low_wl = s.original_max_position_embeddings / s.low_freq_factor
  high_wl = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = (2 * math.pi / inv).astype(np.float32)
  scaled = np.where(wavelen > low_wl, inv / np.float32(s.factor), inv).astype(np.float32)
  medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
  if s.high_freq_factor != s.low_freq_factor:  # Scout's 1/1: the band is empty and the formula is 0/0.
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
    scaled = np.where(medium, smoothed, scaled).astype(np.float32)
  return scaled


def rope_angles(positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotation angles [B, T, H/2] in float32."""
  return positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]


def apply_rope(x_BTNH: jax.Array, angles_BTJ: jax.Array) -> jax.Array:
  """Meta's complex RoPE: pairs (x[2j], x[2j+1]) rotate by angle j. fp32 math, cast back."""
  x = x_BTNH.astype(jnp.float32).reshape(*x_BTNH.shape[:-1], -1, 2)
  x0, x1 = x[..., 0], x[..., 1]
  cos = jnp.cos(angles_BTJ)[:, :, None, :]
  sin = jnp.sin(angles_BTJ)[:, :, None, :]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x_BTNH.shape).astype(x_BTNH.dtype)


def dense(x_D: jax.Array, w: jax.Array) -> jax.Array:
  """x @ w over any leading axes of x and trailing axes of w, as ONE 2-D matmul.

  XLA:CPU runs the weight gradient of a matmul that contracts several axes (e.g. 'BTD,BTF->DF')
  several times slower than the same product on flattened [B*T, D] operands.
  """
  d = w.shape[0]
  y = x_D.reshape(-1, d) @ w.reshape(d, -1)
  return y.reshape(*x_D.shape[:-1], *w.shape[1:])


def swiglu(x_D: jax.Array, gate_DF: jax.Array, up_DF: jax.Array, down_FD: jax.Array) -> jax.Array:
  """down(silu(x @ gate) * (x @ up)) over any leading axes of x."""
  return dense(jax.nn.silu(dense(x_D, gate_DF)) * dense(x_D, up_DF), down_FD)
