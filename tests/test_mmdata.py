"""The multimodal data pipeline: image-text records -> rows the model fuses; errors name the record."""
import json

import ml_dtypes
import numpy as np
import pytest
from PIL import Image

import llama4_jax as l4
from llama4_jax import processor
from train import config as run_config, mmdata, tasks, tokenizer as tokenizer_lib

VISION = l4.presets.tiny_vision()  # 56 px tiles, 4 tokens per tile
TOK = tokenizer_lib.byte_tokenizer()
IDS = tokenizer_lib.image_tokens(TOK)


def _write(tmp_path, records, sizes=((56, 112), (30, 30))):
  for i, (h, w) in enumerate(sizes):
    Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(tmp_path / f"im{i}.png")
  path = tmp_path / "mm.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _encoder(**kw):
  cfg = run_config.DataConfig(**{"seq_len": 48, "image_tiles": 4, "row_tiles": 4, **kw})
  return mmdata.Encoder(TOK, VISION, cfg)


def test_row_holds_expanded_prompt_tiles_and_loss_mask(tmp_path):
  path = _write(tmp_path, [{"text": "a<|image|>b<|image|>cd", "images": ["im0.png", "im1.png"]}])
  row = _encoder()(mmdata.read_records(path)[0])
  first, aspect = processor.preprocess(tmp_path / "im0.png", 56, 4)
  second, _ = processor.preprocess(tmp_path / "im1.png", 56, 4)
  assert aspect == (1, 2) and len(first) == 3 and len(second) == 1
  a, b, c, d = (TOK.token_to_id(ch) for ch in "abcd")
  want = ([256, a] + processor.image_token_ids((1, 2), 4, IDS) + [b]
          + processor.image_token_ids((1, 1), 4, IDS) + [c, d, 257])
  n = len(want)
  assert row["tokens"][:n].tolist() == want and (row["tokens"][n:] == 258).all()
  assert row["segment_ids"].tolist() == [1] * n + [0] * (48 - n)
  assert row["loss_mask"].tolist() == [int(t not in IDS) for t in want] + [0] * (48 - n)
  assert row["pixel_values"].dtype == ml_dtypes.bfloat16 and row["pixel_values"].shape == (4, 3, 56, 56)
  np.testing.assert_array_equal(row["pixel_values"], np.concatenate([first, second]))
  # one feature row per <|patch|>: the model's per-row fusion sees exactly its tiles
  assert (row["tokens"] == IDS.patch).sum() == 4 * 4


def test_long_record_is_cut_before_an_image_that_does_not_fit(tmp_path):
  path = _write(tmp_path, [{"text": "ab<|image|>" + "x" * 5 + "<|image|>z",
                            "images": ["im1.png", "im0.png"]}])
  with pytest.warns(UserWarning, match=r"mm\.jsonl:1: 34 tokens cut to data\.seq_len=24"):
    row = _encoder(seq_len=24)(mmdata.read_records(path)[0])
  # bos a b [image: 1 tile = 7 tokens] x*5 = 15 tokens; the 3-tile image (17 tokens) cannot fit
  assert (row["segment_ids"] == 1).sum() == 15 and (row["tokens"] == IDS.patch).sum() == 4
  assert not row["pixel_values"][1:].astype(np.float32).any()  # its tiles are dropped too


def test_bad_records_name_the_file_and_line(tmp_path):
  path = _write(tmp_path, [{"text": "one <|image|>", "images": []}])
  with pytest.raises(ValueError, match=r"mm\.jsonl:1: the text has 1 <\|image\|> placeholders but 'images' lists \[\]"):
    mmdata.read_records(path)
  path = _write(tmp_path, [{"text": "x<|image|>", "images": ["missing.png"]}])
  with pytest.raises(ValueError, match=r"mm\.jsonl:1: image 'missing\.png' is not a file"):
    mmdata.read_records(path)  # checked when the data is opened, before any step
  path = _write(tmp_path, [{"text": "<|image|><|image|>", "images": ["im0.png", "im0.png"]}])
  with pytest.raises(ValueError, match=r"mm\.jsonl:1: its images make 6 tiles but data\.row_tiles is 4"):
    _encoder()(mmdata.read_records(path)[0])
  path = _write(tmp_path, [{"text": "sneaky <|patch|>", "images": []}])
  with pytest.raises(ValueError, match="image special tokens other than"):
    _encoder()(mmdata.read_records(path)[0])


def test_tokenizer_and_model_must_agree_on_the_patch_id():
  model = run_config.ModelConfig(preset="tiny_multimodal", multimodal=True).build()
  tokenizer_lib.for_model(run_config.DataConfig(), model)  # the preset's ids are the byte tokenizer's
  import dataclasses
  with pytest.raises(ValueError, match="tokenizer's <\\|patch\\|> is id 267 but the model's image_token_index is 250"):
    tokenizer_lib.for_model(run_config.DataConfig(), dataclasses.replace(model, image_token_index=250))
  with pytest.raises(ValueError, match="model.preset='tiny' has no vision tower"):
    run_config.ModelConfig(preset="tiny", multimodal=True)


def test_colour_task_and_batches(tmp_path):
  path = tasks.write_colors(tmp_path / "colors", 12, seed=0)
  assert tasks.write_colors(tmp_path / "colors", 12, seed=0) == path  # reused
  records = mmdata.read_records(str(path))
  assert len(records) == 12 and all(r["text"].startswith("<|image|>colour: ") for r in records)
  cfg = run_config.DataConfig(paths=(str(path),), seq_len=48, batch_size=4, image_tiles=4,
                              row_tiles=5)  # the quickstart's shapes: no record is cut
  batch = next(iter(mmdata.make_dataset(cfg, cfg.paths, TOK, VISION)))
  assert batch["tokens"].shape == (4, 48) and batch["pixel_values"].shape == (4, 5, 3, 56, 56)
  for tokens, seg, mask in zip(batch["tokens"], batch["segment_ids"], batch["loss_mask"]):
    n = int(seg.sum())  # every row ends "colour: NAME" + eos, all of it a target
    assert tokens[n - 1] == 257 and TOK.decode(tokens[n - 16:n - 1].tolist()).count("colour: ")
    assert mask[n - 10:n].all()
