"""The Llama 4 vision tower and early fusion: image tiles -> features in the `<|patch|>` positions.

Reference: transformers `modeling_llama4.py` (Llama4VisionModel, Llama4VisionEncoderLayer,
Llama4VisionRotaryEmbedding, pixel_shuffle, Llama4VisionPixelShuffleMLP, Llama4MultiModalProjector,
Llama4ForConditionalGeneration.get_placeholder_mask) and docs/hf_reference.md §4.

Each tile [3, S, S] is an independent sequence: G*G patches of 14x14 through a bias-free linear,
a CLS embedding appended LAST, learned positions, pre-LN encoder layers with biases, 2-D RoPE and
bidirectional attention; the CLS row is dropped, a pixel shuffle folds 2x2 patches into one row and
an MLP adapter (GELU after both layers) and the projector map it to the text width.
Extra dimension letters: P patches (+1 with CLS), C channels, M feature rows (tiles x rows per tile).
"""
import jax
import jax.numpy as jnp
import numpy as np

from llama4_jax import layers
from llama4_jax.config import Config, VisionConfig

# HF builds every vision nn.LayerNorm with torch's default eps, whatever `norm_eps` says.
LAYERNORM_EPS = 1e-5
VISION_AXES = ("batch", "vision_tokens", "act_embed")  # logical axes of the tower's stream [N, P, D]


def _bias(x: jax.Array, b: jax.Array) -> jax.Array:
  """x + b, b broadcast over x's leading axes (explicitly: no rank promotion)."""
  return x + b.astype(x.dtype).reshape((1,) * (x.ndim - b.ndim) + b.shape)


