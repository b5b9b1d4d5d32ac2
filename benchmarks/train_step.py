"""Training-step throughput on this machine, in one run: the bare model step, the framework's own
step (what `llama4-train` runs), HF transformers (torch) and the fp32 matmul peak.

    python benchmarks/train_step.py [--rounds 3] [--steps 6] [--skip-hf] [--dot-floor]

The process runs with glibc's huge pages, as `llama4-train` does (`train.cli.exec_with_huge_pages`);
`LLAMA4_HUGE_PAGES=0` measures it without.

- bare: `jax.jit(value_and_grad(mean CE of l4.forward)) + optax.adamw`, its state donated, nothing
  else, its layers unrolled (`l4.Hooks(scan=False)`, as the recipe's `model.scan_layers: false`);
  bare-scan: the same with the layers scanned (the default);
- framework: `loop.build(recipe)`'s jitted step (stage loss, metrics, optimizer with the MetaP
  table's per-tensor multipliers, finite check, donated state), built from the `bench` recipe below;
- HF: `Llama4ForCausalLM` + torch AdamW on the identical config and batch.

The three alternate for `--rounds` rounds (each timed over `--steps` steps after its warm-up) so
that load on the machine hits all of them alike; each figure is its best round. Model FLOPs per
token come from `metrics.train_flops_per_token`; MFU is against the peak measured in the same run.
It also prints XLA's cost analysis of the bare and framework steps (FLOPs, bytes accessed: what
the framework adds, without timing noise) and, with `--dot-floor`, the bare step's matmuls timed
alone at their shapes: the step time (and MFU) a step could reach if nothing but its matmuls ran.
The `bench` config: d 512, 8 layers, 8 heads / 2 KV, head_dim 64, 8 experts top-1, expert width
1024, dense width 2048, MoE every 2nd layer, vocab 8192, batch 4 x 512, fp32.
"""
import argparse
import dataclasses
import time
from collections import Counter
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llama4_jax as l4
from llama4_jax import config as config_lib, moe
from train import cli, config as run_config, loop, metrics, optim

BENCH = dataclasses.replace(
    l4.presets.tiny().text, vocab_size=8192, hidden_size=512, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=8,
    num_experts_per_tok=1, intermediate_size=1024, intermediate_size_mlp=2048,
    interleave_moe_layer_step=2, attention_chunk_size=8192, floor_scale=8192,
    rope_theta=500000.0, rope_scaling=None, bos_token_id=1, eos_token_id=(2,), pad_token_id=0)
BATCH, SEQ = 4, 512
RECIPE = {  # the framework's run: the same model, batch and AdamW as the bare step
    "workdir": "/tmp/llama4-bench-train-step", "steps": 1000, "report": False,
    "model": {"text": {f.name: getattr(BENCH, f.name) for f in dataclasses.fields(BENCH)
                       if getattr(BENCH, f.name) != getattr(l4.presets.tiny().text, f.name)},
              "scan_layers": False},
    "data": {"seq_len": SEQ, "batch_size": BATCH},
    "optim": {"lr": 1e-4, "warmup_steps": 1},
}


def _timed(step, state, steps: int) -> tuple[float, object]:
  state, m = step(state)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state)
  jax.block_until_ready(m)
  return BATCH * SEQ * steps / (time.perf_counter() - t0), state


def bare(ids: np.ndarray, scan: bool = False, aot: bool = True):
  """(step, state, compiled): the plain step (its layers unrolled, as the recipe's, or scanned),
  compiled ahead of time (or, not `aot`, the jitted function and no compiled)."""
  cfg = l4.Config(text=BENCH)
  tx = optax.adamw(1e-4, weight_decay=0.1)
  x = jax.device_put(ids)  # an argument, as a real step's batch (a constant would fold masks)

  def loss(params, x):
    logits = l4.forward(cfg, params, x, hooks=l4.Hooks(scan=scan))[:, :-1]  # all 512 positions
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, 1:, None], -1))

  @partial(jax.jit, donate_argnums=0)  # as the framework's step: the new state reuses the old
  def step(state, x):
    params, opt = state
    value, grads = jax.value_and_grad(loss)(params, x)
    updates, opt = tx.update(grads, opt, params)
    return (optax.apply_updates(params, updates), opt), value
  params = jax.jit(l4.init_params, static_argnums=0)(cfg, jax.random.key(0))
  state = (params, tx.init(params))
  if not aot:
    return partial(step, x=x), state, None
  compiled = step.lower(state, x).compile()
  return (lambda s: compiled(s, x)), state, compiled


def framework(ids: np.ndarray):
  """(step, state, compiled): `llama4-train`'s own step for the bench recipe."""
  cfg = run_config.from_dict(run_config.RunConfig, RECIPE)
  t = loop.build(cfg, cfg.model.build())
  state = loop.initial_state(cfg, t)
  batch = jax.device_put({"tokens": ids, "segment_ids": np.ones_like(ids),
                          "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), ids.shape)},
                         t.batch_sharding)
  compiled = t.train_step.lower(state, batch).compile()
  return (lambda s: compiled(s, batch)), state, compiled


def hf(ids: np.ndarray):
  """(step, state, None) over HF's model; the state is untouched (torch updates in place)."""
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.Llama4ForCausalLM(
      transformers.Llama4TextConfig(**config_lib.text_to_hf(BENCH))).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  x = torch.as_tensor(ids, dtype=torch.long)

  def step(state):
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return state, loss.detach().numpy()
  return step, None, None


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, list) else cost


