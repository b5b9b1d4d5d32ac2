"""The embedded task: procedurally generated arithmetic with checkable answers.

Each record has `text` (for pretraining), `prompt` and `answer` (for SFT, RL rewards and DPO pairs
in the later stages). Generation is deterministic in the seed.
"""
import json
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
  from llama4_jax import hf_io
  rng = np.random.default_rng(seed)
  with hf_io.atomic_file(path) as f:
    for _ in range(num_examples):
      f.write(json.dumps(example(rng, max_operand)) + "\n")
  return path


COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
          "yellow": (230, 220, 40), "purple": (140, 40, 170), "orange": (240, 140, 20),
          "white": (245, 245, 245), "black": (15, 15, 15)}


def write_colors(directory: Path, num_examples: int, seed: int) -> Path:
  """The embedded multimodal task: PNG images of one colour (random size, noise, a darker square)
  and records `{"text": "<|image|>colour: NAME", "images": [file], "prompt", "answer"}`. The name
  is only in the pixels, so the loss on it falls only by looking. Reused when complete."""
  from PIL import Image  # only the multimodal task needs it
  from llama4_jax import hf_io
  directory = Path(directory)
  path = directory / "colors.jsonl"
  if path.is_file():
    return path
  rng = np.random.default_rng(seed)
  (directory / "images").mkdir(parents=True, exist_ok=True)
  names = sorted(COLORS)
  with hf_io.atomic_file(path) as f:
    for i in range(num_examples):
      name = names[int(rng.integers(len(names)))]
      h, w = (int(v) for v in rng.integers(20, 120, size=2))
      pixels = np.asarray(COLORS[name], np.float32) + rng.normal(0, 12, (h, w, 3))
      y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
      pixels[y:y + h // 3, x:x + w // 3] *= 0.6
      file = f"images/{i:06d}.png"
      Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(directory / file)
      f.write(json.dumps({"text": f"<|image|>colour: {name}", "images": [file],
                          "prompt": "<|image|>colour:", "answer": f" {name}"}) + "\n")
  return path
