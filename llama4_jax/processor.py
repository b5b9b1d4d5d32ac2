"""Llama 4 image preprocessing and prompt expansion in NumPy/PIL (no torch, no torchvision).

Reference: transformers `image_processing_llama4.py` (Llama4ImageProcessor: find_supported_resolutions,
get_best_fit, get_max_res_without_distortion, pad, split_to_tiles, the global tile) and
`processing_llama4.py` (Llama4Processor._prompt_split_image); docs/hf_reference.md §4.5.

An image becomes a canvas of up to `max_tiles` tiles (the best fit among every h x w tiling), resized
without distortion (never upscaled past one tile per side), padded bottom/right with black, split
row-major, plus a global tile (the whole image squashed to one tile) when there is more than one.
Rescale and normalisation run in bfloat16, as HF and Meta do, so the tiles are bf16.
Resizing reimplements torchvision's uint8 antialiased bilinear kernel (HF's), which rounds
differently from PIL's filter of the same name (1/255 on a few percent of pixels).
"""
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageTokens(NamedTuple):
  """Special token ids of the Llama 4 tokenizer that frame an image in the prompt."""
  start: int = 200080    # <|image_start|>
  end: int = 200081      # <|image_end|>
  x_sep: int = 200084    # <|tile_x_separator|>
  y_sep: int = 200085    # <|tile_y_separator|>
  image: int = 200090    # <|image|>: the placeholder users write, and a marker before the global tile
  patch: int = 200092    # <|patch|>: the model's image_token_index, one per feature row


