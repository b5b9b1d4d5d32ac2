"""`llama4-generate SRC (--prompt TEXT | --chat MESSAGES.json | --jsonl IN.jsonl --out OUT.jsonl)
[--image PATH ...] [--tokenizer PATH] [--max-new-tokens N] [--temperature T] [--top-p P]
[--int4 [GROUP] | --fp8] [--mesh AXIS=N,...]`: text from a model.

SRC is a HF directory, a converted checkpoint (`llama4-convert hf-to-orbax`'s CKPT_DIR) or a
training step WORKDIR/checkpoints/STEP (a LoRA run's adapters merged into its base). The tokenizer
is `--tokenizer`, else the one stored beside SRC (tokenizer.json or Meta's tokenizer.model), else
the training run's `data.tokenizer`, else the built-in byte tokenizer.

`--prompt` is raw text after `<|begin_of_text|>` (`<|image|>` marks where each `--image` goes);
`--chat` a JSON list of messages, rendered in the Llama 4 chat format with an open assistant turn.
A JSONL record is `{"prompt": str}` or `{"messages": [...]}`, with optional `"images": [paths]`;
OUT gets `{"completion", "tokens"}` per record, in order. Rows are left-padded to a common length
in batches of `--batch-size`; a single prompt streams its text to the terminal. Each row stops at
`<|eot|>`, `<|eom|>` or `<|end_of_text|>`. Temperature 0 (the default) is greedy.
"""
import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import llama4_jax as l4
import sharding
from llama4_jax import processor
from train import chat, cli, config as config_lib, params as params_lib, tokenizer as tokenizer_lib


def load(src: str, dtype=jnp.float32, keep_fp8: bool = False) -> tuple[l4.Config, dict, str | None]:
  """(model config, params on one device, the tokenizer stored with it or None) of SRC. An FP8
  HF directory's experts stay FP8 with `keep_fp8`, else dequantize to `dtype`; a CKPT_DIR made
  with `--keep-fp8` keeps them always."""
  path = Path(src)
  if not path.is_dir():
    raise FileNotFoundError(f"{src}: no such checkpoint directory")
  beside = next((str(path / n) for n in ("tokenizer.json", "tokenizer.model")
                 if (path / n).is_file()), None)
  if (path / "config.json").is_file() and not (path / "params").is_dir():
    cfg, params = l4.load_hf(path, dtype=dtype, keep_fp8=keep_fp8)
    return cfg, params, beside
  if (path / "config.json").is_file():
    cfg = l4.config.from_hf(json.loads((path / "config.json").read_text()))
  elif (path.parent / "run.json").is_file():
    run = config_lib.from_dict(config_lib.RunConfig, json.loads((path.parent / "run.json").read_text()))
    cfg, beside = run.model.build(), beside or run.data.tokenizer
  else:
    raise FileNotFoundError(f"{src}: neither a HF directory, a converted checkpoint nor a "
                            f"training step (WORKDIR/checkpoints/STEP)")
  return cfg, params_lib.restore_params(path, cfg, sharding.one_device(), dtype), beside


def encode(record: dict, tok, cfg: l4.Config, where: str) -> tuple[list[int], np.ndarray | None]:
  """A record's prompt ids (images expanded) and its image tiles [N, 3, S, S] or None."""
  images = record.get("images") or []
  if images and cfg.vision is None:
    raise ValueError(f"{where}: has images but the model has no vision tower")
  if "messages" in record:
    messages = chat.check_record({"messages": record["messages"] + [
        {"role": "assistant", "content": "-"}]}, where)[:-1]
    ids = chat.Renderer(tok, 1 << 30).prompt(messages)
  elif isinstance(record.get("prompt"), str):
    ids = [tokenizer_lib.specials(tok).begin, *tok.encode(record["prompt"],
                                                           add_special_tokens=False).ids]
  else:
    raise ValueError(f"{where}: expected {{'prompt': str}} or {{'messages': [...]}}")
  if not images:
    return ids, None
  v = cfg.vision
  ids, pixels = processor.prepare(ids, images, tile=v.image_size, tokens_per_tile=v.tokens_per_tile,
                                  ids=tokenizer_lib.image_tokens(tok))
  return list(ids), pixels


