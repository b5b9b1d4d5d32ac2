"""Does a trained multimodal run look at the image? Colour-naming accuracy on held-out images, with
each prompt's own image and with another prompt's image, in the same run.

    llama4-train configs/quickstart_multimodal.yaml
    python benchmarks/image_grounding.py workdirs/quickstart_multimodal [--examples 200]

The latest training checkpoint is exported with `llama4-convert orbax-to-hf` and loaded back with
`l4.load_hf` (the user's path out of training). For each held-out image (`tasks.write_colors` with
a seed the run never saw) every colour name is scored by the summed log-probability of its answer
tokens after the prompt `<|image|>colour:`; the best-scoring name is the prediction. Chance is
1/8. With shuffled images (each prompt gets another example's image) accuracy should fall to the
rate at which the other image happens to share the colour, if the answer comes from the pixels.
"""
import argparse
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import llama4_jax as l4
from train import config as config_lib, convert, mmdata, tasks
from train.stages import lm as pretrain
from train import tokenizer as tokenizer_lib


def export_latest(workdir: Path, out: Path) -> tuple[l4.Config, dict]:
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  if not steps:
    raise SystemExit(f"{workdir}/checkpoints holds no training checkpoint")
  convert.orbax_to_hf(workdir / "checkpoints" / str(steps[-1]), out, progress=False)
  print(f"exported step {steps[-1]} -> {out}")
  return l4.load_hf(out)


def candidate_rows(encode: mmdata.Encoder, records: list[dict], images: list[str]) -> dict:
  """One row per (record, colour name): the record's prompt with `images[i]`, answered by each
  name; loss_mask marks the answer tokens only."""
  names = sorted(tasks.COLORS)
  rows = []
  for r, image in zip(records, images):
    prompt = encode({"text": r["prompt"], "images": [image], "where": r["where"]})
    n_prompt = int(prompt["segment_ids"].sum()) - 1  # without the eos
    for name in names:
      row = encode({"text": f"{r['prompt']} {name}", "images": [image], "where": r["where"]})
      n = int(row["segment_ids"].sum()) - 1
      if row["tokens"][n] != encode.eos:
        raise SystemExit(f"{r['where']}: the answer does not fit in data.seq_len="
                         f"{len(row['tokens'])} with this image; the run trained on it cut too")
      row["loss_mask"] = ((np.arange(len(row["tokens"])) >= n_prompt)
                          & (np.arange(len(row["tokens"])) < n)).astype(np.int32)
      rows.append(row)
  return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def answer_logprob_fn(model_cfg: l4.Config):
  @jax.jit
  def fn(params, batch):
    x = pretrain.forward(model_cfg, params, batch, remat=False, hooks=l4.Hooks()).final
    logp = jax.nn.log_softmax(l4.model.head(model_cfg.text, params, x)[:, :-1], axis=-1)
    tok = jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    return (tok * batch["loss_mask"][:, 1:]).sum(-1)
  return fn


def accuracy(fn, params, encode, records, images, names, batch_records: int) -> float:
  right = 0
  for i in range(0, len(records), batch_records):
    rs, ims = records[i:i + batch_records], images[i:i + batch_records]
    scores = np.asarray(fn(params, candidate_rows(encode, rs, ims))).reshape(len(rs), len(names))
    truth = [r["text"].rsplit(" ", 1)[1] for r in rs]
    right += sum(names[int(s.argmax())] == t for s, t in zip(scores, truth))
  return right / len(records)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("workdir", type=Path)
  ap.add_argument("--examples", type=int, default=200)
  ap.add_argument("--seed", type=int, default=12345, help="held-out images (the run's seed is 0)")
  args = ap.parse_args()
  run = json.loads((args.workdir / "config.json").read_text())
  data_cfg = config_lib.from_dict(config_lib.DataConfig, run["data"], "data")
  with tempfile.TemporaryDirectory() as tmp:
    model_cfg, params = export_latest(args.workdir, Path(tmp) / "hf")
    records = mmdata.read_records(str(tasks.write_colors(Path(tmp) / "eval", args.examples,
                                                         args.seed)))
    for r, raw in zip(records, (Path(tmp) / "eval" / "colors.jsonl").read_text().splitlines()):
      r["prompt"] = json.loads(raw)["prompt"]
    tok = tokenizer_lib.for_model(data_cfg, model_cfg)
    encode = mmdata.Encoder(tok, model_cfg.vision, data_cfg)
    names, fn = sorted(tasks.COLORS), answer_logprob_fn(model_cfg)
    own = [r["images"][0] for r in records]
    shuffled = own[1:] + own[:1]
    same = np.mean([a.rsplit(" ", 1)[1] == b.rsplit(" ", 1)[1] for a, b in
                    zip([r["text"] for r in records], [r["text"] for r in records[1:] + records[:1]])])
    acc_own = accuracy(fn, params, encode, records, own, names, 8)
    acc_shuffled = accuracy(fn, params, encode, records, shuffled, names, 8)
  print(f"held-out examples: {len(records)}, colours: {len(names)} (chance {1 / len(names):.3f})")
  print(f"accuracy with its own image:      {acc_own:.3f}")
  print(f"accuracy with another's image:    {acc_shuffled:.3f} "
        f"(that image shares the colour for {same:.3f})")


if __name__ == "__main__":
  main()
