"""SFT chat data: the Llama 4 chat format token by token, loss only on assistant turns, packed
conversations kept apart, and bad records named."""
import json

import numpy as np
import pytest

from train import chat, tokenizer as tokenizer_lib
from train.config import DataConfig

TOK = tokenizer_lib.byte_tokenizer()
IDS = tokenizer_lib.specials(TOK)
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="},
         {"role": "assistant", "content": " 4 "}, {"role": "tool", "content": "ok"},
         {"role": "user", "content": "3+3="}, {"role": "assistant", "content": "6"}]


def _bytes(s: str) -> list[int]:
  ids = TOK.encode(s, add_special_tokens=False).ids
  assert len(ids) == len(s.encode())  # one token per byte
  return ids


def test_llama4_chat_format_and_assistant_only_loss():
  row = chat.Renderer(TOK, 256)(CONVO)
  want, mask = [IDS.begin], [0]
  for m in CONVO:
    role, end = ("ipython", IDS.eom) if m["role"] == "tool" else (m["role"], IDS.eot)
    head = [IDS.header_start, *_bytes(role), IDS.header_end, *_bytes("\n\n")]
    body = [*_bytes(m["content"]), end]  # content as written, untrimmed
    want += head + body
    mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
  assert row["tokens"].tolist() == want and row["loss_mask"].tolist() == mask
  trained = TOK.decode([t for t, m in zip(want, mask) if m], skip_special_tokens=False)
  assert trained == " 4 <|eot|>6<|eot|>"  # the answers and their stop tokens, nothing else
  prompt = chat.Renderer(TOK, 256).prompt(CONVO[:2])
  assert TOK.decode(prompt, skip_special_tokens=False) == (
      "<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
      "<|header_start|>user<|header_end|>\n\n2+2=<|eot|><|header_start|>assistant<|header_end|>\n\n")


def test_a_conversation_longer_than_seq_len_is_named(tmp_path):
  with pytest.raises(ValueError, match=r"sft.jsonl:3: renders to 51 tokens, more than data.seq_len=40"):
    chat.Renderer(TOK, 40)(CONVO[:3], "sft.jsonl:3")


def test_packed_conversations_keep_segments_and_masks(tmp_path):
  path = tmp_path / "sft.jsonl"
  records = [{"messages": [{"role": "user", "content": f"{i}+{i}="},
                           {"role": "assistant", "content": str(2 * i)}]} for i in range(40)]
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  cfg = DataConfig(paths=(str(path),), seq_len=64, batch_size=4, chat=True)
  batch = next(iter(chat.make_dataset(cfg, cfg.paths, TOK)))
  assert set(batch) == {"tokens", "segment_ids", "positions", "loss_mask"}
  for tokens, seg, pos, mask in zip(*(batch[k] for k in ("tokens", "segment_ids", "positions",
                                                          "loss_mask"))):
    assert seg.max() >= 2  # several conversations per row
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      assert tokens[idx[0]] == IDS.begin and pos[idx].tolist() == list(range(len(idx)))
      # within each conversation only the assistant answer + <|eot|> is a target
      answer = TOK.decode(tokens[idx][mask[idx] == 1].tolist(), skip_special_tokens=False)
      user = TOK.decode(tokens[idx].tolist(), skip_special_tokens=True)
      a, b = user.split("user\n\n")[1].split("=")[0].split("+")
      assert answer == f"{int(a) + int(b)}<|eot|>"
    assert not mask[seg == 0].any()


@pytest.mark.parametrize("record,msg", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn with content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     "no assistant turn with content"),
    ({"messages": []}, "expected"),
    ({"text": "not chat"}, "expected"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "message 0 must have a role"),
])
def test_bad_records_name_the_file_and_line(tmp_path, record, msg):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"messages": CONVO}) + "\n" + json.dumps(record) + "\n")
  with pytest.raises(ValueError, match=rf"bad\.jsonl:2: {msg}"):
    chat.read_records(str(path))


def test_embedded_task_as_chat(tmp_path):
  from train.config import SyntheticConfig
  cfg = DataConfig(synthetic=SyntheticConfig(num_examples=20), chat=True)
  (path,) = chat.resolve_paths(cfg, str(tmp_path))
  records = chat.read_records(path)
  assert len(records) == 20 and [m["role"] for m in records[0]["messages"]] == ["user", "assistant"]
  assert records[0]["messages"][0]["content"].endswith("=") and chat.resolve_paths(cfg, str(tmp_path)) == (path,)
