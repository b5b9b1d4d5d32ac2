"""Grain data: sources, packing with segment ids, exact iterator resume, host shards, mixtures."""
import json

import numpy as np
import pytest

import llama4_jax as l4
from train import config as config_lib, data, tasks, tokenizer as tokenizer_lib

TOK = tokenizer_lib.byte_tokenizer()


def _cfg(**kw):
  return config_lib.DataConfig(**{"seq_len": 24, "batch_size": 4, "packing_bins": 4, **kw})


def _jsonl(path, texts):
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  return str(path)


def test_byte_tokenizer_round_trips_and_has_llama4_specials():
  ids = TOK.encode("12+7=19 é", add_special_tokens=False).ids
  assert len(ids) == len("12+7=19 é".encode()) and max(ids) < 256
  assert TOK.decode(ids) == "12+7=19 é"
  specials = tokenizer_lib.specials(TOK)
  assert list(specials[:6]) == list(range(256, 262)) and specials.eom == 268
  assert list(tokenizer_lib.image_tokens(TOK)) == list(range(262, 268))
  tiny = l4.presets.tiny()  # the tiny preset uses the byte tokenizer's ids
  assert (tiny.text.bos_token_id, tiny.text.eos_token_id, tiny.text.pad_token_id) == (
      specials.begin, (specials.end,), specials.pad)
  assert (tiny.boi_token_index, tiny.eoi_token_index, tiny.image_token_index) == (
      262, 263, tokenizer_lib.image_tokens(TOK).patch)
  assert TOK.get_vocab_size() <= tiny.text.vocab_size


def test_packed_rows_keep_documents_apart(tmp_path):
  path = _jsonl(tmp_path / "a.jsonl", ["abc", "defgh", "ij", "klmnop"])
  batch = next(iter(data.make_dataset(_cfg(), (path,), TOK)))
  assert set(batch) == {"tokens", "segment_ids", "positions"}
  for k in batch:
    assert batch[k].shape == (4, 24) and batch[k].dtype == np.int32
  bos, eos = 256, 257
  for row in range(4):
    seg, tok, pos = (batch[k][row] for k in ("segment_ids", "tokens", "positions"))
    for s in set(seg.tolist()) - {0}:
      doc = tok[seg == s]
      assert doc[0] == bos and doc[-1] == eos
      np.testing.assert_array_equal(pos[seg == s], np.arange(len(doc)))


def test_iterator_state_resumes_the_same_batches(tmp_path):
  path = tasks.write_jsonl(tmp_path / "t.jsonl", 300, 99, 0)
  ds = data.make_dataset(_cfg(), (str(path),), TOK)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]
  it2 = iter(ds)
  it2.set_state(json.loads(json.dumps(state)))  # the state is plain JSON
  for w in want:
    got = next(it2)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])


def test_hosts_read_disjoint_slices(tmp_path):
  path = _jsonl(tmp_path / "n.jsonl", [f"doc{i:03d}" for i in range(40)])
  seen = []
  for host in range(2):
    it = iter(data.make_dataset(_cfg(seq_len=8, packing_bins=1), (path,), TOK, host, 2))
    rows = np.concatenate([next(it)["tokens"] for _ in range(10)])  # 20 rows = one pass
    docs = {TOK.decode(r[1:7].tolist()) for r in rows}
    seen.append(docs)
  assert len(seen[0]) == len(seen[1]) == 20 and not seen[0] & seen[1]


def test_mixture_follows_weights_and_reads_parquet_and_arrayrecord(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from array_record.python.array_record_module import ArrayRecordWriter
  pq.write_table(pa.table({"text": ["a" * 5] * 50}), tmp_path / "a.parquet")
  writer = ArrayRecordWriter(str(tmp_path / "b.arrayrecord"), "group_size:1")
  for _ in range(50):
    writer.write(json.dumps({"text": "b" * 5}).encode())
  writer.close()
  cfg = _cfg(seq_len=7, packing_bins=1, weights=(3.0, 1.0), batch_size=8)
  it = iter(data.make_dataset(cfg, (str(tmp_path / "a.parquet"), str(tmp_path / "b.arrayrecord")), TOK))
  rows = np.concatenate([next(it)["tokens"] for _ in range(20)])
  letters = [TOK.decode(r[1:2].tolist()) for r in rows]
  share_a = letters.count("a") / len(letters)
  assert set(letters) == {"a", "b"} and 0.65 <= share_a <= 0.85


def test_missing_and_bad_files_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
    data.resolve_paths(_cfg(paths=(str(tmp_path / "nope.jsonl"),)), str(tmp_path))
  with pytest.raises(ValueError, match="unknown format"):
    data.check_paths((str(tmp_path / "x.csv"),))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected a JSON object with a 'text'"):
    data.source(str(bad))


def test_task_answers_are_checkable():
  rng = np.random.default_rng(0)
  for _ in range(100):
    ex = tasks.example(rng, 99)
    a, rest = ex["prompt"][:-1], ex["answer"]
    assert ex["text"] == ex["prompt"] + ex["answer"]
    left, op, right = (a.partition("+") if "+" in a else a.partition("-"))
    assert int(rest) == (int(left) + int(right) if op == "+" else int(left) - int(right))
    assert tasks.reward(ex, ex["answer"] + "\n") == 1.0
    assert tasks.reward(ex, ex["answer"] + "7") == 0.0


def test_tokenizer_json_path_gives_the_same_rows(tmp_path):
  TOK.save(str(tmp_path / "tokenizer.json"))
  path = _jsonl(tmp_path / "a.jsonl", ["hello", "world!"])
  a = next(iter(data.make_dataset(_cfg(), (path,), TOK)))
  b = next(iter(data.make_dataset(_cfg(), (path,), tokenizer_lib.load(str(tmp_path / "tokenizer.json")))))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(ValueError, match="a.jsonl: not a HF tokenizer.json"):
    tokenizer_lib.load(str(tmp_path / "a.jsonl"))
