"""Grain pipelines: text sources -> tokens -> packed rows with segment ids -> per-host batches.

Sources: JSONL (field "text", read into memory), Parquet (column "text"), ArrayRecord (records are
JSON objects with "text", or raw UTF-8). Each host reads its own slice of every source
(`[process_index::process_count]`), shuffled globally by index and repeated; several sources are
mixed by weight. Documents are packed first-fit into rows of `seq_len` tokens (documents longer
than a row are truncated), so packed rows carry segment ids (0 = padding) and per-document
positions. The iterator's state is small JSON: it is saved with every checkpoint and resumes the
exact batch sequence.
"""
import json
import sys
from pathlib import Path
from typing import Callable

import grain
import numpy as np

from train import tasks, tokenizer as tokenizer_lib
from train.config import DataConfig

FORMATS = (".jsonl", ".parquet", ".arrayrecord")


def host_value(tree):
  """Device results as NumPy, the whole (global) value on every process: what the RL sampler and
  DPO's reference pass hand back to host code, whatever mesh computed them."""
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def check_paths(paths: tuple[str, ...]) -> None:
  """Fails before anything compiles when a data file is missing or of an unknown kind."""
  if not paths:
    raise FileNotFoundError("data.paths is empty and data.synthetic is not set: no training data")
  for p in paths:
    if Path(p).suffix not in FORMATS:
      raise ValueError(f"data file {p}: unknown format; expected one of {FORMATS}")
    if not Path(p).is_file():
      raise FileNotFoundError(f"data file {p} does not exist")


CHECKED_RECORDS = 100  # ArrayRecord records validated before training (JSONL/Parquet: all)


def _text(value, where: str) -> str:
  if not isinstance(value, str):
    raise ValueError(f"{where}: 'text' must be a string, got {type(value).__name__} {value!r:.60}")
  return value


def jsonl_records(path, torn_tail: bool = False):
  """("path:line", record, line) for each non-empty line of a JSONL file; a line that is not JSON
  raises naming path:line, except, with `torn_tail`, a bad last line (its writer was killed
  mid-line), which is dropped with a warning."""
  lines = Path(path).read_text().split("\n")
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if torn_tail and all(not rest.strip() for rest in lines[n:]):
        print(f"{path}:{n}: dropped a torn last line", file=sys.stderr)
        return
      raise ValueError(f"{path}:{n}: not JSON ({e}); fix or remove the line") from e
    yield f"{path}:{n}", record, line


def read_jsonl(path, check: Callable) -> list:
  """`check(record, "path:line")` of every record of a JSONL file (see `jsonl_records`); the
  first bad one raises, named, and so does a file with no records."""
  out = [check(record, where) for where, record, _ in jsonl_records(path)]
  if not out:
    raise ValueError(f"data file {path} holds no records")
  return out


def _text_record(record, where: str) -> str:
  if not isinstance(record, dict) or "text" not in record:
    raise ValueError(f"{where}: expected a JSON object with a 'text' field")
  return _text(record["text"], where)


def _read_parquet(path: str) -> list[str]:
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    column = pq.read_table(path, columns=["text"]).column("text")
  except (pa.ArrowInvalid, KeyError) as e:
    raise ValueError(f"{path}: cannot read a 'text' column ({e})") from e
  texts = column.to_pylist()
  for i, t in enumerate(texts):
    _text(t, f"{path}: row {i}")
  return texts


def _decode_record(path: str, i: int, r) -> str:
  where = f"{path}: record {i}"
  try:
    s = r.decode("utf-8") if isinstance(r, bytes) else r
    return _text(json.loads(s)["text"], where) if s.startswith("{") else s
  except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{where}: expected UTF-8 text or a JSON object with a 'text' string "
                     f"({type(e).__name__}: {e})") from e


def source(path: str) -> grain.MapDataset:
  """A MapDataset of document strings; an empty source or a bad record raises naming it (JSONL
  and Parquet are checked whole, ArrayRecord's first CHECKED_RECORDS here, the rest when read)."""
  suffix = Path(path).suffix
  if suffix == ".jsonl":
    ds = grain.MapDataset.source(read_jsonl(path, _text_record))
  elif suffix == ".parquet":
    ds = grain.MapDataset.source(_read_parquet(path))
  else:
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource([path])).map_with_index(
        lambda i, r: _decode_record(path, i, r))
    for i in range(min(len(ds), CHECKED_RECORDS)):
      ds[i]
  if not len(ds):
    raise ValueError(f"data file {path} holds no records")
  return ds


def tokenize_fn(tok, seq_len: int) -> Callable[[str], dict]:
  bos, eos = tokenizer_lib.specials(tok)[:2]

  def fn(text: str) -> dict:
    ids = [bos, *tok.encode(text, add_special_tokens=False).ids, eos]
    return {"tokens": np.asarray(ids[:seq_len], np.int32)}
  return fn


def resolve_paths(cfg: DataConfig, workdir: str) -> tuple[str, ...]:
  """The files to read: the generated embedded task, or the configured paths (checked)."""
  if cfg.synthetic is not None:
    s = cfg.synthetic
    name = f"arithmetic-{s.num_examples}-{s.max_operand}-{s.seed}.jsonl"
    return (str(tasks.write_jsonl(Path(workdir) / "data" / name, s.num_examples,
                                  s.max_operand, s.seed)),)
  check_paths(cfg.paths)
  return cfg.paths


def packed_batches(cfg: DataConfig, sources: list[grain.MapDataset], encode: Callable,
                   fields: tuple[str, ...], process_index: int, process_count: int):
  """Each source's slice for this host, shuffled, repeated, encoded to dicts of `fields` arrays
  (tokens first), mixed by `cfg.weights`, packed first-fit into rows of `seq_len` and batched:
  tokens, segment_ids, positions and the other fields, int32 [local_batch, seq_len]."""
  if cfg.batch_size % process_count:
    raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by {process_count} hosts")
  weights = cfg.weights or (1.0,) * len(sources)
  if len(weights) != len(sources):
    raise ValueError(f"data.weights has {len(weights)} entries for {len(sources)} paths")
  parts = [src[process_index::process_count].seed(cfg.seed + i).shuffle().repeat()
           .map(encode).to_iter_dataset() for i, src in enumerate(sources)]
  ds = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, list(weights))
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={f: cfg.seq_len for f in fields}, num_packing_bins=cfg.packing_bins,
      seed=cfg.seed)

  def to_batch(row: dict) -> dict:
    return {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"],
            "positions": row["tokens_positions"], **{f: row[f] for f in fields[1:]}}
  return batched(ds.map(to_batch), cfg, process_count)


def batched(ds: grain.IterDataset, cfg: DataConfig, process_count: int) -> grain.IterDataset:
  """This host's batches, produced by `cfg.workers` grain worker processes when > 0."""
  ds = ds.batch(cfg.batch_size // process_count, drop_remainder=True)
  if cfg.workers:
    from absl import flags  # grain's workers read absl flags, which no command line parsed here
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers))
  return ds


def make_dataset(cfg: DataConfig, paths: tuple[str, ...], tok, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """Batches of this host's rows: dicts of int32 [local_batch, seq_len] arrays."""
  return packed_batches(cfg, [source(p) for p in paths], tokenize_fn(tok, cfg.seq_len),
                        ("tokens",), process_index, process_count)
