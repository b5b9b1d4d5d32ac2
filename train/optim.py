"""AdamW via optax with per-tensor hyperparameters: schedules (warmup + cosine, warmup-stable-decay,
constant), clipping, a weight-decay mask from the params' logical axes (norms and biases are not
decayed), and the MetaP table's per-tensor LR, decay and eps multipliers (train/metap.py)."""
import jax
import jax.numpy as jnp
import optax

import llama4_jax as l4
from train import metap
from train.config import MetaPConfig, OptimConfig


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


def clip_by_global_norm(max_norm: float, own_norm: bool = False
                         ) -> optax.GradientTransformationExtraArgs:
  """`optax.clip_by_global_norm` as one scalar multiply, by min(1, max_norm / norm): optax divides
  every element by the norm, a division XLA keeps out of the Adam updates' fusions, so the clipped
  gradient was written and read again (1.6 GB of the bench step's 19.5 GB of memory traffic).
  Equal to optax when the norm is under max_norm; within an ulp of it when clipping.

  The norm is the `global_norm` extra argument when the caller passes one (the train step has it
  already, for its finite check and metric: computing it again is one more read of every
  gradient), else, or with `own_norm`, that of the updates it receives."""
  def update(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    norm = optax.tree.norm(updates) if global_norm is None or own_norm else global_norm
    scale = jnp.minimum(1.0, max_norm / norm)
    return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), state
  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def scale_by_adam_eps_tree(b1: float, b2: float, eps) -> optax.GradientTransformation:
  """optax's Adam moments with a per-tensor eps tree: m_hat / (sqrt(v_hat) + eps_p). Equal bit for
  bit to `optax.scale_by_adam(b1, b2, eps)` when every eps_p is that eps."""
  inner = optax.scale_by_adam(b1, b2, eps=0.0)

  def update(updates, state, params=None):
    _, state = inner.update(updates, state, params)
    mu_hat = optax.tree.bias_correction(state.mu, b1, state.count)
    nu_hat = optax.tree.bias_correction(state.nu, b2, state.count)
    return jax.tree.map(lambda m, v, e: m / (jnp.sqrt(v + 0.0) + e), mu_hat, nu_hat, eps), state
  return optax.GradientTransformation(inner.init, update)


def per_tensor(fn, tree) -> optax.GradientTransformation:
  """Stateless: update_p <- fn(update_p, tree_p, param_p)."""
  return optax.stateless(lambda updates, params: jax.tree.map(fn, updates, tree, params))


def make(cfg: OptimConfig, model_cfg: l4.Config, total_steps: int, frozen: tuple[str, ...] = (),
         table: metap.Table | None = None):
  """(optax transformation, lr schedule). With a MetaP `table` the global hyperparameters are the
  table's and every tensor p gets update -lr(t) * lr_p * (adam_p(eps * eps_p) + wd * wd_p * param);
  without one (or with `sp` at the proxy's shapes) this is optax.adamw exactly. Params under the
  `frozen` top-level keys keep their values bit for bit: their gradients are zeroed before
  clipping (so they do not count in the norm), their Adam moments stay 0 (an update of exactly 0)
  and they get no weight decay."""
  for k in frozen:
    if k not in l4.param_specs(model_cfg) and k != "lm_head":  # lm_head: absent when tied
      raise ValueError(f"cannot freeze {k!r}: the model has no such params")
  if table is None:
    table = metap.resolve(model_cfg, MetaPConfig(), cfg, 1, 1)
  trees = {f: metap.tree(table, model_cfg, f) for f in ("lr", "wd", "eps")}
  return transform(table.optim, model_cfg, total_steps, frozen, **trees)


def transform(g: OptimConfig, model_cfg: l4.Config, total_steps: int, frozen: tuple[str, ...],
              lr, wd, eps):
  """`make` from the multiplier trees themselves (which may be traced: one compile serves many
  tables of the same shapes)."""
  schedule_fn = schedule(g, total_steps)
  decay = jax.tree.map(lambda on, w: w * g.weight_decay if on else jnp.zeros_like(w),
                       decay_mask(model_cfg, frozen), wd)
  tx = optax.chain(
      optax.masked(optax.set_to_zero(), frozen_mask(model_cfg, frozen)),
      # frozen gradients are zeroed above: the step's norm, which counts them, is not this one
      clip_by_global_norm(g.clip_norm, own_norm=bool(frozen)),
      scale_by_adam_eps_tree(g.b1, g.b2, jax.tree.map(lambda e: e * g.eps, eps)),
      per_tensor(lambda u, w, p: u + w * p, decay),
      per_tensor(lambda u, c, p: u * c, lr),
      optax.scale_by_learning_rate(schedule_fn))
  return tx, schedule_fn
