"""The train state and THE train step, shared by every stage: stages only change the loss.

`make_train_step(loss_fn, tx, lr)` returns `train_step(state, batch) -> (state, metrics)`;
with `combine`, the loss sees `combine(params, state.frozen)` (LoRA: adapters on a frozen base that
gets no gradient and no optimizer state);
`jit_train_step` jits it once with explicit shardings and a donated state. `loss_fn(params, batch)`
returns `(loss_sum, (normalizer, metrics))`: sums over the (micro)batch, so gradient accumulation
over microbatches gives exactly the full-batch gradient of loss_sum / normalizer. Metric keys
ending in `_sum` are divided by the normalizer; `expert_counts` is summed.
"""
from functools import partial
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

TRACE_COUNT = {"train_step": 0}  # bumped at trace time: a test asserts the step traces once


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  frozen: Any = None  # not trained, not checkpointed (LoRA's base): rebuilt from the init source


def _f32(tree):
  return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def init_state(params, tx, frozen=None) -> TrainState:
  """Params in their own dtype (fp32 or bf16); the optimizer state is always fp32."""
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(_f32(params)), frozen)


def _update(tx: optax.GradientTransformation, grad_norm, grads, params, opt_state):
  """(params, opt_state) after one update, in fp32, rounded once into the params' dtype (a no-op
  for fp32 params). The clip takes `grad_norm` (`optim.clip_by_global_norm`): XLA shares no work
  across the cond, so a norm computed inside it would read every gradient again."""
  params32 = _f32(params)
  updates, opt_state = optax.with_extra_args_support(tx).update(grads, opt_state, params32,
                                                                global_norm=grad_norm)
  return jax.tree.map(lambda p, new: new.astype(p.dtype), params,
                      optax.apply_updates(params32, updates)), opt_state


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, lr: optax.Schedule,
                    grad_accum: int = 1, combine: Callable | None = None) -> Callable:
  def full_loss(params, batch, frozen):
    return loss_fn(params if combine is None else combine(params, frozen), batch)
  grad_fn = jax.value_and_grad(full_loss, has_aux=True)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    TRACE_COUNT["train_step"] += 1
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]),
                         batch)

    def accumulate(carry, mb):
      (loss, (n, metrics)), grads = grad_fn(state.params, mb, state.frozen)
      return jax.tree.map(jnp.add, carry, (loss, n, metrics, _f32(grads))), None

    first = jax.tree.map(lambda x: x[0], micro)
    (loss, (n, metrics)), grads = grad_fn(state.params, first, state.frozen)
    grads = _f32(grads)  # accumulated and applied in fp32 whatever the params' dtype
    if grad_accum > 1:
      rest = jax.tree.map(lambda x: x[1:], micro)
      (loss, n, metrics, grads), _ = jax.lax.scan(accumulate, (loss, n, metrics, grads), rest)
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient leaves params and optimizer state as they were (the host
    # decides whether the run goes on: train/health.py); the step counter still advances. A cond,
    # not a select of new against old: the select is one more pass over the whole state (2 GB of
    # the bench step's 21 GB of memory traffic).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.lax.cond(finite, partial(_update, tx, grad_norm),
                                     lambda g, p, o: (p, o), grads,
                                     state.params, state.opt_state)
    out = {"loss": loss / denom, "tokens": n, "grad_norm": grad_norm, "lr": lr(state.step),
           "nonfinite": 1 - finite.astype(jnp.int32)}
    for k, v in metrics.items():
      out[k[:-4] if k.endswith("_sum") else k] = v / denom if k.endswith("_sum") else v
    return TrainState(state.step + 1, params, opt_state, state.frozen), out

  return train_step


def jit_train_step(train_step: Callable, state_shardings, batch_sharding) -> Callable:
  # donate: the old state's buffers are reused for the new state
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=0)
