"""Each stage's own measure, on a fresh draw of the data (the embedded task generated with another
seed — with a small operand range the problems themselves recur, so this measures the stage's
objective, not generalisation; with configured `data.paths` the stage's own files are used):

  pretrain / mid-train   next-token loss on packed rows of the stage's seq_len
  SFT (data.chat)        assistant-token loss
  RL                     mean reward: greedy, and sampled at the stage's temperature
  DPO                    preference accuracy (log p(chosen) > log p(rejected)) and the DPO margin
                         against the stage's reference (the starting policy)
"""
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from train import chat, data, dpo, loop, pretrain, rl, tokenizer as tokenizer_lib
from train.config import DataConfig, RunConfig

HELD_OUT_SEED = 10_000  # added to the task's seed: examples the stage never trains on


def held_out(cfg: DataConfig, num_examples: int = 512) -> DataConfig:
  if cfg.synthetic is None:
    return cfg
  s = dataclasses.replace(cfg.synthetic, seed=cfg.synthetic.seed + HELD_OUT_SEED,
                          num_examples=num_examples)
  return dataclasses.replace(cfg, synthetic=s, seed=cfg.seed + HELD_OUT_SEED)


def _one_device():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def starting_params(cfg: RunConfig):
  model_cfg = cfg.model.build()
  return loop.initial_params(cfg, model_cfg, _one_device())


def final_params(cfg: RunConfig):
  step = Path(cfg.workdir) / "checkpoints" / str(cfg.steps)
  return loop._restore_params(step, cfg.model.build(), _one_device(),
                              jnp.dtype(cfg.model.param_dtype))


def measure(cfg: RunConfig, params, examples: int = 128, start=None) -> dict:
  """The stage's measure on `examples` held-out records (rows, for the loss stages). `start`: the
  stage's starting params when the caller holds them (DPO's margin is relative to them)."""
  model_cfg = cfg.model.build()
  tok = tokenizer_lib.load(cfg.data.tokenizer)
  workdir = str(Path(cfg.workdir))
  eval_data = held_out(cfg.data)
  if cfg.rl is not None:
    return _rl(cfg, model_cfg, tok, params, eval_data, workdir, examples)
  if cfg.dpo is not None:
    return _dpo(cfg, model_cfg, tok, params, eval_data, workdir, examples, start)
  if cfg.data.chat:
    ds = chat.make_dataset(eval_data, chat.resolve_paths(eval_data, workdir), tok)
    name = "assistant_token_loss"
  else:
    ds = data.make_dataset(eval_data, data.resolve_paths(eval_data, workdir), tok)
    name = f"loss_at_seq_len_{cfg.data.seq_len}"
  loss_fn = jax.jit(pretrain.make_loss(model_cfg, jnp.float32, False, 0.0, 0.0))
  total = count = 0.0
  it = iter(ds)
  for _ in range(max(1, examples // cfg.data.batch_size)):
    s, (n, _) = loss_fn(params, {k: jnp.asarray(v) for k, v in next(it).items()})
    total, count = total + float(s), count + float(n)
  return {name: total / count}


def _rl(cfg, model_cfg, tok, params, eval_data, workdir, examples) -> dict:
  """Mean reward on the stage's own prompts (greedy, and sampled as in training), and greedy on
  held-out prompts."""
  def prompts(data_cfg):
    return [r for p in data.resolve_paths(data_cfg, workdir)
            for r in chat.read_jsonl(p, rl.check_prompt)][:examples]
  own = prompts(cfg.data)
  r = rl.Rollouts(model_cfg, cfg.rl, dataclasses.replace(cfg.data, batch_size=cfg.rl.group_size),
                  own, tok, params)
  return {"greedy_reward": r.evaluate(params, own, examples),
          "sampled_reward": r.evaluate(params, own, examples, cfg.rl.temperature,
                                       jax.random.key(cfg.seed)),
          "held_out_greedy_reward": r.evaluate(params, prompts(eval_data), examples)}


def _dpo(cfg, model_cfg, tok, params, eval_data, workdir, examples, start) -> dict:
  """On the stage's own pairs: how often the policy prefers chosen (log p(chosen) > log
  p(rejected)), and the DPO margin against the starting policy and its sign; on held-out pairs,
  the preference accuracy."""
  def logps(data_cfg, p):
    pairs = [x for path in dpo.resolve_pairs(data_cfg, workdir) for x in dpo.read_pairs(path)]
    batches = list(dpo.pair_batches(pairs[:examples], tok, cfg.data.seq_len, cfg.data.batch_size))
    return dpo.reference_logps(model_cfg, p, batches)
  ours = logps(cfg.data, params)
  ref = ours if start is params else logps(cfg.data, starting_params(cfg) if start is None else start)
  margin = cfg.dpo.beta * ((ours[:, 0] - ref[:, 0]) - (ours[:, 1] - ref[:, 1]))
  held = logps(eval_data, params)
  return {"preference_accuracy": float(np.mean(ours[:, 0] > ours[:, 1])),
          "dpo_margin": float(np.mean(margin)), "dpo_accuracy": float(np.mean(margin > 0)),
          "held_out_preference_accuracy": float(np.mean(held[:, 0] > held[:, 1]))}
