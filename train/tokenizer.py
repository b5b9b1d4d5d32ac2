"""Tokenizers. Every one is a HF `tokenizers.Tokenizer`:

- Meta's `tokenizer.model` (the tiktoken BPE ranks shipped with the Llama 4 release and in
  `llama_models/llama4/`), converted in memory: byte-level BPE with Meta's O200K split pattern,
  whole pieces looked up first as tiktoken does (`ignore_merges`), and Meta's 2,048 special tokens
  in id order (200000..202047). `llama4-convert tokenizer` saves it as a HF tokenizer.json;
- a HF `tokenizer.json` (or a directory holding one);
- the built-in byte tokenizer (256 bytes + the Llama 4 special tokens the stages use, ids 256..268),
  so the embedded tasks need no download. `presets.tiny()` uses its ids.

The stages read special ids by name (`specials`, `image_tokens`), never by number. Text in the data
that spells a special token (`<|eot|>`) is encoded as plain text, as Meta's tokenizer does by
default; `data.special_tokens_in_text: true` makes it the control token instead.
"""
import base64
import functools
from pathlib import Path
from typing import NamedTuple

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# Meta's split pattern (llama_models/llama4/tokenizer.py, Tokenizer.O200K_PATTERN).
O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL = 2048


class Specials(NamedTuple):
  """Ids of the special tokens the stages write (chat turns, documents, padding)."""
  begin: int
  end: int
  pad: int
  header_start: int
  header_end: int
  eot: int
  eom: int


NAMES = Specials("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad|>",
                 "<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>")
# processor.ImageTokens' fields, in order.
IMAGE_NAMES = ("<|image_start|>", "<|image_end|>", "<|tile_x_separator|>", "<|tile_y_separator|>",
               "<|image|>", "<|patch|>")


def _reserved(kind: str, count: int, start: int = 0) -> list[str]:
  return [f"<|{kind}_reserved_special_token_{i}|>" for i in range(start, start + count)]


def llama4_special_tokens() -> list[str]:
  """Meta's special tokens in id order from 200000 (llama_models/llama4/tokenizer.py: basic,
  text post-train, vision and reasoning tokens, then reserved ones up to 2,048)."""
  names = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>",
           "<|fim_suffix|>", "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>",
           *_reserved("text_post_train", 6), "<|python_start|>", "<|python_end|>",
           "<|finetune_right_pad|>", *_reserved("text_post_train", 61, 8),
           "<|image_start|>", "<|image_end|>", *_reserved("vision", 2), "<|tile_x_separator|>",
           "<|tile_y_separator|>", *_reserved("vision", 4, 2), "<|image|>",
           *_reserved("vision", 1, 6), "<|patch|>", *_reserved("vision", 1041, 7),
           *_reserved("reasoning", 8), "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
  return names + [f"<|reserved_special_token_{i}|>" for i in range(NUM_SPECIAL - len(names))]


def _byte_level(vocab: dict[str, int], merges: list, specials: list[str],
                pattern: str | None) -> Tokenizer:
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.pre_tokenizer = byte_level if pattern is None else pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
  return tok


def byte_tokenizer() -> Tokenizer:
  """One token per byte, then the stages' specials and Llama 4's image tokens (ids 256..268:
  the text specials, the six image tokens, and `<|eom|>` last)."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  return _byte_level({ch: i for i, ch in enumerate(alphabet)}, [],
                     [*NAMES[:6], *IMAGE_NAMES, NAMES.eom], None)


def _bpe_parts(ranks: dict[bytes, int], token: bytes) -> list[bytes]:
  """`token` split as BPE does with only the merges ranked below it: its last merge's halves."""
  parts, limit = [bytes([b]) for b in token], ranks[token]
  while len(parts) > 2:
    pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
    rank, i = min(pairs)
    if rank >= limit:
      break
    parts[i:i + 2] = [parts[i] + parts[i + 1]]
  return parts


