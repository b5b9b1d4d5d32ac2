"""The image processor against HF's: tiles bit-equal to `Llama4ImageProcessor` (recorded from the
real torchvision-backed processor by tests/data/make_processor_golden.py, since torchvision is not a
test dependency) and the prompt expansion equal to `Llama4Processor._prompt_split_image`."""
import hashlib
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from PIL import Image
from transformers.models.llama4.processing_llama4 import Llama4Processor

from data.make_processor_golden import DEFAULT_SIZES, MAX_TILES, SIZES, TILE, image
from llama4_jax import processor

GOLDEN = np.load(Path(__file__).parent / "data" / "processor_golden.npz")
IDS = processor.ImageTokens()
NAMES = {"<|image_start|>": IDS.start, "<|image_end|>": IDS.end, "<|tile_x_separator|>": IDS.x_sep,
         "<|tile_y_separator|>": IDS.y_sep, "<|image|>": IDS.image, "<|patch|>": IDS.patch}


def _token_ids(hf_string: str) -> list[int]:
  tokens = re.findall(r"<\|[a-z_]+\|>", hf_string)
  assert "".join(tokens) == hf_string  # nothing but special tokens
  return [NAMES[t] for t in tokens]


@pytest.mark.parametrize("i", range(len(SIZES)), ids=[f"{h}x{w}" for h, w in SIZES])
def test_tiles_are_bit_equal_to_hf_small_tiles(i):
  h, w = SIZES[i]
  tiles, aspect = processor.preprocess(image(h, w, i), TILE, MAX_TILES)
  want = GOLDEN[f"pixels_{i}"].view(ml_dtypes.bfloat16)
  assert aspect == tuple(GOLDEN[f"aspect_{i}"])
  assert tiles.dtype == ml_dtypes.bfloat16 and tiles.shape == want.shape
  np.testing.assert_array_equal(tiles.view(np.int16), want.view(np.int16))


@pytest.mark.parametrize("i", range(len(DEFAULT_SIZES)), ids=[f"{h}x{w}" for h, w in DEFAULT_SIZES])
def test_default_processor_is_bit_equal_to_hf(i):
  """336 px tiles, up to 16 of them: tile grid, count and every bf16 bit (by digest)."""
  h, w = DEFAULT_SIZES[i]
  tiles, aspect = processor.preprocess(image(h, w, 100 + i))
  assert aspect == tuple(GOLDEN[f"default_aspect_{i}"])
  assert len(tiles) == int(GOLDEN[f"default_tiles_{i}"])
  assert hashlib.sha256(tiles.view(np.int16).tobytes()).hexdigest() == str(GOLDEN[f"default_sha256_{i}"])


def test_hand_checked_examples():
  """llama4_hf_spec.md §4.5: canvases worked out by hand from HF's helpers."""
  canvases = processor.supported_canvases(16, 336)
  assert len(canvases) == 50 and (336, 336) in canvases and (336, 16 * 336) in canvases
  assert processor.best_canvas(600, 800, canvases) == (672, 1008)    # 2x3 + global = 7 tiles
  assert processor.best_canvas(1000, 300, canvases) == (1008, 336)   # 3x1 + global
  assert processor.best_canvas(2000, 3000, canvases) == (1008, 1680)  # 3x5 + global = 16
  assert processor.best_canvas(200, 300, canvases) == (336, 336)
  assert processor.fit_size(200, 300, 336, 336) == (224, 336)
  tiles, aspect = processor.preprocess(np.full((200, 300, 3), 255, np.uint8))
  assert aspect == (1, 1) and tiles.shape == (1, 3, 336, 336)
  t = tiles[0].astype(np.float32)
  assert np.all(t[:, :224] == 1.0) and np.all(t[:, 224:] == -1.0)  # padding is black -> -1


@pytest.mark.parametrize("aspect", [(1, 1), (2, 3), (3, 1), (1, 4), (3, 5)])
def test_prompt_expansion_equals_hf(aspect):
  want = _token_ids(Llama4Processor._prompt_split_image(None, aspect, 144))
  assert processor.image_token_ids(aspect, 144) == want
  for i in range(len(SIZES)):  # the strings recorded with the golden tiles agree too
    recorded = tuple(GOLDEN[f"aspect_{i}"])
    assert processor.image_token_ids(recorded, 144) == _token_ids(str(GOLDEN[f"prompt_{i}"]))


def test_prepare_two_images_in_one_prompt():
  prompt = [1, 2, IDS.image, 3, IDS.image, 4]
  ids, pixels = processor.prepare(prompt, [image(40, 90, 0), image(28, 28, 2)], TILE, 1, MAX_TILES)
  assert pixels.shape == (7 + 1, 3, TILE, TILE)
  assert ids.count(IDS.patch) == len(pixels)  # one feature row per tile at 1 token per tile
  first = processor.image_token_ids((2, 3), 1)
  assert ids == [1, 2, *first, 3, *processor.image_token_ids((1, 1), 1), 4]


def test_bad_inputs_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match=r"the prompt has 1 <\|image\|> tokens .* but 2 images"):
    processor.expand_prompt([IDS.image], [(1, 1), (1, 1)], 144)
  bad = tmp_path / "not_an_image.png"
  bad.write_bytes(b"definitely not a png")
  with pytest.raises(ValueError, match=r"cannot read image .*not_an_image\.png"):
    processor.preprocess(bad)
  with pytest.raises(ValueError, match=r"dtype float32 and shape \(4, 4, 3\)"):
    processor.preprocess(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="cannot use a list as an image"):
    processor.preprocess([[0]])
  img = Image.fromarray(image(30, 40, 0)).convert("L")  # grey and paths work: converted to RGB
  img.save(tmp_path / "grey.png")
  tiles, _ = processor.preprocess(tmp_path / "grey.png", TILE, MAX_TILES)
  assert tiles.shape[1] == 3
