"""Writes processor_golden.npz: HF's Llama4ImageProcessor (torchvision backend) and Llama4Processor
expansion on seeded images, for tests/test_processor.py. torchvision is not a test dependency (it
needs another torch build), so this runs once in a separate environment:

  python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
      transformers==5.23.0 pillow numpy
  /tmp/tv/bin/python tests/data/make_processor_golden.py
"""
import hashlib
from pathlib import Path

import numpy as np

TILE, MAX_TILES = 28, 6
SIZES = [(40, 90), (130, 50), (28, 28), (20, 15), (200, 300), (57, 300), (84, 56)]
# default processor (336 px tiles, up to 16): tile grid, tile count and a digest of the bf16 bytes
DEFAULT_SIZES = [(600, 800), (1000, 300), (2000, 3000), (333, 777), (200, 300), (17, 900),
                 (336, 336), (5000, 40), (400, 401), (90, 1200)]


def image(h: int, w: int, seed: int) -> np.ndarray:
  """Smooth gradients plus noise: exercises both the filter and the rounding."""
  rng = np.random.RandomState(seed)
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 0 * x], -1)
  return np.clip(base + rng.randint(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)


def main():
  import torch  # the HF side: only in the environment that has torchvision
  from transformers import Llama4ImageProcessor
  from transformers.models.llama4.processing_llama4 import Llama4Processor
  proc = Llama4ImageProcessor(size={"height": TILE, "width": TILE}, max_patches=MAX_TILES)
  out = {}
  for i, (h, w) in enumerate(SIZES):
    r = proc(images=[image(h, w, i)], return_tensors="pt")
    pv = r["pixel_values"]
    assert pv.dtype == torch.bfloat16
    out[f"pixels_{i}"] = pv.view(torch.int16).numpy()  # bf16 bits
    aspect = tuple(int(v) for v in r["aspect_ratios"][0])
    out[f"aspect_{i}"] = np.asarray(aspect)
    # the processor's own expansion string for 144 tokens per tile (Scout's 336 px tiles)
    out[f"prompt_{i}"] = np.asarray(Llama4Processor._prompt_split_image(None, aspect, 144))
  out["sizes"] = np.asarray(SIZES)
  default = Llama4ImageProcessor()
  for i, (h, w) in enumerate(DEFAULT_SIZES):
    r = default(images=[image(h, w, 100 + i)], return_tensors="pt")
    pv = r["pixel_values"]
    out[f"default_aspect_{i}"] = np.asarray([int(v) for v in r["aspect_ratios"][0]])
    out[f"default_tiles_{i}"] = np.asarray(pv.shape[0])
    out[f"default_sha256_{i}"] = np.asarray(hashlib.sha256(pv.view(torch.int16).numpy().tobytes()).hexdigest())
  out["default_sizes"] = np.asarray(DEFAULT_SIZES)
  np.savez_compressed(Path(__file__).with_name("processor_golden.npz"), **out)


if __name__ == "__main__":
  main()
