"""DPO (Rafailov et al. 2023) on preference pairs: the loss on the shared train step, pair data, and
reference log-probs computed once.

A record is `{"prompt": "..." | [messages], "chosen": "...", "rejected": "..."}`: the prompt as a
user turn (or the given conversation), each response as the assistant turn, rendered in the Llama 4
chat format (train/chat.py); only response tokens (and their `<|eot|>`) count in a sequence's
log-probability. loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))): exactly log 2 while
the policy equals the reference.
"""
import json
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np

import llama4_jax as l4
from llama4_jax import hf_io
from train import chat, data, losses, params as params_lib, tokenizer as tokenizer_lib
from train.config import DataConfig
from train.stages import lm
from train.stages.base import HostBatches, held_out, host


def check_pair(record, where: str) -> dict:
  """The pair as {"messages", "chosen", "rejected"}, or a ValueError naming `where`."""
  if not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= set(record):
    raise ValueError(f"{where}: expected {{'prompt', 'chosen', 'rejected'}}")
  messages = chat.prompt_messages(record["prompt"], where)
  for k in ("chosen", "rejected"):
    if not isinstance(record[k], str) or not record[k].strip():
      raise ValueError(f"{where}: an empty preference pair: {k!r} is {record[k]!r}")
  if record["chosen"].strip() == record["rejected"].strip():
    raise ValueError(f"{where}: chosen and rejected are the same response")
  chat.check_record({"messages": messages + [{"role": "assistant", "content": record["chosen"]}]},
                    where)
  return {"messages": messages, "chosen": record["chosen"], "rejected": record["rejected"],
          "where": where}


def read_pairs(path: str) -> list[dict]:
  return data.read_jsonl(path, check_pair)


def encode_pair(render: chat.Renderer, pair: dict) -> dict:
  """{chosen,rejected}_{tokens,mask} int32 [seq_len] (padded with 0, mask 0 on padding)."""
  out = {}
  for k in ("chosen", "rejected"):
    row = render(pair["messages"] + [{"role": "assistant", "content": pair[k]}],
                 f"{pair['where']} ({k})")
    n = len(row["tokens"])
    out[f"{k}_tokens"] = np.pad(row["tokens"], (0, render.seq_len - n))
    out[f"{k}_mask"] = np.pad(row["loss_mask"], (0, render.seq_len - n))
  return out


def sequence_logps(model_cfg: l4.Config, params, tokens, mask, remat: bool = False,
                   hooks: l4.Hooks = l4.Hooks()) -> tuple[jax.Array, l4.Output]:
  """Sum over each row's masked positions of log p(token | its prefix): [B]."""
  real = jnp.cumsum(mask[:, ::-1], axis=1)[:, ::-1] > 0  # up to the response's final <|eot|>
  batch = {"tokens": tokens, "segment_ids": real.astype(jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)}
  out = lm.forward(model_cfg, params, batch, remat, hooks)
  logits = l4.model.head(model_cfg.text, params, out.final)[:, :-1]
  return jnp.sum(losses.target_logps(logits, tokens[:, 1:])[0] * mask[:, 1:], axis=1), out


def both(batch: dict) -> tuple[jax.Array, jax.Array]:
  """Chosen rows then rejected rows, one forward for both: tokens, mask [2B, T]."""
  return (jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]]),
          jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]]))


_logps = jax.jit(lambda cfg, p, t, m: sequence_logps(cfg, p, t, m)[0], static_argnums=0)


def reference_logps(model_cfg: l4.Config, params, batches) -> np.ndarray:
  """[N, 2] (chosen, rejected) log-probs of the reference policy, computed once per pair, from
  batches or (batch, rows to keep) tuples."""
  out = []
  for b in batches:
    b, keep = b if isinstance(b, tuple) else (b, None)
    logps = data.host_value(_logps(model_cfg, params, *both(b)))  # every process passes every pair
    out.append(np.stack(np.split(logps, 2), axis=1)[:keep])
  return np.concatenate(out)


def make_loss(model_cfg: l4.Config, beta: float, compute_dtype=jnp.float32, remat: bool = False,
              hooks: l4.Hooks = l4.Hooks()):
  """loss_fn(params, batch) -> (summed loss, (pairs, metrics)) for `step.make_train_step`; batch
  holds the pair rows and `ref_logps` [B, 2]."""
  def loss_fn(params, batch):
    p = lm.cast(params, compute_dtype)
    logps, out = sequence_logps(model_cfg, p, *both(batch), remat=remat, hooks=hooks)
    chosen, rejected = jnp.split(logps, 2)
    margin = beta * ((chosen - batch["ref_logps"][:, 0]) - (rejected - batch["ref_logps"][:, 1]))
    losses = -jax.nn.log_sigmoid(margin)
    n = jnp.asarray(margin.shape[0], jnp.float32)
    return jnp.sum(losses), (n, {"accuracy_sum": jnp.sum(margin > 0).astype(jnp.float32),
                                 "margin_sum": jnp.sum(margin),
                                 "expert_counts": out.expert_counts})
  return loss_fn


