"""Multimodal grain pipeline: image-text JSONL -> rows of token ids with their image tiles.

Records are `{"text": "... <|image|> ...", "images": ["a.png", ...]}` (paths relative to the JSONL
file): each `<|image|>` is expanded into the image's tokens and its tiles are appended to the row's
`pixel_values` (llama4_jax.processor, equal to HF's processor). One record per row, no packing: rows
are padded to `seq_len` tokens and `row_tiles` zero tiles, so every batch has static shapes; the
model fills each row's `<|patch|>` positions from that row's tiles in order (`l4.apply` with
per-row pixel values).
Image tokens are never training targets (`loss_mask`). A record longer than `seq_len` is cut at a
whole image. As in train/data.py each host reads its own slice, shuffled and repeated.
"""
import json
import warnings
from pathlib import Path

import grain
import ml_dtypes
import numpy as np

import llama4_jax as l4
from llama4_jax import processor
from train import data, tasks, tokenizer as tokenizer_lib
from train.config import DataConfig

PLACEHOLDER = "<|image|>"


def read_records(path: str) -> list[dict]:
  """JSONL records with `text` and `images` (resolved to absolute paths), checked line by line."""
  base, records = Path(path).parent, []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{n}"
      try:
        r = json.loads(line)
        text, images = r["text"], r.get("images", [])
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: expected a JSON object with 'text' and 'images' ({e})") from e
      if not isinstance(text, str):
        raise ValueError(f"{where}: 'text' must be a string, got {text!r:.60}")
      if not isinstance(images, list) or text.count(PLACEHOLDER) != len(images):
        raise ValueError(f"{where}: the text has {text.count(PLACEHOLDER)} {PLACEHOLDER} "
                         f"placeholders but 'images' lists {images!r}")
      for image in images:
        if not isinstance(image, str) or not (base / image).is_file():
          raise ValueError(f"{where}: image {image!r} is not a file (paths are relative to "
                           f"{base})")
      records.append({"text": text, "images": [str(base / p) for p in images], "where": where})
  if not records:
    raise ValueError(f"data file {path} holds no records")
  return records


def resolve_paths(cfg: DataConfig, workdir: str) -> tuple[str, ...]:
  """The embedded colour task, or the configured JSONL paths (checked before compiling)."""
  if cfg.synthetic_images is not None:
    s = cfg.synthetic_images
    return (str(tasks.write_colors(Path(workdir) / "data" / f"colors-{s.num_examples}-{s.seed}",
                                   s.num_examples, s.seed)),)
  data.check_paths(cfg.paths)
  bad = [p for p in cfg.paths if Path(p).suffix != ".jsonl"]
  if bad:
    raise ValueError(f"multimodal data must be .jsonl records with images; got {bad}")
  return cfg.paths


class Encoder:
  """record -> one row: tokens, segment_ids, positions, loss_mask [seq_len] and pixel_values
  [row_tiles, 3, S, S] bf16."""

  def __init__(self, tok, vision: l4.VisionConfig, cfg: DataConfig):
    self.tok, self.vision, self.cfg, self.warned = tok, vision, cfg, False
    self.ids = tokenizer_lib.image_tokens(tok)
    self.bos, self.eos, self.pad = tokenizer_lib.specials(tok)[:3]

  def _tokens(self, record: dict) -> tuple[list[int], list[tuple[int, int]], list[np.ndarray]]:
    tokens, spans, tiles = [self.bos], [], []
    pieces = record["text"].split(PLACEHOLDER)
    for k, piece in enumerate(pieces):
      ids = self.tok.encode(piece, add_special_tokens=False).ids
      if set(ids) & set(self.ids):
        raise ValueError(f"{record['where']}: the text holds image special tokens other than "
                         f"{PLACEHOLDER} placeholders")
      tokens += ids
      if k < len(record["images"]):
        t, aspect = processor.preprocess(record["images"][k], self.vision.image_size,
                                         self.cfg.image_tiles)
        start = len(tokens)
        tokens += processor.image_token_ids(aspect, self.vision.tokens_per_tile, self.ids)
        spans.append((start, len(tokens)))
        tiles.append(t)
    return tokens + [self.eos], spans, tiles

  def __call__(self, record: dict) -> dict:
    seq_len, s = self.cfg.seq_len, self.vision.image_size
    tokens, spans, tiles = self._tokens(record)
    keep = min(len(tokens), seq_len)
    if keep < len(tokens) and not self.warned:  # once per encoder: the text after the cut is lost
      self.warned = True
      warnings.warn(f"{record['where']}: {len(tokens)} tokens cut to data.seq_len={seq_len}; "
                    f"records this long lose their end (raise seq_len to keep it)", stacklevel=2)
    for k, (start, end) in enumerate(spans):  # cut before the first image that does not fit
      if end > keep:
        keep, tiles = start, tiles[:k]
        break
    n_tiles = sum(len(t) for t in tiles)
    if n_tiles > self.cfg.row_tiles:
      raise ValueError(f"{record['where']}: its images make {n_tiles} tiles but data.row_tiles is "
                       f"{self.cfg.row_tiles}")
    ids = np.full(seq_len, self.pad, np.int32)
    ids[:keep] = tokens[:keep]
    pixels = np.zeros((self.cfg.row_tiles, 3, s, s), ml_dtypes.bfloat16)
    if tiles:
      pixels[:n_tiles] = np.concatenate(tiles)
    real = np.arange(seq_len) < keep
    return {"tokens": ids, "segment_ids": real.astype(np.int32),
            "positions": np.arange(seq_len, dtype=np.int32),
            "loss_mask": (real & ~np.isin(ids, list(self.ids))).astype(np.int32),
            "pixel_values": pixels}


def make_dataset(cfg: DataConfig, paths: tuple[str, ...], tok, vision: l4.VisionConfig,
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Batches of this host's rows (see `Encoder`)."""
  if cfg.batch_size % process_count:
    raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by {process_count} hosts")
  weights = cfg.weights or (1.0,) * len(paths)
  if len(weights) != len(paths):
    raise ValueError(f"data.weights has {len(weights)} entries for {len(paths)} paths")
  encode = Encoder(tok, vision, cfg)
  parts = [grain.MapDataset.source(read_records(p))[process_index::process_count]
           .seed(cfg.seed + i).shuffle().repeat().map(encode).to_iter_dataset()
           for i, p in enumerate(paths)]
  ds = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, list(weights))
  return data.batched(ds, cfg, process_count)
