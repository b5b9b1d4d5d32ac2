"""The real Llama 4 tokenizer and chat format against Meta's own (the `llama-models` package:
llama_models/llama4/tokenizer.py over tiktoken, and chat_format.py), offline: ids in the model
card's 12 languages, code and special tokens; the HF files `llama4-convert tokenizer` writes, as
transformers loads them; our chat renderer and its loss mask; the image-text data path."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from meta_reference import RawMessage, Size, StopReason, VisionArgs, chat_format
from meta_reference import Tokenizer as MetaTokenizer

import llama4_jax as l4
from llama4_jax import processor
from train import chat, convert, data, mmdata, tokenizer as tokenizer_lib
from train.config import DataConfig

META_MODEL = str(Path(chat_format.__file__).parent / "tokenizer.model")
TEXTS = {  # the model card's 12 languages, code, whitespace, and special-token spellings
    "english": "The quick brown fox jumps over the lazy dog. It's 3.14159!",
    "arabic": "مرحبا بالعالم، كيف حالك اليوم؟",
    "french": "Où est la bibliothèque ? Je n'en sais rien, désolé.",
    "german": "Größenordnung: Übermäßig schöne Straßenbahnhaltestelle.",
    "hindi": "नमस्ते दुनिया, आप कैसे हैं?",
    "indonesian": "Selamat pagi, apa kabar hari ini?",
    "italian": "Perché l'università è chiusa oggi?",
    "portuguese": "Olá, você está bem? Não, obrigado.",
    "spanish": "¿Qué tal? ¡Mañana será otro día!",
    "tagalog": "Magandang umaga po, kumusta kayo?",
    "thai": "สวัสดีครับ วันนี้อากาศดีมาก",
    "vietnamese": "Xin chào, bạn có khỏe không? Tiếng Việt rất hay.",
    "code": "def f(x: int) -> int:\n    return x ** 2  # 12345678\n\n\tif a != b: {}\n",
    "whitespace": "  leading\n\n\n  trailing   \r\n\t \u00a0end  ",
    "specials": "a<|eot|>b<|header_start|>user<|header_end|><|begin_of_text|><|image|>",
}
DIALOGS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2="},
     {"role": "assistant", "content": " 4 "}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "What is the weather in Paris?"},
     {"role": "assistant", "content": "get_weather(city='Paris')"},
     {"role": "tool", "content": '{"temp": 21}'}, {"role": "assistant", "content": "21 °C."},
     {"role": "user", "content": "Merci ! <|eot|> ça marche"}],
]


@pytest.fixture(scope="module")
def ours():
  return tokenizer_lib.for_model(DataConfig(tokenizer=META_MODEL), l4.presets.scout())


@pytest.fixture(scope="module")
def meta():
  return MetaTokenizer.get_instance()


def _meta_messages(dialog):
  return [RawMessage(role=m["role"], content=m["content"],
                     stop_reason=StopReason.end_of_turn if m["role"] == "assistant" else None)
          for m in dialog]


def test_special_token_table_is_metas(ours, meta):
  assert meta.special_tokens == {t: 200000 + i for i, t in
                                 enumerate(tokenizer_lib.llama4_special_tokens())}
  assert ours.get_vocab_size() == meta.n_words == 202048
  assert tokenizer_lib.specials(ours) == (meta.bos_id, meta.eos_id, meta.pad_id,
                                          200005, 200006, meta.eot_id, meta.eom_id)
  assert tuple(tokenizer_lib.image_tokens(ours)) == tuple(processor.ImageTokens())


@pytest.mark.parametrize("name", TEXTS)
def test_ids_equal_metas(ours, meta, name):
  text = TEXTS[name]
  ids = ours.encode(text, add_special_tokens=False).ids
  assert ids == meta.encode(text, bos=False, eos=False)  # special-token text is plain text
  assert ours.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_in_text_switch(meta, tmp_path):
  text = TEXTS["specials"]
  tok = tokenizer_lib.for_model(DataConfig(tokenizer=META_MODEL, special_tokens_in_text=True),
                                l4.presets.scout())
  assert tok.encode(text, add_special_tokens=False).ids == meta.encode(
      text, bos=False, eos=False, allowed_special="all")
  # through the pretraining data path: plain text by default, control tokens when switched on
  path = tmp_path / "a.jsonl"
  path.write_text(json.dumps({"text": text}) + "\n")
  cfg = DataConfig(paths=(str(path),), seq_len=64, batch_size=1, tokenizer=META_MODEL)
  plain = tokenizer_lib.for_model(cfg, l4.presets.scout())
  rows = [next(iter(data.make_dataset(cfg, cfg.paths, t)))["tokens"][0] for t in (plain, tok)]
  assert meta.eot_id not in rows[0] and meta.eot_id in rows[1]


def test_renderer_equals_encode_dialog_prompt_and_masks_assistant_turns(ours, meta):
  fmt, render = chat_format.ChatFormat(meta), chat.Renderer(ours, 512)
  header = render.header("assistant")
  for dialog in DIALOGS:
    want = fmt.encode_dialog_prompt(_meta_messages(dialog)).tokens
    assert render.prompt(dialog) == want
    row = render(dialog)
    assert row["tokens"].tolist() == want[:-len(header)]
    # the mask covers exactly each assistant turn's content and its <|eot|>
    trained, expected = [], []
    for m in dialog:
      if m["role"] == "assistant":
        expected += fmt.encode_message(_meta_messages([m])[0], None)[0][len(header):]
    trained = [t for t, k in zip(row["tokens"].tolist(), row["loss_mask"].tolist()) if k]
    assert trained == expected


def test_exported_files_load_in_transformers(ours, meta, tmp_path):
  assert convert.main(["tokenizer", META_MODEL, str(tmp_path / "tok")]) == 0
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
  for text in TEXTS.values():
    if "<|" not in text:  # HF parses special-token text as control tokens (see chat.py)
      assert hf(text, add_special_tokens=False)["input_ids"] == meta.encode(text, bos=False, eos=False)
  fmt = chat_format.ChatFormat(meta)
  for dialog in DIALOGS[:2]:
    got = hf.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if hasattr(got, "keys") else got
    assert list(got) == fmt.encode_dialog_prompt(_meta_messages(dialog)).tokens
  assert tokenizer_lib.load(str(tmp_path / "tok")).encode("Olá").ids == ours.encode("Olá").ids


@pytest.mark.parametrize("aspect", [(1, 1), (2, 3), (3, 1)])
def test_image_expansion_equals_metas(ours, meta, aspect):
  args = VisionArgs(image_size=Size(height=336, width=336), patch_size=Size(height=14, width=14),
                    dim=1408, n_layers=1, n_heads=16, mlp_ratio=4.0, output_dim=4096,
                    pixel_shuffle_ratio=0.5)
  tiles = aspect[0] * aspect[1] + (aspect != (1, 1))
  image = chat_format.TransformedImage(torch.zeros(tiles, 3, 336, 336), aspect)
  fmt = chat_format.ChatFormat(meta)  # with vision_args it would build torchvision transforms
  fmt.vision_args = args
  want = fmt._encode_image(image)
  assert processor.image_token_ids(aspect, 144, tokenizer_lib.image_tokens(ours)) == want


def test_image_text_rows_with_the_real_tokenizer(ours, tmp_path):
  from PIL import Image
  Image.fromarray(np.full((30, 60, 3), 90, np.uint8)).save(tmp_path / "im.png")
  (tmp_path / "mm.jsonl").write_text(json.dumps({"text": "A <|image|> grey box.",
                                                 "images": ["im.png"]}) + "\n")
  vision = l4.presets.tiny_vision()
  cfg = DataConfig(paths=(str(tmp_path / "mm.jsonl"),), seq_len=40, batch_size=1, row_tiles=3,
                   image_tiles=2)
  row = mmdata.Encoder(ours, vision, cfg)(mmdata.read_records(cfg.paths[0])[0])
  ids = tokenizer_lib.image_tokens(ours)
  image = processor.image_token_ids((1, 2), vision.tokens_per_tile, ids)
  want = [200000, *ours.encode("A ").ids, *image, *ours.encode(" grey box.").ids, 200001]
  assert row["tokens"][:len(want)].tolist() == want
  assert (row["tokens"][len(want):] == 200018).all()  # <|finetune_right_pad|>
  assert row["loss_mask"].sum() == len(want) - len(image)


@pytest.mark.parametrize("content,msg", [
    (b"\x89PNG\r\n\x1a\n\0\0", "neither a HF tokenizer.json nor a tiktoken BPE file"),
    (b"", "neither a HF tokenizer.json nor a tiktoken BPE file"),
    (b"aGVsbG8= 0\nnot-base64!! 1\n", r"bad.model:2: not a tiktoken BPE line"),
    (b'{"version": "1.0", "model": 3}', "not a HF tokenizer.json"),
])
def test_a_tokenizer_file_of_the_wrong_kind_is_named(tmp_path, content, msg):
  path = tmp_path / "bad.model"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=msg):
    tokenizer_lib.load(str(path))


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_real_tokenizer_quickstart_trains_as_sft_and_exports_its_tokenizer(tmp_path):
  """configs/quickstart_llama4_tokenizer.yaml, a few steps, as SFT in Meta's chat format (the
  image-text recipe's rows are checked above; `test_recipes` builds its model)."""
  from train import config as config_lib, loop
  cfg = config_lib.load(ROOT / "configs" / "quickstart_llama4_tokenizer.yaml", (
      f"workdir={tmp_path}", f"data.tokenizer={META_MODEL}", "steps=3", "log_every=1",
      "data.batch_size=8", "report=false", "checkpoint.every=3", "data.chat=true",
      "data.seq_len=32"))
  loop.run(cfg)
  losses = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(losses) == 3 and abs(losses[0] - np.log(202048)) < 0.5 and losses[-1] < losses[0]
  # the export of a step carries the run's tokenizer, chat template included
  convert.orbax_to_hf(tmp_path / "checkpoints" / "3", tmp_path / "hf", progress=False)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  assert hf("Olá", add_special_tokens=False)["input_ids"] == MetaTokenizer.get_instance().encode(
      "Olá", bos=False, eos=False) and hf.chat_template == chat.HF_CHAT_TEMPLATE
