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


def decay_mask(model_cfg: l4.Config, frozen: tuple[str, ...] = ()) -> dict:
  """True for leaves that get weight decay: every trained matrix, not norms, biases, the CLS
  embedding or anything under a frozen top-level key."""
  specs = l4.param_specs(model_cfg)
  return {k: jax.tree.map(lambda s: k not in frozen and not {"norm", "bias"} & set(s.axes), v,
                          is_leaf=l4.is_spec) for k, v in specs.items()}


def frozen_mask(model_cfg: l4.Config, frozen: tuple[str, ...]) -> dict:
  return {k: jax.tree.map(lambda _: k in frozen, v, is_leaf=l4.is_spec)
          for k, v in l4.param_specs(model_cfg).items()}


def make(cfg: OptimConfig, model_cfg: l4.Config, total_steps: int, frozen: tuple[str, ...] = ()):
  """(optax transformation, lr schedule). Params under the `frozen` top-level keys keep their
  values bit for bit: their gradients are zeroed before clipping (so they do not count in the
  norm), their Adam moments stay 0 (an update of exactly 0) and they get no weight decay."""
  for k in frozen:
    if k not in l4.param_specs(model_cfg) and k != "lm_head":  # lm_head: absent when tied
      raise ValueError(f"cannot freeze {k!r}: the model has no such params")
  lr = schedule(cfg, total_steps)
  tx = optax.chain(
      optax.masked(optax.set_to_zero(), frozen_mask(model_cfg, frozen)),
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  mask=decay_mask(model_cfg, frozen)))
  return tx, lr
