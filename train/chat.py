"""SFT data: chat records rendered in the Llama 4 chat format, loss on assistant tokens only,
packed into rows with segment ids.

A record is `{"messages": [{"role": "system" | "user" | "assistant" | "ipython", "content": str},
...]}`. Rendered as Llama 4's chat template does:

  <|begin_of_text|><|header_start|>user<|header_end|>\\n\\n{content}<|eot|><|header_start|>assistant...

(content trimmed). `loss_mask` is 1 on each assistant turn's content and its `<|eot|>` (the model
learns to answer and to stop), 0 on the begin token, every header and every other role's turn.
Conversations are packed first-fit like pretraining documents; segment ids keep attention inside
each conversation and the loss follows each row's mask (train/losses.py).
"""
import json
import warnings
from pathlib import Path

import grain
import numpy as np

from train import data, tokenizer as tokenizer_lib
from train.config import DataConfig

ROLES = ("system", "user", "assistant", "ipython")


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


def read_records(path: str) -> list[list[dict]]:
  return data.read_jsonl(path, check_record)


class Renderer:
  """messages -> {"tokens", "loss_mask"} int32 [<= seq_len]."""

  def __init__(self, tok, seq_len: int):
    self.tok, self.seq_len, self.warned = tok, seq_len, False
    self.begin, self.header_start, self.header_end, self.eot = (
        tokenizer_lib.special_id(tok, t) for t in
        ("<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>"))

  def _encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def prompt(self, messages: list[dict]) -> list[int]:
    """The conversation followed by an open assistant header: what a policy continues."""
    ids = [self.begin]
    for m in messages:
      ids += [self.header_start, *self._encode(m["role"]), self.header_end, *self._encode("\n\n"),
              *self._encode(m["content"].strip()), self.eot]
    return ids + [self.header_start, *self._encode("assistant"), self.header_end,
                  *self._encode("\n\n")]

  def __call__(self, messages: list[dict]) -> dict:
    ids, mask = [self.begin], [0]
    for m in messages:
      header = [self.header_start, *self._encode(m["role"]), self.header_end, *self._encode("\n\n")]
      body = [*self._encode(m["content"].strip()), self.eot]
      ids += header + body
      mask += [0] * len(header) + [int(m["role"] == "assistant")] * len(body)
    if len(ids) > self.seq_len and not self.warned:
      self.warned = True
      warnings.warn(f"a conversation of {len(ids)} tokens is cut to data.seq_len={self.seq_len}; "
                    f"its end is not trained on", stacklevel=2)
    return {"tokens": np.asarray(ids[:self.seq_len], np.int32),
            "loss_mask": np.asarray(mask[:self.seq_len], np.int32)}


def make_dataset(cfg: DataConfig, paths: tuple[str, ...], tok, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """Batches of this host's packed rows: tokens, segment_ids, positions, loss_mask."""
  sources = [grain.MapDataset.source(read_records(p)) for p in paths]
  return data.packed_batches(cfg, sources, Renderer(tok, cfg.seq_len), ("tokens", "loss_mask"),
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
