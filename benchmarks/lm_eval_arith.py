"""lm-evaluation-harness on a trained quickstart model, with local task files (no hub access):

  python benchmarks/lm_eval_arith.py workdirs/quickstart/checkpoints/300 [--examples 200]

Writes a held-out draw of the embedded arithmetic task (a seed the training data does not use)
and two lm-eval task files beside it: `arith_mc` (multiple choice: the answer against the answer
+1, scored by log-likelihood) and `arith_gen` (greedy generation, exact match). Then runs
`llama4-eval --model llama4-jax` on them and prints lm-eval's table.
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from train import harness, tasks

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: '{{{{prompt}}}}'
"""
MC = "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: 0\n" \
     "metric_list:\n  - metric: acc\n"
GEN = "output_type: generate_until\ndoc_to_target: '{{answer}}'\ngeneration_kwargs:\n" \
      "  until: ['\\n']\n  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n"


def write_tasks(out: Path, examples: int, seed: int) -> None:
  rng = np.random.default_rng(seed)
  rows = [tasks.example(rng, 999) for _ in range(examples)]
  with open(out / "arith.jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps({**r, "choices": [r["answer"], str(int(r["answer"]) + 1)]}) + "\n")
  for name, body in (("arith_mc", MC), ("arith_gen", GEN)):
    (out / f"{name}.yaml").write_text(TASK.format(name=name, data=out / "arith.jsonl") + body)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("checkpoint")
  parser.add_argument("--examples", type=int, default=200)
  parser.add_argument("--seed", type=int, default=12345)
  args = parser.parse_args()
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  with tempfile.TemporaryDirectory() as tmp:
    write_tasks(Path(tmp), args.examples, args.seed)
    return harness.main(["--model", "llama4-jax", "--model_args", f"path={args.checkpoint}",
                         "--batch_size", "16", "--tasks", "arith_mc,arith_gen",
                         "--include_path", tmp])


if __name__ == "__main__":
  sys.exit(main())