def layer_norm(x: jax.Array, p: dict) -> jax.Array:
  """LayerNorm with scale and bias, computed in fp32 and cast back."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + LAYERNORM_EPS)
  scale = jnp.expand_dims(p["scale"].astype(jnp.float32), tuple(range(y.ndim - 1)))
  y = _bias(y * scale, p["bias"].astype(jnp.float32))
  return y.astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)  # nn.GELU(): exact erf


def rope_angles(v: VisionConfig) -> np.ndarray:
  """2-D RoPE angles [P+1, H/2]: column angles on the first half of the pairs, row angles on the
  second, coordinates + 1, the CLS row (last) 0. Config-only, so NumPy at trace time."""
  g, half = v.grid, v.head_dim // 4
  freq = (1.0 / (np.float32(v.rope_theta) ** (np.arange(0, 2 * half, 2, dtype=np.float32)
                                               / np.float32(2 * half)))).astype(np.float32)
  idx = np.arange(g * g)
  col, row = (idx % g + 1).astype(np.float32), (idx // g + 1).astype(np.float32)
  angles = np.concatenate([col[:, None] * freq, row[:, None] * freq], axis=1)
  return np.concatenate([angles, np.zeros((1, 2 * half), np.float32)]).astype(np.float32)


def patchify(v: VisionConfig, pixels: jax.Array) -> jax.Array:
  """[N, C, S, S] -> [N, P, C*p*p]: torch Unfold's order (channel, row, column in the patch),
  patches row-major."""
  n, c, h, w = pixels.shape
  if (c, h, w) != (v.num_channels, v.image_size, v.image_size):
    raise ValueError(f"pixel_values has shape {tuple(pixels.shape)}; expected tiles "
                     f"[N, {v.num_channels}, {v.image_size}, {v.image_size}] (whole tiles, not "
                     f"patches: see llama4_jax.processor)")
  g, p = v.grid, v.patch_size
  x = pixels.reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
  return x.reshape(n, g * g, c * p * p)


def _encoder_layer(p: dict, x_IPD: jax.Array, angles_1PJ: jax.Array, v: VisionConfig):
  n, s, _ = x_IPD.shape
  h = layer_norm(x_IPD, p["ln1"])
  q_IPNH, k_IPNH, v_IPNH = (_bias(layers.dense(h, p[w]), p[f"{w}_bias"]) for w in "qkv")
  q_IPNH = layers.apply_rope(q_IPNH, angles_1PJ)
  k_IPNH = layers.apply_rope(k_IPNH, angles_1PJ)
  scores = jnp.einsum("IPNH,ISNH->INPS", q_IPNH, k_IPNH) * v.head_dim ** -0.5
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x_IPD.dtype)
  a_IPNH = jnp.einsum("INPS,ISNH->IPNH", probs, v_IPNH)
  o_IPD = layers.dense(a_IPNH.reshape(n, s, -1), p["o"].reshape(-1, v.hidden_size))
  x_IPD = x_IPD + _bias(o_IPD, p["o_bias"])
  h = gelu(_bias(layers.dense(layer_norm(x_IPD, p["ln2"]), p["fc1"]), p["fc1_bias"]))
  return x_IPD + _bias(layers.dense(h, p["fc2"]), p["fc2_bias"])


def pixel_shuffle(x_IPD: jax.Array) -> jax.Array:
  """Ratio 0.5: each 2x2 block of patches becomes one row of 4x the width, in HF's order."""
  n, s, d = x_IPD.shape
  g = int(round(s ** 0.5))
  x = x_IPD.reshape(n, g, g // 2, 2 * d).transpose(0, 2, 1, 3)
  x = x.reshape(n, g // 2, g // 2, 4 * d).transpose(0, 2, 1, 3)
  return x.reshape(n, -1, 4 * d)


def encode(v: VisionConfig, p: dict, pixels: jax.Array, *, remat: bool = False,
           constrain=layers.unconstrained) -> jax.Array:
  """Tiles [N, C, S, S] -> adapter output [N, P/4, vision_output_dim] (HF `vision_model(...)
  .last_hidden_state`), in the dtype of the params. `constrain` (as `l4.Hooks.constrain`) places
  the stream at every layer: tiles are data-parallel, the width is not split."""
  dtype = p["patch"].dtype
  x = layers.dense(patchify(v, pixels).astype(dtype), p["patch"])
  cls = jnp.broadcast_to(p["cls"].astype(dtype), (x.shape[0], 1, x.shape[2]))
  x = layer_norm(_bias(jnp.concatenate([x, cls], axis=1), p["pos"]), p["ln_pre"])
  angles = jnp.asarray(rope_angles(v))[None]

  def layer(x, lp):
    return _encoder_layer(lp, constrain(x, VISION_AXES), angles, v), None
  if remat:
    layer = jax.checkpoint(layer)
  x, _ = jax.lax.scan(layer, x, p["layers"])
  x = pixel_shuffle(layer_norm(constrain(x, VISION_AXES), p["ln_post"])[:, :-1])
  x = gelu(layers.dense(x, p["adapter"]["fc1"]))
  return gelu(layers.dense(x, p["adapter"]["fc2"]))


def image_features(cfg: Config, params: dict, pixel_values: jax.Array, *, remat: bool = False,
                   constrain=layers.unconstrained) -> tuple[jax.Array, jax.Array]:
  """(adapter output [N, P/4, vision_output_dim], projected rows [N * P/4, D]) of tiles [N, C, S, S]."""
  if cfg.vision is None or "vision" not in params:
    raise ValueError("pixel_values were given but the model has no vision tower (cfg.vision is "
                     "None or params lack 'vision'); load a multimodal checkpoint")
  feats = constrain(encode(cfg.vision, params["vision"], pixel_values, remat=remat,
                           constrain=constrain), VISION_AXES)
  return feats, layers.dense(feats.reshape(-1, feats.shape[-1]), params["projector"])


def merge(embeds_BTD: jax.Array, input_ids: jax.Array, rows_MD: jax.Array,
          image_token: int) -> jax.Array:
  """The k-th `image_token` position (row-major over [B, T]) takes row k of `rows_MD`, as HF's
  masked_scatter. A count mismatch raises when the ids are concrete; under jit it makes every
  output NaN rather than silently shifting images."""
  mask_BT = input_ids == image_token
  m = rows_MD.shape[0]
  if not isinstance(input_ids, jax.core.Tracer):
    n = int(np.sum(np.asarray(mask_BT)))
    if n != m:
      raise ValueError(f"input_ids hold {n} image-token positions (id {image_token}) but the images "
                       f"give {m} feature rows; expand each image's prompt with "
                       f"llama4_jax.processor so the counts match")
  flat = mask_BT.reshape(-1)
  idx = jnp.cumsum(flat) - 1
  rows = jnp.take(rows_MD.astype(embeds_BTD.dtype), jnp.where(flat, idx, 0), axis=0,
                  mode="fill", fill_value=jnp.nan)
  out = jnp.where(flat[:, None], rows, embeds_BTD.reshape(-1, embeds_BTD.shape[-1]))
  out = out + jnp.where(jnp.sum(flat) == m, 0.0, jnp.nan).astype(out.dtype)
  return out.reshape(embeds_BTD.shape)


def merge_rows(embeds_BTD: jax.Array, input_ids: jax.Array, rows_BMD: jax.Array,
               image_token: int) -> jax.Array:
  """Per-row early fusion for training batches: the k-th `image_token` position of row b takes
  rows_BMD[b, k]. Rows may carry unused trailing feature rows (zero tiles padding a row to a fixed
  tile count); a row with more image-token positions than feature rows reads NaN there."""
  mask_BT = input_ids == image_token
  idx_BT = jnp.where(mask_BT, jnp.cumsum(mask_BT, axis=1) - 1, 0)
  m = rows_BMD.shape[1]
  rows_BTD = jnp.take_along_axis(rows_BMD.astype(embeds_BTD.dtype),
                                 jnp.minimum(idx_BT, m - 1)[..., None], axis=1)
  rows_BTD = jnp.where((idx_BT < m)[..., None], rows_BTD, jnp.nan)
  return jnp.where(mask_BT[..., None], rows_BTD, embeds_BTD)
