"""Checks to run before trusting a MetaP table on a big run (the tests and
benchmarks/metap_transfer.py use them too):

  coord_check   train a family of widths a few Adam steps on one fixed batch and measure how much
                every tracked activation moved; under a transferring parametrization the change
                does not grow with width (log-log slope ~0), under `sp` it does.
  sweep         final training loss over a grid of learning rates, all LRs trained at once (vmap)
                on fresh batches of a learnable Markov-chain task: the optimum should not move
                with width under `mup`.
"""
import dataclasses
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llama4_jax as l4
from train import losses, metap, optim
from train.config import MetaPConfig, OptimConfig

HEAD_DIM = 16
# Small models on CPU: LLVM's expensive passes cost more than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def width_config(width: int, layers: int = 2, experts: int = 4, init_std: float = 0.02) -> l4.Config:
  """The tiny Llama 4 at `width`: layer pairs of (RoPE chunked attention + dense FFN, NoPE full
  attention + MoE with a shared expert), QK norm; head_dim fixed, heads, KV heads and FFN widths
  proportional to the width."""
  t = l4.presets.tiny().text
  heads = width // HEAD_DIM
  text = dataclasses.replace(
      t, hidden_size=width, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
      head_dim=HEAD_DIM, intermediate_size=width, intermediate_size_mlp=2 * width,
      num_hidden_layers=layers, num_local_experts=experts, no_rope_layer_interval=2,
      initializer_range=init_std, tie_word_embeddings=False)
  return l4.Config(text=text)


def base_overrides(cfg: l4.Config) -> dict:
  """`metap.base` for a proxy with `cfg`'s text dims."""
  t = cfg.text
  keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
          "intermediate_size", "intermediate_size_mlp", "num_hidden_layers", "num_local_experts")
  return {k: getattr(t, k) for k in keys}


def _nll(cfg: l4.Config, params, ids) -> tuple[jax.Array, dict]:
  out = l4.apply(cfg, params, ids, return_hidden=True)
  nll = -losses.target_logps(out.logits[:, :-1], ids[:, 1:])[0]
  acts = {f"layer{i}.resid": out.hidden[i] for i in range(out.hidden.shape[0])}
  acts |= {f"moe{i}.router_logits": out.router_logits[i] for i in range(out.router_logits.shape[0])}
  acts["logits"] = out.logits
  return nll.mean(), acts


def _trees(cfg: l4.Config, table: metap.Table) -> dict:
  return {f: metap.tree(table, cfg, f) for f in ("init", "lr", "wd", "eps")}


def _init(cfg: l4.Config, init_tree, key):
  return jax.tree.map(lambda x, m: x * m, l4.init_params(cfg, key), init_tree)


def coord_check(widths: list[int], metap_cfgs: dict[str, Callable[[int], MetaPConfig]],
                optim_cfg: OptimConfig, ids: np.ndarray, steps: int, seeds: int = 2,
                make_cfg: Callable[[int], l4.Config] = width_config) -> dict[str, dict]:
  """{name: {activation: [len(widths)] RMS(x_steps - x_0)}} for each named parametrization
  (a function width -> MetaPConfig), averaged over seeds, training on the fixed batch `ids`.
  One compile per width serves every parametrization: their tables are arguments."""
  out: dict[str, dict] = {name: {} for name in metap_cfgs}
  for w in widths:
    cfg = make_cfg(w)

    @partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(trees, keys, ids, cfg=cfg):
      tx, _ = optim.transform(optim_cfg, cfg, steps, (), trees["lr"], trees["wd"], trees["eps"])

      def one_seed(key):
        params = _init(cfg, trees["init"], key)
        _, acts0 = _nll(cfg, params, ids)

        def step(carry, _):
          p, s = carry
          u, s = tx.update(jax.grad(lambda p: _nll(cfg, p, ids)[0])(p), s, p)
          return (optax.apply_updates(p, u), s), None
        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        _, acts = _nll(cfg, params, ids)
        return {k: jnp.sqrt(jnp.mean(jnp.square(acts[k] - acts0[k]))) for k in acts}
      return jax.vmap(one_seed)(keys)
    keys = jax.random.split(jax.random.key(0), seeds)
    for name, fn in metap_cfgs.items():
      table = metap.resolve(cfg, fn(w), optim_cfg, ids.size, ids.size * steps)
      moved = jax.device_get(run(_trees(cfg, table), keys, jnp.asarray(ids)))
      for k, v in moved.items():
        out[name].setdefault(k, []).append(float(np.mean(v)))
  return {name: {k: np.asarray(v) for k, v in acts.items()} for name, acts in out.items()}