def bucket(n: int) -> int:
  """The padded length for `n` tokens: a power of two, at least 16, so few shapes compile."""
  return max(16, 1 << (n - 1).bit_length())


# compiled once per model, batch shape and sampling settings, shared by every Generator
_generate = jax.jit(l4.generate, static_argnums=(0, 5, 6, 7, 8, 10))


class Generator:
  """Left-pads prompts into one batch (to a power-of-two width, so few shapes compile) and runs
  `l4.generate`."""

  def __init__(self, cfg: l4.Config, params, tok, max_new: int, temperature: float, top_p: float):
    self.cfg, self.params, self.tok, self.max_new = cfg, params, tok, max_new
    s = tokenizer_lib.specials(tok)
    self.stops = (s.eot, s.eom, s.end)
    self.temperature, self.top_p = temperature, top_p

  def __call__(self, prompts: list[list[int]], pixels: list, key, on_token=None
               ) -> list[list[int]]:
    longest, positions = max(len(p) for p in prompts), self.cfg.text.max_position_embeddings
    if longest + self.max_new > positions:
      raise ValueError(f"a prompt of {longest} tokens + --max-new-tokens {self.max_new} exceeds "
                       f"the model's {positions} positions")
    width = min(bucket(longest), positions - self.max_new)
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
      ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    tiles = [t for t in pixels if t is not None]
    pv = jnp.asarray(np.concatenate(tiles)) if tiles else None
    toks, live = _generate(self.cfg, self.params, jnp.asarray(ids), jnp.asarray(mask), key,
                          self.max_new, self.temperature, self.top_p, self.stops, pv, on_token)
    return [[int(t) for t, l in zip(row, alive) if l and t not in self.stops]
            for row, alive in zip(np.asarray(toks), np.asarray(live))]


class Stream:
  """`on_token` for one row: prints the text as it grows."""

  def __init__(self, tok, stops):
    self.tok, self.stops, self.ids, self.shown = tok, stops, [], ""

  def __call__(self, tokens, live):
    if live[0] and int(tokens[0]) not in self.stops:
      self.ids.append(int(tokens[0]))
      text = self.tok.decode(self.ids)
      print(text[len(self.shown):], end="", flush=True)
      self.shown = text


def _records(args) -> list[dict]:
  if args.prompt is not None:
    return [{"prompt": args.prompt, "images": args.image}]
  if args.chat is not None:
    messages = json.loads(Path(args.chat).read_text())
    return [{"messages": messages, "images": args.image}]
  from train import data
  return data.read_jsonl(args.jsonl, lambda r, where: {**r, "where": where} if isinstance(r, dict)
                         else _bad(where))


def _bad(where: str):
  raise ValueError(f"{where}: expected a JSON object with 'prompt' or 'messages'")


def place(cfg: l4.Config, params, mesh_arg: str | None, int4: int | None, fp8: bool):
  """Params quantized as asked (int4, or fp8 experts unless already FP8) and placed by the rules
  table on `--mesh` (default: one device)."""
  if int4:
    params = jax.jit(lambda p: l4.quantize(p, "int4", int4, "--int4"))(params)
  if fp8 and not l4.quant.has_quantized(params):
    params = jax.jit(lambda p: l4.quantize(p, "fp8"))(params)
  if mesh_arg is None:
    return params
  mesh = sharding.make_mesh(sharding.MeshConfig(**parse_mesh(mesh_arg)))
  return jax.device_put(params, sharding.tree_shardings(params, cfg, mesh))