def optimizer_cost() -> str:
  """XLA's FLOPs and bytes of one update: the framework's optimizer (MetaP per-tensor multipliers,
  all 1 here) vs `optax.adamw` with the same clipping."""
  cfg = l4.Config(text=BENCH)
  params = jax.eval_shape(lambda: l4.init_params(cfg, jax.random.key(0)))
  ours, _ = optim.make(run_config.OptimConfig(lr=1e-4, warmup_steps=1), cfg, 1000)
  plain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.1))
  out = []
  for name, tx in (("framework", ours), ("optax.adamw", plain)):
    update = jax.jit(lambda g, s, p, tx=tx: optax.apply_updates(p, tx.update(g, s, p)[0]))
    cost = _cost(update.lower(params, jax.eval_shape(tx.init, params), params).compile())
    out.append(f"{name} {cost['flops'] / 1e6:.1f} MFLOP / {cost['bytes accessed'] / 1e6:.1f} MB")
  return "optimizer update (XLA cost): " + ", ".join(out)


def _dots(jaxpr, trips: int, out: Counter, mult: int = 1) -> Counter:
  """{(lhs shape, rhs shape, dimension numbers): count} of every dot_general, a while loop's
  counted `trips` times."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      out[(lhs, rhs, eqn.params["dimension_numbers"])] += mult
    inner = mult * (trips if eqn.primitive.name == "while" else 1)
    for sub in _subjaxprs(eqn):
      _dots(sub, trips, out, inner)
  return out


def _subjaxprs(eqn):
  for v in eqn.params.values():
    for x in v if isinstance(v, (list, tuple)) else [v]:
      if hasattr(x, "eqns"):
        yield x
      elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
        yield x.jaxpr


def dot_floor(ids: np.ndarray) -> float:
  """Seconds per bare step if it were only its matmuls, each timed alone at its own shape (best of
  3 x 5 runs). The MoE's block loops count m / b blocks (its rows without padding), so this is a
  lower bound on the step's time on this machine."""
  step, state, _ = bare(ids, aot=False)
  rows = BATCH * SEQ * BENCH.num_experts_per_tok
  trips = rows // moe._block_size(rows, BENCH.num_local_experts)
  total = 0.0
  for (lhs, rhs, dims), n in _dots(jax.make_jaxpr(step)(state).jaxpr, trips,
                                   Counter()).items():
    f = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims))
    a, b = jnp.ones(lhs, jnp.float32), jnp.ones(rhs, jnp.float32)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(3):
      t0 = time.perf_counter()
      for _ in range(5):
        r = f(a, b)
      r.block_until_ready()
      best = min(best, (time.perf_counter() - t0) / 5)
    total += n * best
  return total


def main():
  cli.exec_with_huge_pages()  # as `llama4-train` runs; LLAMA4_HUGE_PAGES=0 measures without
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--skip-hf", action="store_true")
  parser.add_argument("--dot-floor", action="store_true",
                      help="also time the bare step's matmuls alone: the MFU a step could reach")
  args = parser.parse_args()
  ids = np.random.RandomState(0).randint(0, BENCH.vocab_size, (BATCH, SEQ)).astype(np.int32)
  built = {"bare": bare(ids), "bare-scan": bare(ids, scan=True), "framework": framework(ids)}
  if not args.skip_hf:
    built["hf"] = hf(ids)
  runs = {name: (step, state) for name, (step, state, _) in built.items()}
  best = {name: 0.0 for name in runs}
  rounds = {name: [] for name in runs}
  peak = 0.0
  for _ in range(args.rounds):
    peak = max(peak, metrics.measure_matmul_peak(jnp.float32, n=2048, repeats=3))
    for name, (step, state) in runs.items():
      tok_s, state = _timed(step, state, args.steps)
      print(f"  {name}: {tok_s:.1f} tok/s", flush=True)
      runs[name], best[name] = (step, state), max(best[name], tok_s)
      rounds[name].append(tok_s)
  flops = metrics.train_flops_per_token(BENCH, SEQ)
  print(f"device: {jax.devices()[0].device_kind}, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; "
        f"model FLOPs per token (train) {flops / 1e6:.1f} M; best of {args.rounds} rounds")
  for name, tok_s in best.items():
    extra = "" if name == "bare" else f"  {tok_s / best['bare']:.3f}x bare"
    print(f"{name:<10}: {tok_s:8.1f} tok/s  MFU {tok_s * flops / peak:6.1%}{extra}")
  print(optimizer_cost())
  print("step (XLA cost, a loop body counted once): " + ", ".join(
      f"{name} {c['flops'] / 1e9:.1f} GFLOP / {c['bytes accessed'] / 1e9:.2f} GB"
      for name, c in ((name, _cost(built[name][2])) for name in ("bare", "framework"))))
  if args.dot_floor:
    floor = dot_floor(ids)
    print(f"dot floor: the bare step's matmuls alone, each at its own shape, {floor:.3f} s/step "
          f"= {BATCH * SEQ / floor:.1f} tok/s = at most {BATCH * SEQ * flops / floor / peak:.1%} "
          "MFU with no other work")
  # Rounds swing 10-20% on a shared machine: the ratio within each round (the steps ran back to
  # back) and its median are steadier than a ratio of two best rounds.
  pairs = [("framework", "bare")] + [(n, "hf") for n in ("bare", "framework") if "hf" in best]
  for a, b in pairs:
    if b == "hf":
      print(f"{a} / HF: {best[a] / best['hf']:.2f}x (best rounds)")
    per_round = [x / y for x, y in zip(rounds[a], rounds[b])]
    print(f"{a} / {b} per round: {', '.join(f'{r:.3f}' for r in per_round)}; "
          f"median {float(np.median(per_round)):.3f}x")


if __name__ == "__main__":
  main()