def slopes(widths: list[int], values: dict[str, np.ndarray]) -> dict[str, float]:
  """Least-squares slope of log2(value) against log2(width), per activation."""
  x = np.log2(np.asarray(widths, np.float64))
  return {k: float(np.polyfit(x, np.log2(v), 1)[0]) for k, v in values.items()}


def markov_batches(steps: int, batch: int, length: int, vocab: int = 64, seed: int = 0):
  """[steps, batch, length] tokens of a fixed random bigram chain (each token has 4 likely
  successors): learnable, with a loss floor well above 0."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 1, (vocab, vocab))
  logits[np.arange(vocab)[:, None], rng.integers(0, vocab, (vocab, 4))] += 4.0
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  cum = probs.cumsum(1)
  ids = np.zeros((steps * batch, length), np.int32)
  ids[:, 0] = rng.integers(0, vocab, steps * batch)
  for t in range(1, length):
    u = rng.random(steps * batch)[:, None]
    ids[:, t] = np.minimum((u > cum[ids[:, t - 1]]).sum(1), vocab - 1)
  return ids.reshape(steps, batch, length)


def sweep(cfg: l4.Config, metap_cfgs: dict[str, MetaPConfig], optim_cfg: OptimConfig,
          lrs: list[float], batches: np.ndarray, seed: int = 0, tail: int = 20) -> dict:
  """{name: mean training loss over the last `tail` steps, per peak LR in `lrs`}: every LR of a
  parametrization trains at once (vmap; the global LR scales the update), one compile per width."""
  steps, b, t = batches.shape
  unit = dataclasses.replace(optim_cfg, lr=1.0)

  @jax.jit
  def run(trees, lrs, batches):
    tx, _ = optim.transform(unit, cfg, steps, (), trees["lr"], trees["wd"], trees["eps"])
    params = _init(cfg, trees["init"], jax.random.key(seed))

    def train(lr):
      def step(carry, ids):
        p, s = carry
        loss, g = jax.value_and_grad(lambda p: _nll(cfg, p, ids)[0])(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, jax.tree.map(lambda x: lr * x, u)), s), loss
      _, losses = jax.lax.scan(step, (params, tx.init(params)), batches)
      return losses[-tail:].mean()
    return jax.vmap(train)(lrs)
  out = {}
  for name, mcfg in metap_cfgs.items():
    table = metap.resolve(cfg, mcfg, unit, b * t, b * t * steps)
    out[name] = np.asarray(run(_trees(cfg, table), jnp.asarray(lrs, jnp.float32),
                               jnp.asarray(batches)))
  return out


def fitted_optimum(log2_lrs: np.ndarray, losses: np.ndarray) -> float:
  """log2 of the optimal LR: the vertex of a parabola through the best grid point and its
  neighbours (the grid point itself at an edge or on a non-convex triple)."""
  finite = np.where(np.isfinite(losses), losses, np.inf)
  i = int(np.argmin(finite))
  if i == 0 or i == len(losses) - 1 or not np.isfinite(finite[i - 1:i + 2]).all():
    return float(log2_lrs[i])
  a, b, _ = np.polyfit(log2_lrs[i - 1:i + 2], finite[i - 1:i + 2], 2)
  return float(-b / (2 * a)) if a > 0 else float(log2_lrs[i])