def parse_mesh(text: str) -> dict[str, int]:
  """`fsdp=2,tensor=4` -> {"fsdp": 2, "tensor": 4}; a one-line error names a bad entry."""
  out = {}
  for item in text.split(","):
    name, _, size = item.partition("=")
    if name.strip() not in sharding.AXES or not size.strip().lstrip("-").isdigit():
      raise ValueError(f"--mesh {text!r}: bad entry {item!r}; expected AXIS=SIZE with AXIS in "
                       f"{list(sharding.AXES)}")
    out[name.strip()] = int(size)
  return out


def generate(args) -> int:
  cfg, params, beside = load(args.src, jnp.bfloat16 if args.int4 or args.fp8 else jnp.float32,
                             keep_fp8=args.fp8)
  params = place(cfg, params, args.mesh, args.int4, args.fp8)
  tok = tokenizer_lib.load(args.tokenizer or beside)
  records = _records(args)
  encoded = [encode(r, tok, cfg, r.get("where", "the prompt")) for r in records]
  gen = Generator(cfg, params, tok, args.max_new_tokens, args.temperature, args.top_p)
  key = jax.random.key(args.seed)
  if args.jsonl is None:
    (ids, pixels), = encoded
    gen([ids], [pixels], key, Stream(tok, gen.stops))
    print()
    return 0
  out = []
  for start in range(0, len(encoded), args.batch_size):
    chunk = encoded[start:start + args.batch_size]
    rows = gen([e[0] for e in chunk], [e[1] for e in chunk], jax.random.fold_in(key, start))
    out += [{"completion": tok.decode(r), "tokens": r} for r in rows]
  from llama4_jax import hf_io
  with hf_io.atomic_file(Path(args.out)) as f:
    f.writelines(json.dumps(o) + "\n" for o in out)
  print(args.out)
  return 0


def main(argv=None) -> int:
  parser = cli.Parser(prog="llama4-generate", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
  what = parser.add_mutually_exclusive_group(required=True)
  for flag, text in (("--prompt", "raw text (streamed to the terminal)"),
                     ("--chat", "a JSON file holding a list of messages"),
                     ("--jsonl", "records {prompt | messages, images?}, one per line")):
    what.add_argument(flag, help=text)
  parser.add_argument("src", help="HF directory, CKPT_DIR or WORKDIR/checkpoints/STEP")
  parser.add_argument("--out", help="with --jsonl: where the completions go (JSONL)")
  parser.add_argument("--image", action="append", default=[], help="an image for --prompt/--chat")
  parser.add_argument("--tokenizer", help="default: stored with SRC, else the byte tokenizer")
  parser.add_argument("--max-new-tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.0)
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--int4", type=int, nargs="?", const=64, metavar="GROUP",
                      help="block matrices as int4 in groups of GROUP (default 64), dequantized "
                           "one layer at a time")
  parser.add_argument("--fp8", action="store_true",
                      help="routed experts in FP8 (kept from an FP8 checkpoint, else quantized per "
                           "channel), dequantized one layer at a time")
  parser.add_argument("--mesh", metavar="AXIS=N,...",
                      help="shard the params over local devices by the rules table, e.g. "
                           "fsdp=2,tensor=4 (default: one device)")
  cli.add_debug(parser)
  args = parser.parse_args(argv)
  if (args.jsonl is None) != (args.out is None):
    parser.error("--out goes with --jsonl (and --jsonl needs --out)")
  if args.int4 and args.fp8:
    parser.error("--int4 and --fp8: choose one quantization")
  for name, ok in (("max_new_tokens", args.max_new_tokens >= 1), ("batch_size", args.batch_size >= 1),
                   ("temperature", args.temperature >= 0), ("top_p", 0 < args.top_p <= 1)):
    if not ok:
      parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is out of range")
  return cli.run("llama4-generate", lambda: generate(args), args.debug)


if __name__ == "__main__":
  sys.exit(main())
