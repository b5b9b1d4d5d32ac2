"""Online RL, GRPO-style (Shao et al. 2024), on the shared train step.

Each step: sample `group_size` completions per prompt with the KV-cache decoder (temperature,
top-p), score each with a verifiable reward, normalise rewards within each group (advantage =
(r - mean) / (std + 1e-6)) and drop prompts whose group rewards are all equal (prompt filtering:
they carry no signal); sampling rounds continue (up to `max_rounds`) until the batch is full, rows
left empty weigh 0. The loss per completion token is the clipped policy ratio against the
sampling policy plus `kl_coef` times the k3 estimate of KL(policy || reference), the reference
being the starting policy; summed over completion tokens, divided by their count.

A prompt record is `{"prompt": "..." | [messages], "answer": "..."}`, rendered as a user turn (or
the given conversation) followed by an open assistant header (train/chat.py). The default reward
is the embedded task's exact-answer check (`tasks.reward`); a reward function that raises drops
its prompt and is counted (`reward_errors`), a non-finite reward is an error naming the prompt.

Rows hold the prompt left-padded then the completion; the loss forward uses the attention-mask
convention the decoder samples with (positions and temperature index count the pads, as HF's).
"""
import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np

import llama4_jax as l4
from train import chat, data, losses, params as params_lib, tasks, tokenizer as tokenizer_lib
from train.config import DataConfig, RLConfig
from train.stages import lm
from train.stages.base import held_out


def check_prompt(record, where: str) -> dict:
  if not isinstance(record, dict) or "prompt" not in record or "answer" not in record:
    raise ValueError(f"{where}: expected {{'prompt', 'answer'}}")
  answer = record["answer"]
  if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer) == "":
    raise ValueError(f"{where}: 'answer' must be a non-empty string or a number, got {answer!r}")
  messages = chat.prompt_messages(record["prompt"], where)
  chat.check_record({"messages": messages + [{"role": "assistant", "content": "-"}]}, where)
  return {"messages": messages, "answer": str(record["answer"]), "where": where}


def token_logps(cfg: l4.Config, params, tokens_BT, mask_BT, remat: bool = False,
                hooks: l4.Hooks = l4.Hooks()) -> jax.Array:
  """log p(tokens[t] | tokens[<t]) at [B, t] for t >= 1 (column 0 is 0)."""
  out = l4.apply(cfg, params, tokens_BT, mask_BT, remat=remat, hooks=hooks, with_head=False)
  logits = l4.model.head(cfg.text, params, out.final)[:, :-1]
  logp = losses.target_logps(logits, tokens_BT[:, 1:])[0]
  return jnp.pad(logp, ((0, 0), (1, 0))), out


# compiled once per model and shape, shared by every Rollouts
_sample = jax.jit(l4.decode.generate, static_argnums=(0, 5, 6, 7, 8))
_logps = jax.jit(token_logps, static_argnums=0)