@functools.lru_cache(maxsize=2)
def _tiktoken_json(path: str, mtime: float) -> str:
  """Meta's tiktoken BPE file as a HF tokenizer.json string (cached: the merges take seconds)."""
  ranks = {}
  for n, line in enumerate(Path(path).read_text().splitlines(), 1):
    try:
      piece, rank = line.split()
      ranks[base64.b64decode(piece, validate=True)] = int(rank)
    except ValueError as e:
      raise ValueError(f"{path}:{n}: not a tiktoken BPE line 'BASE64 RANK' ({e})") from e
  char = _byte_chars()
  text = {tok: "".join(char[b] for b in tok) for tok in ranks}
  merges = sorted((ranks[t], text[a], text[b]) for t in ranks if len(t) > 1
                  for a, b in [_bpe_parts(ranks, t)])
  vocab = {text[t]: r for t, r in ranks.items()}
  return _byte_level(vocab, [(a, b) for _, a, b in merges], llama4_special_tokens(),
                     O200K_PATTERN).to_str()


def _byte_chars() -> dict[int, str]:
  """GPT-2's byte-level alphabet (HF's ByteLevel): printable bytes stand for themselves, the
  others for chr(256 + k) in byte order."""
  printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
  others = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


def load(path: str | None) -> Tokenizer:
  """The tokenizer at `path` (Meta's tokenizer.model, a tokenizer.json, or a directory holding
  one), or the byte tokenizer when `path` is None."""
  if path is None:
    return byte_tokenizer()
  p = Path(path)
  if p.is_dir():
    found = [p / n for n in ("tokenizer.json", "tokenizer.model") if (p / n).is_file()]
    if not found:
      raise ValueError(f"tokenizer {path}: directory holds neither tokenizer.json nor tokenizer.model")
    p = found[0]
  if not p.is_file():
    raise ValueError(f"tokenizer {path}: no such file")
  with open(p, "rb") as f:
    head = f.read(64).lstrip()
  if head.startswith(b"{"):
    try:
      return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for unreadable files
      raise ValueError(f"tokenizer {path}: not a HF tokenizer.json ({e})") from e
  if not head or b"\0" in head:
    raise ValueError(f"tokenizer {path}: neither a HF tokenizer.json nor a tiktoken BPE file")
  return Tokenizer.from_str(_tiktoken_json(str(p.resolve()), p.stat().st_mtime))


def special_id(tok: Tokenizer, token: str) -> int:
  i = tok.token_to_id(token)
  if i is None:
    raise ValueError(f"tokenizer has no {token!r} token")
  return i


def specials(tok: Tokenizer) -> Specials:
  return Specials(*(special_id(tok, n) for n in NAMES))


def image_tokens(tok: Tokenizer):
  """The tokenizer's ids of Llama 4's image tokens, as `processor.ImageTokens`."""
  from llama4_jax.processor import ImageTokens
  return ImageTokens(*(special_id(tok, t) for t in IMAGE_NAMES))


def for_model(data_cfg, model_cfg) -> Tokenizer:
  """`load(data_cfg.tokenizer)` for a run of `model_cfg`, checked against it (no id past the
  vocabulary; `<|patch|>` at the model's image token index), with special-token text in the data
  encoded as `data_cfg.special_tokens_in_text` says."""
  tok = load(data_cfg.tokenizer)
  if tok.get_vocab_size() > model_cfg.text.vocab_size:
    raise ValueError(f"data.tokenizer has {tok.get_vocab_size()} tokens but model.text.vocab_size "
                     f"is {model_cfg.text.vocab_size}")
  specials(tok)
  if model_cfg.vision is not None:
    patch = image_tokens(tok).patch
    if patch != model_cfg.image_token_index:
      raise ValueError(f"the tokenizer's <|patch|> is id {patch} but the model's "
                       f"image_token_index is {model_cfg.image_token_index}")
  tok.encode_special_tokens = not data_cfg.special_tokens_in_text
  return tok
