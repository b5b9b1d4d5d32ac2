"""Input-pipeline throughput per host: tokens/s of the text, chat and image-text pipelines
(read + tokenize + pack + batch, exactly the trainer's grain datasets) against what a v5p host
consumes when training Scout.

    python benchmarks/data.py [--workers 0 1 2] [--batches 40] [--tokenizer PATH]

Text and chat records are cut from the real English of this repository's own docs (README.md,
docs/*.md) so the tokenizer does realistic work; image-text uses the embedded colour task (one
image per record, resized and tiled into Scout's 336 px tiles by the processor). The tokenizer is Meta's Llama 4
tokenizer.model when `llama-models` is installed (`--tokenizer` to choose another), else the byte
tokenizer. `data.workers` is the knob: 0 runs the pipeline in the trainer's process, N > 0 in N
grain worker processes. Tokens counted are real tokens (segment_ids > 0), not padding.

The consumption a pipeline must keep up with: a v5p host has 4 chips of 459 bf16 TFLOP/s; at 40%
MFU, training Scout (17B active parameters; 6 x 17.17e9 FLOPs per token for the weights, plus
attention at 8k context) takes `metrics.train_flops_per_token` per token.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import llama4_jax as l4
from train import chat, config as config_lib, data, metrics, mmdata, tokenizer as tokenizer_lib

ROOT = Path(__file__).resolve().parent.parent
V5P_HOST_FLOPS = 4 * 459e12  # 4 chips x bf16 peak
MFU = 0.40


def corpus(out: Path) -> tuple[Path, Path]:
  """(text.jsonl, chat.jsonl) from the repository's markdown, in ~2 KB documents."""
  words = " ".join((ROOT / "README.md").read_text().split() +
                   [w for f in sorted((ROOT / "docs").glob("*.md")) for w in f.read_text().split()])
  docs = [words[i:i + 2000] for i in range(0, len(words), 2000)]
  text, chats = out / "text.jsonl", out / "chat.jsonl"
  text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  chats.write_text("".join(json.dumps({"messages": [
      {"role": "user", "content": d[:len(d) // 2]}, {"role": "assistant", "content": d[len(d) // 2:]}]})
      + "\n" for d in docs))
  return text, chats


def throughput(ds, batches: int) -> float:
  it = iter(ds)
  next(it)  # start-up (workers, first shuffle buffers) not counted
  t0, n = time.perf_counter(), 0
  for _ in range(batches):
    n += int(np.sum(next(it)["segment_ids"] > 0))
  return n / (time.perf_counter() - t0)


def pipelines(tmp: Path, tok, workers: int, seq_len: int) -> dict:
  text, chats = corpus(tmp)
  base = dict(seq_len=seq_len, batch_size=8, workers=workers)
  vision = l4.presets.scout().vision  # 336 px tiles, 144 tokens each
  images = config_lib.DataConfig(**base, synthetic_images=config_lib.SyntheticImagesConfig(200))
  image_paths = mmdata.resolve_paths(images, str(tmp))
  ids = tokenizer_lib.image_tokens(tok)
  return {
      "text": data.make_dataset(config_lib.DataConfig(paths=(str(text),), **base), (str(text),), tok),
      "chat": chat.make_dataset(config_lib.DataConfig(paths=(str(chats),), chat=True, **base),
                                (str(chats),), tok),
      "image-text": mmdata.make_dataset(images, image_paths, tok, vision) if ids else None,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--seq-len", type=int, default=8192)
  parser.add_argument("--tokenizer", default=None)
  args = parser.parse_args()
  path = args.tokenizer
  if path is None:
    try:
      import llama_models.llama4 as meta
      path = str(Path(meta.__path__[0]) / "tokenizer.model")
    except ImportError:
      pass
  tok = tokenizer_lib.load(path)
  scout = l4.presets.scout().text
  need = V5P_HOST_FLOPS * MFU / metrics.train_flops_per_token(scout, args.seq_len)
  print(f"tokenizer: {path or 'bytes'}; rows of {args.seq_len} tokens, 8 per batch")
  print(f"a v5p host (4 chips) training Scout at {MFU:.0%} MFU consumes {need:,.0f} tok/s")
  for workers in args.workers:
    with tempfile.TemporaryDirectory() as tmp:
      for name, ds in pipelines(Path(tmp), tok, workers, args.seq_len).items():
        if ds is None:
          continue
        rate = throughput(ds, args.batches)
        print(f"{name:<10} workers={workers}: {rate:12,.0f} tok/s  ({rate / need:6.1f}x a v5p host)")


if __name__ == "__main__":
  main()