def make_loss(model_cfg: l4.Config, cfg: RLConfig, compute_dtype=jnp.float32, remat: bool = False,
              hooks: l4.Hooks = l4.Hooks()):
  """loss_fn(params, batch) -> (summed loss, (completion tokens, metrics))."""
  def loss_fn(params, batch):
    p = lm.cast(params, compute_dtype)
    logp, out = token_logps(model_cfg, p, batch["tokens"], batch["attention_mask"], remat, hooks)
    mask = batch["completion_mask"].astype(jnp.float32)
    ratio = jnp.exp(logp - batch["old_logps"])
    adv = batch["advantages"][:, None]
    clipped = jnp.clip(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
    policy = -jnp.minimum(ratio * adv, clipped * adv)
    d = batch["ref_logps"] - logp
    kl = jnp.exp(d) - d - 1
    n = jnp.sum(mask)
    return jnp.sum((policy + cfg.kl_coef * kl) * mask), (n, {
        "kl_sum": jnp.sum(kl * mask),
        "clipped_sum": jnp.sum((jnp.abs(ratio - 1) > cfg.clip_eps) * mask),
        "expert_counts": out.expert_counts})
  return loss_fn


def advantages(rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(group-normalised advantages [prompts, group], kept [prompts]: groups whose rewards are not
  all equal)."""
  std = rewards.std(axis=1, keepdims=True)
  adv = (rewards - rewards.mean(axis=1, keepdims=True)) / (std + 1e-6)
  return adv.astype(np.float32), std[:, 0] > 0


class Rollouts:
  """The RL stage's data: `next_batch(params, step)` samples, scores, filters and returns a batch.

  Every process draws the same prompts and receives the whole global batch (the sampler and the
  log-prob passes run once, sharded like the params; their results are gathered to every host),
  so all processes take the same decisions; each then feeds its own rows to the train step.

  Checkpointable like a grain iterator (the prompt stream's position); the sampling key is
  derived from (seed, step, round), so a resumed run samples what the uninterrupted one would.
  """

  def __init__(self, model_cfg: l4.Config, cfg: RLConfig, data_cfg: DataConfig, records, tok,
               reference, reward_fn: Callable = tasks.reward):
    if data_cfg.batch_size % cfg.group_size:
      raise ValueError(f"data.batch_size={data_cfg.batch_size} is not a multiple of "
                       f"rl.group_size={cfg.group_size}")
    self.cfg, self.model_cfg, self.tok, self.reward_fn = cfg, model_cfg, tok, reward_fn
    self.prompts_per_step = data_cfg.batch_size // cfg.group_size
    self.prompt_len = data_cfg.seq_len - cfg.max_new_tokens
    if self.prompt_len < 1:
      raise ValueError(f"data.seq_len={data_cfg.seq_len} leaves no room for a prompt before "
                       f"rl.max_new_tokens={cfg.max_new_tokens}")
    self.render, self.reference, self.seed = chat.Renderer(tok, data_cfg.seq_len), reference, data_cfg.seed
    self.stop = self.render.eot
    self.records = records
    self.it = iter(grain.MapDataset.range(len(records)).seed(data_cfg.seed).shuffle().repeat()
                   .to_iter_dataset())

  def prompts(self, records) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt ids and masks [n, prompt_len]; a prompt too long is an error."""
    ids = np.zeros((len(records), self.prompt_len), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(records):
      p = self.render.prompt(r["messages"])
      if len(p) > self.prompt_len:
        raise ValueError(f"{r['where']}: the prompt has {len(p)} tokens; data.seq_len - "
                         f"rl.max_new_tokens leaves {self.prompt_len}")
      ids[i, -len(p):], mask[i, -len(p):] = p, 1
    return ids, mask

  def completions(self, params, records, key, temperature=None):
    """(prompt ids, prompt mask, tokens, live) for each record, `group_size` times each."""
    ids, mask = self.prompts(records)
    g = self.cfg.group_size if temperature is None else 1
    ids, mask = np.repeat(ids, g, axis=0), np.repeat(mask, g, axis=0)
    t = self.cfg.temperature if temperature is None else temperature
    toks, live = data.host_value(_sample(self.model_cfg, params, ids, mask, key,
                                         self.cfg.max_new_tokens, t, self.cfg.top_p, (self.stop,)))
    return ids, mask, toks, live

  def text(self, toks, live) -> str:
    return self.tok.decode([int(x) for x, l in zip(toks, live) if l and x != self.stop])

  def score(self, records, toks, live, g: int) -> tuple[np.ndarray, np.ndarray]:
    """(rewards [P, G], errored [P]): a reward function that raises marks its prompt errored."""
    rewards, errored = np.zeros((len(records), g), np.float32), np.zeros(len(records), bool)
    for i, r in enumerate(records):
      for j in range(g):
        try:
          value = float(self.reward_fn(r, self.text(toks[i * g + j], live[i * g + j])))
        except Exception:  # the user's reward function: counted, its prompt dropped
          errored[i] = True
          break
        if not math.isfinite(value):
          raise ValueError(f"{r['where']}: the reward function returned {value}")
        rewards[i, j] = value
    return rewards, errored

  def next_batch(self, params, step: int) -> tuple[dict, dict]:
    """(batch of numpy arrays [B, ...], host metrics) for train step `step`."""
    g, n = self.cfg.group_size, self.prompts_per_step
    rows, sampled_rewards, stats = [], [], {"filtered_prompts": 0, "reward_errors": 0}
    for round_ in range(self.cfg.max_rounds):
      records = [self.records[next(self.it)] for _ in range(n)]
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), step), round_)
      ids, mask, toks, live = self.completions(params, records, key)
      rewards, errored = self.score(records, toks, live, g)
      adv, kept = advantages(rewards)
      sampled_rewards.append(rewards[~errored])
      stats["reward_errors"] += int(errored.sum())
      stats["filtered_prompts"] += int((~kept & ~errored).sum())
      for i in np.flatnonzero(kept & ~errored):
        rows += [(ids[i * g + j], mask[i * g + j], toks[i * g + j], live[i * g + j], adv[i, j])
                 for j in range(g)]
      if len(rows) >= n * g:
        break
    stats["reward"] = float(np.concatenate(sampled_rewards).mean()) if any(
        r.size for r in sampled_rewards) else float("nan")
    stats["filled_rows"] = min(len(rows), n * g) / (n * g)
    return self._batch(params, rows[:n * g], n * g), stats

  def _batch(self, params, rows, size: int) -> dict:
    t = self.prompt_len + self.cfg.max_new_tokens
    tokens, attn = np.zeros((size, t), np.int32), np.zeros((size, t), np.int32)
    completion, adv = np.zeros((size, t), np.int32), np.zeros((size,), np.float32)
    for r, (ids, mask, toks, live, a) in enumerate(rows):
      tokens[r] = np.concatenate([ids, toks])
      attn[r] = np.concatenate([mask, live])
      completion[r, self.prompt_len:] = live
      adv[r] = a
    old = data.host_value(_logps(self.model_cfg, params, tokens, attn)[0])
    ref = data.host_value(_logps(self.model_cfg, self.reference, tokens, attn)[0])
    return {"tokens": tokens, "attention_mask": attn, "completion_mask": completion,
            "advantages": adv, "old_logps": old, "ref_logps": ref}

  def evaluate(self, params, records, batch: int = 64, temperature: float = 0.0,
               key=None) -> float:
    """Mean reward of one completion per record: greedy (temperature 0) or sampled."""
    total, key = 0.0, jax.random.key(0) if key is None else key
    for s in range(0, len(records), batch):
      chunk = records[s:s + batch]
      padded = chunk + chunk[-1:] * (batch - len(chunk))
      _, _, toks, live = self.completions(params, padded, jax.random.fold_in(key, s), temperature)
      total += float(self.score(chunk, toks[:len(chunk)], live[:len(chunk)], 1)[0].sum())
    return total / len(records)

  def get_state(self) -> bytes:
    return json.dumps(self.it.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self.it.set_state(json.loads(state.decode()))


class RolloutBatches:
  """`base.Batches` of the RL stage: every process gets the whole global batch from the rollouts
  (sampled with the current params) and places its rows on `sharding`."""

  def __init__(self, rollouts: Rollouts, sharding: jax.sharding.Sharding):
    self.rollouts, self.sharding = rollouts, sharding

  def next(self, state, step: int) -> tuple[dict, dict]:
    rows, host_metrics = self.rollouts.next_batch(state.params, step)
    return {k: jax.make_array_from_callback(v.shape, self.sharding, lambda i, v=v: v[i])
            for k, v in rows.items()}, host_metrics

  def get_state(self) -> bytes:
    return self.rollouts.get_state()

  def set_state(self, state: bytes) -> None:
    self.rollouts.set_state(state)

  def start_prefetch(self) -> None:
    pass

  def close(self) -> None:
    pass  # nothing open: the prompt stream is in memory


def read_prompts(data_cfg: DataConfig, workdir: str) -> list[dict]:
  """The prompt records of the configured files (or of the embedded task)."""
  return [r for p in data.resolve_paths(data_cfg, workdir) for r in data.read_jsonl(p, check_prompt)]


class Stage:
  """`base.Stage` for RL: the starting policy stays on the device as the KL reference (a copy:
  the train state donates its own)."""

  def __init__(self, cfg):
    self.cfg = cfg

  def loss(self, model_cfg: l4.Config, hooks: l4.Hooks):
    c = self.cfg
    return make_loss(model_cfg, c.rl, jnp.dtype(c.model.compute_dtype), c.model.remat, hooks)

  def batch_spec(self, model_cfg: l4.Config) -> dict:
    shape = (self.cfg.data.batch_size, self.cfg.data.seq_len)
    return {**{k: (shape, jnp.int32) for k in ("tokens", "attention_mask", "completion_mask")},
            "advantages": (shape[:1], jnp.float32),
            **{k: (shape, jnp.float32) for k in ("old_logps", "ref_logps")}}

  def data(self, trainer, workdir: Path, tok):
    c = self.cfg
    records = read_prompts(c.data, str(workdir))  # configured files are checked there
    params = params_lib.initial_params(c, trainer.model_cfg, trainer.base_shardings, trainer.table)
    reference = jax.tree.map(jnp.copy, params)
    rollouts = Rollouts(trainer.model_cfg, c.rl, c.data, records, tok, reference)
    return RolloutBatches(rollouts, trainer.batch_sharding), params

  def measure(self, params, examples: int = 128, start=None) -> dict:
    """Mean reward on the stage's own prompts (greedy, and sampled as in training), and greedy on
    held-out prompts."""
    c = self.cfg
    own = read_prompts(c.data, c.workdir)[:examples]
    model_cfg = c.model.build()
    r = Rollouts(model_cfg, c.rl, dataclasses.replace(c.data, batch_size=c.rl.group_size),
                 own, tokenizer_lib.for_model(c.data, model_cfg), params)
    return {"greedy_reward": r.evaluate(params, own, examples),
            "sampled_reward": r.evaluate(params, own, examples, c.rl.temperature,
                                         jax.random.key(c.seed)),
            "held_out_greedy_reward": r.evaluate(
                params, read_prompts(held_out(c.data), c.workdir)[:examples], examples)}
