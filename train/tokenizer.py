"""Tokenizers: a user's `tokenizer.json` (e.g. Llama 4's) or the built-in byte-level one.

Both are HF `tokenizers.Tokenizer` objects. The built-in one maps each byte to one token and adds
the Llama 4 special tokens the stages use, so the embedded task needs no download.
"""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# Llama 4's special tokens, in the order they get ids after the 256 bytes.
SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|header_start|>",
           "<|header_end|>", "<|eot|>")
# Llama 4's image tokens (ImageTokens' fields in order); the multimodal byte tokenizer has them
# after SPECIAL, so `presets.tiny_multimodal()` ids 262..267 match it.
IMAGE_SPECIAL = ("<|image_start|>", "<|image_end|>", "<|tile_x_separator|>",
                 "<|tile_y_separator|>", "<|image|>", "<|patch|>")


def byte_tokenizer(image_tokens: bool = False) -> Tokenizer:
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(list(SPECIAL) + (list(IMAGE_SPECIAL) if image_tokens else []))
  return tok


def load(path: str | None, image_tokens: bool = False) -> Tokenizer:
  """`path`'s tokenizer.json, or the byte tokenizer (with Llama 4's image tokens when
  `image_tokens`; a tokenizer.json must have them itself)."""
  if path is None:
    return byte_tokenizer(image_tokens)
  try:
    return Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises a bare Exception for unreadable files
    raise ValueError(f"cannot load tokenizer {path}: {e}") from e


def special_id(tok: Tokenizer, token: str) -> int:
  i = tok.token_to_id(token)
  if i is None:
    raise ValueError(f"tokenizer has no {token!r} token")
  return i


def image_tokens(tok: Tokenizer):
  """The tokenizer's ids of Llama 4's image tokens, as `processor.ImageTokens`."""
  from llama4_jax.processor import ImageTokens
  return ImageTokens(*(special_id(tok, t) for t in IMAGE_SPECIAL))


def for_model(path: str | None, model_cfg) -> Tokenizer:
  """`load` for a run of `model_cfg` (image tokens for a multimodal one), checked against it:
  no id past the model's vocabulary, `<|patch|>` at the model's image token index."""
  tok = load(path, image_tokens=model_cfg.vision is not None)
  if tok.get_vocab_size() > model_cfg.text.vocab_size:
    raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens but model.text.vocab_size is "
                     f"{model_cfg.text.vocab_size}")
  if model_cfg.vision is not None:
    patch = image_tokens(tok).patch
    if patch != model_cfg.image_token_index:
      raise ValueError(f"the tokenizer's <|patch|> is id {patch} but the model's "
                       f"image_token_index is {model_cfg.image_token_index}")
  return tok