def resolve_pairs(cfg: DataConfig, workdir: str) -> tuple[str, ...]:
  """The configured pair files, or the embedded task as pairs: chosen = the answer, rejected = a
  wrong one (deterministic in the seed)."""
  if cfg.synthetic is None:
    data.check_paths(cfg.paths)
    if cfg.weights:
      raise ValueError("data.weights: preference files are concatenated, not mixed")
    return cfg.paths
  (arithmetic,) = data.resolve_paths(cfg, workdir)
  path = Path(arithmetic).with_suffix(".pairs.jsonl")
  if not path.is_file():
    rng = np.random.default_rng(cfg.synthetic.seed)
    with open(arithmetic) as f, hf_io.atomic_file(path) as out:
      for line in f:
        r = json.loads(line)
        wrong = int(r["answer"]) + int(rng.choice([-10, -2, -1, 1, 2, 10]))
        out.write(json.dumps({"prompt": r["prompt"], "chosen": r["answer"],
                              "rejected": str(wrong)}) + "\n")
  return (str(path),)


def make_dataset(cfg: DataConfig, pairs: list[dict], tok, ref: np.ndarray, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """Batches of this host's pairs: {chosen,rejected}_{tokens,mask} [B, T] and ref_logps [B, 2]."""
  if cfg.batch_size % process_count:
    raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by {process_count} hosts")
  render = chat.Renderer(tok, cfg.seq_len)

  def encode(i):
    return {**encode_pair(render, pairs[i]), "ref_logps": ref[i].astype(np.float32)}
  ds = (grain.MapDataset.range(len(pairs))[process_index::process_count].seed(cfg.seed).shuffle()
        .repeat().map(encode).to_iter_dataset())
  return ds.batch(cfg.batch_size // process_count, drop_remainder=True)


def pair_batches(pairs: list[dict], tok, seq_len: int, batch: int):
  """Every pair once, in order, `batch` at a time (the last batch padded by repetition)."""
  render = chat.Renderer(tok, seq_len)
  for start in range(0, len(pairs), batch):
    chunk = pairs[start:start + batch]
    rows = [encode_pair(render, p) for p in chunk + chunk[-1:] * (batch - len(chunk))]
    yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}, len(chunk)


class Stage:
  """`base.Stage` for DPO: pair rows with the reference policy's log-probs, which are computed
  once from the starting params into WORKDIR/dpo_reference.npy and reused on resume."""

  def __init__(self, cfg):
    self.cfg = cfg

  def loss(self, model_cfg: l4.Config, hooks: l4.Hooks):
    c = self.cfg
    return make_loss(model_cfg, c.dpo.beta, jnp.dtype(c.model.compute_dtype), c.model.remat, hooks)

  def batch_spec(self, model_cfg: l4.Config) -> dict:
    shape = (self.cfg.data.batch_size, self.cfg.data.seq_len)
    return {**{f"{k}_{f}": (shape, jnp.int32) for k in ("chosen", "rejected")
               for f in ("tokens", "mask")}, "ref_logps": ((shape[0], 2), jnp.float32)}

  def data(self, trainer, workdir: Path, tok):
    """The params that computed the reference log-probs start the run (not loaded twice)."""
    c = self.cfg
    pairs = [p for path in resolve_pairs(c.data, str(workdir)) for p in read_pairs(path)]
    ref_file, params = workdir / "dpo_reference.npy", None
    if ref_file.exists():
      ref = np.load(ref_file)
      if ref.shape != (len(pairs), 2):
        raise ValueError(f"{ref_file} holds {ref.shape[0]} pairs' reference log-probs but the "
                         f"data has {len(pairs)}: the data changed since this run started")
    else:
      params = params_lib.initial_params(c, trainer.model_cfg, trainer.base_shardings,
                                         trainer.table)
      ref = reference_logps(trainer.model_cfg, params,
                            pair_batches(pairs, tok, c.data.seq_len, c.data.batch_size))
      if jax.process_index() == 0:
        np.save(ref_file, ref)
    it = iter(make_dataset(c.data, pairs, tok, ref, *host()))
    return HostBatches(it, trainer.batch_sharding), params

  def measure(self, params, examples: int = 128, start=None) -> dict:
    """On the stage's own pairs: how often the policy prefers chosen (log p(chosen) > log
    p(rejected)), and the DPO margin against the starting policy and its sign; on held-out
    pairs, the preference accuracy."""
    c, model_cfg = self.cfg, self.cfg.model.build()
    tok = tokenizer_lib.for_model(c.data, model_cfg)

    def logps(data_cfg, p):
      pairs = [x for path in resolve_pairs(data_cfg, c.workdir) for x in read_pairs(path)]
      return reference_logps(model_cfg, p, pair_batches(pairs[:examples], tok, c.data.seq_len,
                                                        c.data.batch_size))
    ours = logps(c.data, params)
    if start is params:
      ref = ours
    else:
      ref = logps(c.data, params_lib.starting_params(c) if start is None else start)
    margin = c.dpo.beta * ((ours[:, 0] - ref[:, 0]) - (ours[:, 1] - ref[:, 1]))
    held = logps(held_out(c.data), params)
    return {"preference_accuracy": float(np.mean(ours[:, 0] > ours[:, 1])),
            "dpo_margin": float(np.mean(margin)), "dpo_accuracy": float(np.mean(margin > 0)),
            "held_out_preference_accuracy": float(np.mean(held[:, 0] > held[:, 1]))}