def supported_canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
  """Every (height, width) of h x w tiles with h * w <= max_tiles, in HF's order (ties in
  `best_canvas` are broken by area, so the order only matters for equal areas)."""
  by_ratio: dict[float, list[tuple[int, int]]] = {}
  for n in range(max_tiles, 0, -1):
    for h in sorted(d for d in range(1, n + 1) if n % d == 0):
      by_ratio.setdefault(h / (n // h), []).append((h, n // h))
  return [(h * tile, w * tile) for pairs in by_ratio.values() for h, w in pairs]


def best_canvas(height: int, width: int, canvases: list[tuple[int, int]],
                resize_to_max_canvas: bool = False) -> tuple[int, int]:
  """The canvas needing the least upscaling (or, if every canvas is smaller, the least
  downscaling); the smallest area among equals."""
  sizes = np.asarray(canvases, np.int64)
  # float32 as HF's torch tensors, so equal scales compare equal in the same cases
  scales = np.minimum(sizes[:, 0].astype(np.float32) / np.float32(height),
                      sizes[:, 1].astype(np.float32) / np.float32(width))
  up = scales[scales >= 1]
  if up.size:
    chosen = up.max() if resize_to_max_canvas else up.min()
  else:
    chosen = scales[scales < 1].max()
  candidates = sizes[scales == chosen]
  best = candidates[np.argmin(candidates[:, 0] * candidates[:, 1])]
  return int(best[0]), int(best[1])


def fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
  """The largest (h, w) inside the target with the image's aspect ratio (HF
  get_max_res_without_distortion)."""
  scale_w, scale_h = target_w / width, target_h / height
  if scale_w < scale_h:
    return max(min(int(np.floor(height * scale_w)), target_h), 1), max(target_w, 1)
  return max(target_h, 1), max(min(int(np.floor(width * scale_h)), target_w), 1)


def _resample_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Antialiased bilinear taps for one axis, as torch's uint8 kernel (ported from Pillow-SIMD):
  (first input index [out], int weights [out, taps], precision bits)."""
  scale = in_size / out_size
  support = scale if scale >= 1.0 else 1.0  # the triangle filter (radius 1) widened to shrink
  inv = 1.0 / scale if scale >= 1.0 else 1.0
  center = scale * (np.arange(out_size) + 0.5)
  start = np.maximum((center - support + 0.5).astype(np.int64), 0)
  stop = np.minimum((center + support + 0.5).astype(np.int64), in_size)
  taps = int((stop - start).max())
  j = np.arange(taps)
  w = np.maximum(1.0 - np.abs((j[None] + start[:, None] - center[:, None] + 0.5) * inv), 0.0)
  w = np.where(j[None] < (stop - start)[:, None], w, 0.0)
  w /= w.sum(axis=1, keepdims=True)
  precision = 0  # as many bits as keep the largest weight within int16
  while precision < 22 and int(0.5 + w.max() * (1 << (precision + 1))) < (1 << 15):
    precision += 1
  w_int = np.where(w < 0, -0.5, 0.5) + w * (1 << precision)
  return start, np.trunc(w_int).astype(np.int64), precision


def _resample_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  start, w, precision = _resample_weights(in_size, out_size)
  x = np.moveaxis(x, axis, 0)
  acc = np.full((out_size, *x.shape[1:]), 1 << (precision - 1), np.int64)
  for t in range(w.shape[1]):  # one tap at a time: memory of one output, whatever the scale
    rows = x[np.minimum(start + t, in_size - 1)].astype(np.int64)
    acc += w[:, t].reshape(-1, *[1] * (x.ndim - 1)) * rows
  return np.moveaxis(np.clip(acc >> precision, 0, 255).astype(np.uint8), 0, axis)


def resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
  """Antialiased bilinear resize of uint8 pixels, bit-equal to torchvision's
  `resize(..., BILINEAR, antialias=True)` on uint8 tensors (HF's resize): width first, then
  height, integer weights of adaptive precision, rounding to uint8 between the passes."""
  return _resample_axis(_resample_axis(rgb, width, 1), height, 0)


def load_image(image) -> Image.Image:
  """A PIL image, a path, or a uint8 array (H, W) / (H, W, 3|4) -> an RGB PIL image."""
  if isinstance(image, (str, Path)):
    try:
      with Image.open(image) as f:
        return f.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
      raise ValueError(f"cannot read image {image}: {e}") from e
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
        image.ndim == 3 and image.shape[2] not in (3, 4)) or 0 in image.shape:
      raise ValueError(f"image array has dtype {image.dtype} and shape {image.shape}; expected "
                       f"uint8 (H, W), (H, W, 3) or (H, W, 4)")
    image = Image.fromarray(image)
  if not isinstance(image, Image.Image):
    raise ValueError(f"cannot use a {type(image).__name__} as an image (PIL image, path or uint8 array)")
  return image.convert("RGB")


def _normalize(rgb: np.ndarray) -> np.ndarray:
  """uint8 -> [-1, 1] in bf16 with HF's rounding: x * (1/255) rounded to bf16, then (x - 0.5) / 0.5
  rounded to bf16. Returns [C, H, W]."""
  bf16 = ml_dtypes.bfloat16
  x = (rgb.astype(np.float32) * np.float32(1 / 255)).astype(bf16)
  x = (x.astype(np.float32) - np.float32(0.5)).astype(bf16)
  x = (x.astype(np.float32) / np.float32(0.5)).astype(bf16)
  return x.transpose(2, 0, 1)


def preprocess(image, tile: int = 336, max_tiles: int = 16,
               resize_to_max_canvas: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
  """One image -> (tiles [N, 3, tile, tile] bf16, (tile rows, tile columns)); N = rows * columns,
  plus one global tile when that is more than one."""
  rgb = load_image(image)
  w, h = rgb.size
  th, tw = best_canvas(h, w, supported_canvases(max_tiles, tile), resize_to_max_canvas)
  if not resize_to_max_canvas:  # never upscale past one tile per side
    nh, nw = fit_size(h, w, min(max(h, tile), th), min(max(w, tile), tw))
  else:
    nh, nw = fit_size(h, w, th, tw)
  canvas = np.zeros((th, tw, 3), np.uint8)
  pixels = np.asarray(rgb)
  canvas[:nh, :nw] = resize(pixels, nh, nw)
  rows, cols = th // tile, tw // tile
  tiles = _normalize(canvas).reshape(3, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4)
  tiles = tiles.reshape(rows * cols, 3, tile, tile)
  if rows * cols > 1:
    glob = _normalize(resize(pixels, tile, tile))
    tiles = np.concatenate([tiles, glob[None]])
  return tiles, (rows, cols)


def image_token_ids(aspect: tuple[int, int], tokens_per_tile: int,
                    ids: ImageTokens = ImageTokens()) -> list[int]:
  """The tokens one image stands for: start, each tile's patches (x separators between columns,
  a y separator after each row) when tiled, then <|image|>, the single/global tile's patches, end."""
  rows, cols = aspect
  out = [ids.start]
  if rows * cols > 1:
    for _ in range(rows):
      for x in range(cols):
        out += [ids.patch] * tokens_per_tile + ([ids.x_sep] if x < cols - 1 else [])
      out.append(ids.y_sep)
  return out + [ids.image] + [ids.patch] * tokens_per_tile + [ids.end]


def expand_prompt(token_ids: list[int], aspects: list[tuple[int, int]], tokens_per_tile: int,
                  ids: ImageTokens = ImageTokens()) -> list[int]:
  """Replaces the k-th <|image|> of a tokenized prompt by image k's tokens."""
  n = sum(t == ids.image for t in token_ids)
  if n != len(aspects):
    raise ValueError(f"the prompt has {n} <|image|> tokens (id {ids.image}) but {len(aspects)} "
                     f"images were given")
  out, k = [], 0
  for t in token_ids:
    if t == ids.image:
      out += image_token_ids(aspects[k], tokens_per_tile, ids)
      k += 1
    else:
      out.append(t)
  return out


def prepare(token_ids: list[int], images: list, tile: int, tokens_per_tile: int,
            max_tiles: int = 16, ids: ImageTokens = ImageTokens()) -> tuple[list[int], np.ndarray]:
  """A tokenized prompt with <|image|> placeholders and its images -> (expanded ids, pixel_values
  [N, 3, tile, tile] bf16: every image's tiles in order), ready for `l4.forward`."""
  processed = [preprocess(im, tile, max_tiles) for im in images]
  expanded = expand_prompt(token_ids, [a for _, a in processed], tokens_per_tile, ids)
  pixels = (np.concatenate([t for t, _ in processed]) if processed
            else np.zeros((0, 3, tile, tile), ml_dtypes.bfloat16))
  return expanded, pixels
