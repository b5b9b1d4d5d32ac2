"""Outputs never destroy inputs: every writer refuses a non-empty destination (unless
--overwrite), never writes into, over or above its source, cleans a killed writer's temporaries
and follows the umask. (The training-workdir case is in test_faults.py.)"""
import os
import stat

import jax
import pytest

import llama4_jax as l4
from guard_util import one_line_error, snapshot
from llama4_jax import hf_io
from train import convert


@pytest.fixture
def hf_dir(hf_causal, tmp_path):
  model, _ = hf_causal("maverick")
  model.save_pretrained(tmp_path / "hf")
  return tmp_path / "hf"


def _convert_refused(capsys, tmp_path, argv, culprit):
  before = snapshot(tmp_path)
  assert convert.main([str(a) for a in argv]) == 2
  line = one_line_error(capsys.readouterr().err, "llama4-convert")
  assert culprit in line, line
  assert snapshot(tmp_path) == before
  return line


def test_hf_to_orbax_never_writes_over_into_or_above_its_source(capsys, tmp_path, hf_dir):
  _convert_refused(capsys, tmp_path, ["hf-to-orbax", hf_dir, hf_dir], "is the input")
  _convert_refused(capsys, tmp_path, ["hf-to-orbax", hf_dir, hf_dir / "ckpt"], "lies inside the input")
  _convert_refused(capsys, tmp_path, ["hf-to-orbax", hf_dir, tmp_path], "lies above the input")
  _convert_refused(capsys, tmp_path, ["hf-to-orbax", hf_dir, tmp_path, "--overwrite"],
                   "lies above the input")  # --overwrite never allows these


def test_a_non_empty_output_needs_overwrite(capsys, tmp_path, hf_dir):
  out = tmp_path / "ckpt"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  _convert_refused(capsys, tmp_path, ["hf-to-orbax", hf_dir, out], "exists and is not empty")
  assert convert.main(["hf-to-orbax", str(hf_dir), str(out), "--overwrite"]) == 0
  assert (out / "params").is_dir() and not (out / "notes.txt").exists()
  capsys.readouterr()
  export = tmp_path / "export"
  assert convert.main(["orbax-to-hf", str(out), str(export)]) == 0
  _convert_refused(capsys, tmp_path, ["orbax-to-hf", out, export], "exists and is not empty")
  _convert_refused(capsys, tmp_path, ["orbax-to-hf", out, out / "params"], "lies inside")
  (tmp_path / "empty").mkdir()  # an empty folder is no data: it is used
  assert convert.main(["orbax-to-hf", str(out), str(tmp_path / "empty")]) == 0


def test_merge_lora_and_bad_arguments_are_one_line(capsys, tmp_path, hf_dir):
  _convert_refused(capsys, tmp_path, ["merge-lora", tmp_path / "nothing", tmp_path / "out"],
                   "not a training step")
  _convert_refused(capsys, tmp_path, ["merge-lora", hf_dir, hf_dir.parent], "lies above")
  _convert_refused(capsys, tmp_path, ["hf-to-orbax", tmp_path / "nope", tmp_path / "out"],
                   "nope/config.json does not exist")
  _convert_refused(capsys, tmp_path, ["orbax-to-hf", hf_dir, tmp_path / "out"],
                   "is neither a converted checkpoint")
  with pytest.raises(SystemExit) as e:
    convert.main(["orbax-to-hf", str(hf_dir), str(tmp_path / "o"), "--max-shard-gb", "0"])
  assert e.value.code == 2
  assert "--max-shard-gb" in one_line_error(capsys.readouterr().err, "llama4-convert")


def test_a_killed_writers_temporaries_are_cleaned_and_outputs_follow_the_umask(tmp_path, hf_dir):
  dead = os.fork()
  if dead == 0:
    os._exit(0)
  os.waitpid(dead, 0)  # a pid that is surely gone
  stale = tmp_path / f".ckpt.tmp-{dead}-abc123"
  stale.mkdir()
  (stale / "half.bin").write_bytes(b"x" * 100)
  live = tmp_path / f".ckpt.tmp-{os.getpid()}-def456"  # a live writer's: left alone
  live.mkdir()
  old = os.umask(0o027)
  try:
    convert.hf_to_orbax(hf_dir, tmp_path / "ckpt", progress=False)
  finally:
    os.umask(old)
  assert not stale.exists() and live.exists()
  assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o750
  assert stat.S_IMODE((tmp_path / "ckpt" / "config.json").stat().st_mode) == 0o640


def test_save_hf_refuses_a_non_empty_path_unless_overwrite(tmp_path):
  cfg = l4.presets.tiny()
  params = l4.init_params(cfg, jax.random.key(0))
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  with pytest.raises(hf_io.OutputError, match="exists and is not empty"):
    l4.save_hf(tmp_path / "out", cfg, params)
  assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
  l4.save_hf(tmp_path / "out", cfg, params, overwrite=True)
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
