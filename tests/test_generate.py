"""`llama4-generate`: greedy decoding equals the argmax of the full forward (text, chat, image
prompts), a JSONL batch of mixed lengths equals one prompt at a time, every checkpoint form loads,
the single-prompt stream prints the same text, and bad input is one line."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import llama4_jax as l4
from train import chat, convert, generate, tokenizer as tokenizer_lib

TOK = tokenizer_lib.byte_tokenizer()
forward = jax.jit(l4.forward, static_argnums=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  out = {}
  for name, cfg in (("text", l4.presets.tiny()), ("multimodal", l4.presets.tiny_multimodal())):
    path = tmp_path_factory.mktemp(name)
    params = l4.init_params(cfg, jax.random.key(1), jnp.float32)
    params = jax.tree.map(lambda w: w * 20 if w.ndim > 1 else w, params)  # peaked, stable argmax
    l4.save_hf(path, cfg, params)
    chat.save_tokenizer(TOK, path)
    out[name] = path
  return out


def _greedy_reference(cfg, params, ids, tokens, pixels=None, width=64):
  """What argmax of the full forward gives, one token at a time, for as many tokens (rows padded
  on the right to one width: causal, so the last real position is unaffected; one compile)."""
  ids = list(ids)
  for _ in tokens:
    row = np.zeros((1, width), np.int32)
    row[0, :len(ids)] = ids
    logits = forward(cfg, params, jnp.asarray(row), None,
                     None if pixels is None else jnp.asarray(pixels))
    ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
  return ids[len(ids) - len(tokens):]


@pytest.mark.parametrize("record", [
    {"prompt": "12+7="},
    {"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": "3+4="}]},
], ids=["text", "chat"])
def test_greedy_equals_argmax_of_the_full_forward(models, record):
  cfg, params, tok_path = generate.load(str(models["text"]))
  tok = tokenizer_lib.load(tok_path)
  ids, pixels = generate.encode(record, tok, cfg, "test")
  gen = generate.Generator(cfg, params, tok, 8, 0.0, 1.0)
  (got,) = gen([ids], [pixels], jax.random.key(0))
  assert got and got == _greedy_reference(cfg, params, ids, got)


def test_image_prompt_greedy_equals_the_full_forward(models, tmp_path):
  Image.fromarray(np.full((40, 90, 3), 120, np.uint8)).save(tmp_path / "im.png")
  cfg, params, _ = generate.load(str(models["multimodal"]))
  record = {"prompt": "a <|image|> is", "images": [str(tmp_path / "im.png")]}
  ids, pixels = generate.encode(record, TOK, cfg, "test")
  assert pixels.shape[0] == 3  # two tiles and the global one
  (got,) = generate.Generator(cfg, params, TOK, 6, 0.0, 1.0)([ids], [pixels], jax.random.key(0))
  assert got == _greedy_reference(cfg, params, ids, got, pixels)


@pytest.mark.slow
def test_jsonl_batch_equals_one_at_a_time_and_the_stream(models, tmp_path, capsys):
  prompts = ["1+1=", "a much longer prompt about 123+456=", "x", "hello there, 9*9="]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
  src = str(models["text"])
  base = [src, "--jsonl", str(tmp_path / "in.jsonl"), "--max-new-tokens", "6"]
  assert generate.main([*base, "--out", str(tmp_path / "batch.jsonl")]) == 0
  assert generate.main([*base, "--out", str(tmp_path / "one.jsonl"), "--batch-size", "1"]) == 0
  batch, one = ([json.loads(l) for l in (tmp_path / f).read_text().splitlines()]
                for f in ("batch.jsonl", "one.jsonl"))
  assert len(batch) == 4 and batch == one
  capsys.readouterr()
  # a converted checkpoint generates the same, and --prompt streams the same text
  convert.hf_to_orbax(src, tmp_path / "ckpt", progress=False)
  assert generate.main([str(tmp_path / "ckpt"), "--prompt", prompts[1], "--max-new-tokens", "6"]) == 0
  assert capsys.readouterr().out.endswith(batch[1]["completion"] + "\n")
  assert generate.main([src, "--prompt", prompts[1], "--max-new-tokens", "6", "--int4", "8"]) == 0
  assert capsys.readouterr().out.strip()  # int4 weights generate too (tests/test_quant.py: how close)


def test_bad_input_is_one_line(models, tmp_path, capsys):
  (tmp_path / "im.png").write_bytes(b"")
  cases = [([str(tmp_path / "nowhere"), "--prompt", "x"], "no such checkpoint directory"),
           ([str(models["text"]), "--prompt", "<|image|>", "--image", str(tmp_path / "im.png")],
            "has images but the model has no vision tower"),
           ([str(models["text"]), "--prompt", "x" * 600],
            "a prompt of 601 tokens \\+ --max-new-tokens 128 exceeds the model's 512 positions")]
  for argv, msg in cases:
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(msg, err), err
