"""The Llama 4 chat format (one renderer for SFT, DPO, RL prompts and generation) and SFT data:
loss on assistant tokens only, conversations packed into rows with segment ids.

A record is `{"messages": [{"role": "system" | "user" | "assistant" | "ipython" | "tool",
"content": str}, ...]}`, rendered token for token as Meta's `ChatFormat.encode_dialog_prompt`
(llama_models/llama4/chat_format.py):

  <|begin_of_text|><|header_start|>user<|header_end|>\\n\\n{content}<|eot|><|header_start|>assistant...

Content is kept as written (no trimming). A tool result ("ipython", or "tool" as Meta's Role
names it) has the header `ipython` and ends with `<|eom|>`; every other turn ends with `<|eot|>`.
`loss_mask` is 1 on each assistant turn's content and its end token (the model learns to answer
and to stop), 0 on the begin token, every header and every other role's turn. A conversation
longer than `data.seq_len` is an error naming its file:line, never silently cut.
"""
import json
from pathlib import Path

import grain
import numpy as np

from train import data, tokenizer as tokenizer_lib
from train.config import DataConfig

ROLES = ("system", "user", "assistant", "ipython", "tool")


def check_record(record, where: str) -> list[dict]:
  """The record's messages, or a ValueError naming `where` and what is wrong."""
  messages = record.get("messages") if isinstance(record, dict) else None
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: expected {{'messages': [{{'role', 'content'}}, ...]}}")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
      raise ValueError(f"{where}: message {i} must have a role in {ROLES} and a string content, "
                       f"got {m!r}")
  if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
    raise ValueError(f"{where}: no assistant turn with content: nothing to train on")
  return messages


def prompt_messages(prompt, where: str) -> list:
  """A record's `prompt`: a string (one user turn) or a list of messages."""
  if isinstance(prompt, str):
    return [{"role": "user", "content": prompt}]
  if not isinstance(prompt, list):
    raise ValueError(f"{where}: 'prompt' must be a string or a list of messages, got {prompt!r:.60}")
  return prompt


def read_records(path: str) -> list[dict]:
  """{"messages", "where"} per line of `path`, checked."""
  return data.read_jsonl(path, lambda r, where: {"messages": check_record(r, where), "where": where})


class Renderer:
  """messages -> {"tokens", "loss_mask"} int32 [<= seq_len], in Meta's chat format."""

  def __init__(self, tok, seq_len: int):
    self.tok, self.seq_len, self.ids = tok, seq_len, tokenizer_lib.specials(tok)
    self.eot = self.ids.eot

  def _encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def header(self, role: str) -> list[int]:
    return [self.ids.header_start, *self._encode("ipython" if role == "tool" else role),
            self.ids.header_end, *self._encode("\n\n")]

  def turn(self, message: dict) -> list[int]:
    """A message's content and end token (`<|eom|>` for a tool result, else `<|eot|>`)."""
    end = self.ids.eom if message["role"] in ("ipython", "tool") else self.ids.eot
    return [*self._encode(message["content"]), end]

  def prompt(self, messages: list[dict]) -> list[int]:
    """The conversation followed by an open assistant header: what a policy continues
    (`encode_dialog_prompt`)."""
    return [self.ids.begin, *(t for m in messages for t in self.header(m["role"]) + self.turn(m)),
            *self.header("assistant")]

  def __call__(self, messages: list[dict], where: str = "a conversation") -> dict:
    ids, mask = [self.ids.begin], [0]
    for m in messages:
      head, body = self.header(m["role"]), self.turn(m)
      ids += head + body
      mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
    if len(ids) > self.seq_len:
      raise ValueError(f"{where}: renders to {len(ids)} tokens, more than data.seq_len="
                       f"{self.seq_len}")
    return {"tokens": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)}


# The same format as a HF chat template (transformers' `apply_chat_template`). HF tokenizes the
# rendered string, so a content that starts with a newline merges with the header's "\\n\\n" and
# special-token text in content becomes the control token; `Renderer` follows Meta in both.
HF_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- set role = 'ipython' if m['role'] in ['tool', 'ipython'] else m['role'] %}"
    "{{- '<|header_start|>' + role + '<|header_end|>\\n\\n' + m['content'] }}"
    "{{- '<|eom|>' if role == 'ipython' else '<|eot|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}")


def save_tokenizer(tok, out_dir: Path) -> None:
  """`tok` as HF files (tokenizer.json, tokenizer_config.json with the chat template) that
  `transformers.AutoTokenizer.from_pretrained(out_dir)` loads."""
  names = tokenizer_lib.NAMES
  tok.save(str(out_dir / "tokenizer.json"))
  (out_dir / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names.begin,
      "eos_token": names.eot, "pad_token": names.pad, "chat_template": HF_CHAT_TEMPLATE,
      "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"]},
      indent=2))


def make_dataset(cfg: DataConfig, paths: tuple[str, ...], tok, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """Batches of this host's packed rows: tokens, segment_ids, positions, loss_mask."""
  sources = [grain.MapDataset.source(read_records(p)) for p in paths]
  render = Renderer(tok, cfg.seq_len)
  return data.packed_batches(cfg, sources, lambda r: render(r["messages"], r["where"]),
                             ("tokens", "loss_mask"),
                             process_index, process_count)


def resolve_paths(cfg: DataConfig, workdir: str) -> tuple[str, ...]:
  """The embedded task as chat records (user: the prompt, assistant: the answer), or the
  configured .jsonl files (checked before compiling)."""
  if cfg.synthetic is None:
    data.check_paths(cfg.paths)
    bad = [p for p in cfg.paths if Path(p).suffix != ".jsonl"]
    if bad:
      raise ValueError(f"chat data must be .jsonl records with 'messages'; got {bad}")
    return cfg.paths
  (arithmetic,) = data.resolve_paths(cfg, workdir)
  path = Path(arithmetic).with_suffix(".chat.jsonl")
  if not path.is_file():
    from llama4_jax import hf_io
    with open(arithmetic) as f, hf_io.atomic_file(path) as out:
      for line in f:
        r = json.loads(line)
        out.write(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": r["answer"]}]}) + "\n")
  return (str(path),)
