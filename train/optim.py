"""AdamW via optax: schedules (warmup + cosine, warmup-stable-decay, constant), clipping, and a
weight-decay mask from the params' logical axes (norm scales are not decayed)."""
import jax
import optax

import llama4_jax as l4
from train.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  floor = cfg.lr * cfg.min_lr_ratio
  if cfg.schedule == "constant":
    return optax.join_schedules([warmup, optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1),
                                              max(total_steps, cfg.warmup_steps + 1), floor)
  decay = cfg.decay_steps or max(total_steps // 5, 1)
  stable = max(total_steps - decay - cfg.warmup_steps, 0)
  return optax.join_schedules(
      [warmup, optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, floor, decay)],
      [cfg.warmup_steps, cfg.warmup_steps + stable])


def decay_mask(model_cfg: l4.Config) -> dict:
  """True for leaves that get weight decay: every matrix, not norms, biases or the CLS embedding."""
  return jax.tree.map(lambda s: not {"norm", "bias"} & set(s.axes), l4.param_specs(model_cfg),
                      is_leaf=l4.is_spec)


def make(cfg: OptimConfig, model_cfg: l4.Config, total_steps: int):
  """(optax transformation, lr schedule)."""
  lr = schedule(cfg, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  mask=decay_mask(model_cfg)))
  return tx, lr
