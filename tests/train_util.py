"""A tiny training recipe for tests, and a helper to run llama4-train in a subprocess."""
import os
import subprocess
import sys
from pathlib import Path

import yaml

# as tests/conftest.py: XLA spends little time optimising programs this small
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

TINY = {
    "steps": 12, "log_every": 1, "report": False,
    "model": {"preset": "tiny"},  # the byte tokenizer's ids
    "data": {"synthetic": {"num_examples": 2000, "max_operand": 99}, "seq_len": 32,
             "batch_size": 8, "packing_bins": 4},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "checkpoint": {"every": 2, "keep": 3},
}


def write_recipe(path: Path, workdir: Path, **overrides) -> Path:
  d = yaml.safe_load(yaml.safe_dump(TINY))
  d["workdir"] = str(workdir)
  for k, v in overrides.items():
    d[k] = v
  path.write_text(yaml.safe_dump(d))
  return path


def train_process(recipe: Path, cache_dir: Path, *extra: str, devices: int = 1) -> subprocess.Popen:
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}
  return subprocess.Popen([sys.executable, "-m", "train", str(recipe), *extra], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
