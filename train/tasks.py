"""The embedded task: procedurally generated arithmetic with checkable answers.

Each record has `text` (for pretraining), `prompt` and `answer` (for SFT, RL rewards and DPO pairs
in the later stages). Generation is deterministic in the seed.
"""
import json
import os
from pathlib import Path

import numpy as np


def example(rng: np.random.Generator, max_operand: int) -> dict:
  a, b = (int(v) for v in rng.integers(0, max_operand + 1, size=2))
  op = "+" if rng.random() < 0.5 else "-"
  answer = a + b if op == "+" else a - b
  prompt = f"{a}{op}{b}="
  return {"text": f"{prompt}{answer}", "prompt": prompt, "answer": str(answer)}


def reward(record: dict, completion: str) -> float:
  """1.0 when the completion starts with the exact answer (followed by nothing or a non-digit)."""
  ans = record["answer"]
  rest = completion[len(ans):]
  return float(completion.startswith(ans) and not (rest[:1].isdigit()))


def write_jsonl(path: Path, num_examples: int, max_operand: int, seed: int) -> Path:
  """Writes the task once; an existing complete file is reused (same seed, same bytes)."""
  path = Path(path)
  if path.is_file():
    return path
  rng = np.random.default_rng(seed)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".{os.getpid()}.tmp")  # hosts sharing a workdir each write their own
  with tmp.open("w") as f:
    for _ in range(num_examples):
      f.write(json.dumps(example(rng, max_operand)) + "\n")
  tmp.replace(path)
  return path
