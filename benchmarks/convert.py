"""Streaming conversion at scale: peak RSS and throughput of `llama4-convert` both ways on a
synthetic HF checkpoint of >= 4 GB, and the raw read speed of the same files in the same run; then
the FP8 legs: the checkpoint exported in the FP8 release's layout (`orbax-to-hf --quantize fp8`)
and read back dequantized (`hf-to-orbax --dtype bf16`) and kept in FP8 (`--keep-fp8`).

    python benchmarks/convert.py [--workdir /tmp/convert-bench] [--layers 6]

The checkpoint is a widened tiny Llama 4 (D 1024, 16 experts of width 4096, fp32) written shard by
shard, never whole in memory. Each conversion runs in its own process; its peak RSS comes from
getrusage. The bound checked is 1 GiB + 3x the largest single tensor (of the fp32 checkpoint: the
fused experts of one layer, which the FP8 legs also hold, per layer, at most).
"""
import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import llama4_jax as l4
from llama4_jax import config as config_lib, convert


def synthetic_config(layers: int) -> l4.Config:
  text = dataclasses.replace(
      l4.presets.tiny().text, hidden_size=1024, num_attention_heads=8, num_key_value_heads=2,
      head_dim=128, num_local_experts=16, intermediate_size=4096, intermediate_size_mlp=8192,
      num_hidden_layers=layers, interleave_moe_layer_step=1, vocab_size=32768)
  return l4.Config(text=text)


def write_hf(path: Path, cfg: l4.Config, shard_bytes: int = 1 << 30) -> tuple[int, int]:
  """Random fp32 tensors, one shard in memory at a time. Returns (total bytes, largest tensor)."""
  path.mkdir(parents=True)
  shapes = convert.expected_hf_shapes(cfg)
  rng = np.random.default_rng(0)
  shard, size, weight_map, files = {}, 0, {}, []

  def flush():
    name = f"model-{len(files) + 1:05d}.safetensors"
    save_file(shard, path / name, metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
    files.append(name)

  for name, shape in shapes.items():
    a = rng.standard_normal(shape, dtype=np.float32) * 0.02
    if shard and size + a.nbytes > shard_bytes:
      flush()
      shard, size = {}, 0
    shard[name] = a
    size += a.nbytes
  flush()
  total = sum(int(np.prod(s)) * 4 for s in shapes.values())
  (path / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
  (path / "config.json").write_text(json.dumps(config_lib.to_hf(cfg,
                                                                dtype="float32")))
  return total, max(int(np.prod(s)) * 4 for s in shapes.values())


def timed_child(*args: str) -> tuple[float, int]:
  """(seconds, peak RSS bytes) of `llama4-convert ARGS` in a fresh process."""
  t0 = time.perf_counter()
  proc = subprocess.Popen([sys.executable, "-m", "train.convert", *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
  if status:
    raise RuntimeError(f"llama4-convert {' '.join(args)} failed ({status})")
  return time.perf_counter() - t0, usage.ru_maxrss * 1024


def raw_read(path: Path) -> float:
  t0 = time.perf_counter()
  n = 0
  for f in sorted(path.glob("*.safetensors")):
    with open(f, "rb") as fh:
      while chunk := fh.read(64 << 20):
        n += len(chunk)
  return n / (time.perf_counter() - t0)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="/tmp/convert-bench")
  parser.add_argument("--layers", type=int, default=6)
  args = parser.parse_args()
  root = Path(args.workdir)
  shutil.rmtree(root, ignore_errors=True)
  cfg = synthetic_config(args.layers)
  total, largest = write_hf(root / "hf", cfg)
  bound = (1 << 30) + 3 * largest
  gb = 1e9
  print(f"synthetic checkpoint: {total / gb:.2f} GB fp32, largest tensor {largest / 2**20:.0f} MiB, "
        f"RSS bound {bound / 2**30:.2f} GiB")
  read_speed = raw_read(root / "hf")
  legs = [("hf-to-orbax", "hf", "ckpt"), ("orbax-to-hf", "ckpt", "out"),
          ("orbax-to-hf --quantize fp8", "ckpt", "fp8"), ("hf-to-orbax --dtype bf16", "fp8", "deq"),
          ("hf-to-orbax --keep-fp8", "fp8", "kept")]
  print(f"raw read of the HF files   : {read_speed / gb:6.2f} GB/s (fp32 sizes below)")
  for label, src, dst in legs:
    command, *flags = label.split()
    t, rss = timed_child(command, str(root / src), str(root / dst), *flags)
    ok = "within" if rss <= bound else "OVER"
    print(f"{label:<27}: {total / t / gb:6.2f} GB/s ({t:5.1f} s), peak RSS {rss / 2**30:.2f} GiB "
          f"({ok} the bound)")
  shutil.rmtree(root)


if __name__ == "__main__":
  main()
