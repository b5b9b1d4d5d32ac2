"""Expert-parallel MoE dispatch: bytes each device sends per MoE layer, and step time, of the
all-to-all and all-gather dispatches (`sharding/expert.py`) on 8 fake CPU devices.

    python benchmarks/moe_dispatch.py [--tokens 1024] [--d 512] [--f 1024] [--experts 16] [--k 1]

For ep in {2, 4, 8} (mesh data 8/ep x expert ep) it compiles one MoE layer's forward and reads the
collective bytes one device sends from the optimized HLO (`train/hlo.py`), next to the lower bound
k x tokens x D x dtype bytes each way (dispatch and combine: twice that); the all-to-all's
overflow pass, compiled but run only when a slot overflows, is shown apart. Then it times the
layer's forward + backward for both dispatches, alternately in one process, with balanced random
routing and with a router that sends every token to one expert (the overflow pass runs). On a CPU
the collectives are memory copies: the times show the dispatches' local work, not an
interconnect's.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sharding as sh  # noqa: E402
from llama4_jax import moe  # noqa: E402
from train import hlo  # noqa: E402

DISPATCHES = ("all_to_all", "all_gather")
MiB = 2**20


def _params(d: int, f: int, e: int, skewed: bool) -> dict:
  ks = jax.random.split(jax.random.key(0), 7)
  n = lambda k, shape: jax.random.normal(k, shape) / shape[-2] ** 0.5
  p = {"router": n(ks[0], (d, e)), "gate": n(ks[1], (e, d, f)), "up": n(ks[2], (e, d, f)),
       "down": n(ks[3], (e, f, d)), "shared_gate": n(ks[4], (d, f)),
       "shared_up": n(ks[5], (d, f)), "shared_down": n(ks[6], (f, d))}
  return {**p, "router": jnp.zeros_like(p["router"])} if skewed else p


def _timed(fn, args, steps: int) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def layer_bytes(ep: int, args) -> dict:
  """dispatch -> (bytes sent per device, of which in the overflow branch) for one forward."""
  mesh = sh.make_mesh(sh.MeshConfig(data=8 // ep, expert=ep))
  x = jax.ShapeDtypeStruct((8, args.tokens, args.d), jnp.float32,
                           sharding=sh.batch_sharding(mesh))
  p = jax.eval_shape(lambda: _params(args.d, args.f, args.experts, False))
  out = {}
  for dispatch in DISPATCHES:
    fn = sh.expert.moe_fn(mesh, moe.expert_ffn_blocked, dispatch)
    text = jax.jit(lambda p, x: fn(p, x, args.k)[0]).lower(p, x).compile().as_text()
    out[dispatch] = (sum(hlo.collective_bytes(text, 8).values()),
                     sum(hlo.collective_bytes(text, 8, conditional=True).values()))
  return out


def step_times(ep: int, args, skewed: bool) -> dict:
  """dispatch -> seconds per forward + backward of the layer (times taken alternately)."""
  mesh = sh.make_mesh(sh.MeshConfig(data=8 // ep, expert=ep))
  x = jax.device_put(jax.random.normal(jax.random.key(1), (8, args.tokens, args.d)),
                     sh.batch_sharding(mesh))
  p = _params(args.d, args.f, args.experts, skewed)
  fns = {}
  for dispatch in DISPATCHES:
    fn = sh.expert.moe_fn(mesh, moe.expert_ffn_blocked, dispatch)
    fns[dispatch] = jax.jit(jax.grad(lambda p, x, fn=fn: jnp.sum(fn(p, x, args.k)[0]), (0, 1)))
  times = {d: [] for d in DISPATCHES}
  for _ in range(args.repeats):
    for d, fn in fns.items():
      times[d].append(_timed(fn, (p, x), args.steps))
  return {d: min(t) for d, t in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=1024, help="tokens per device")
  parser.add_argument("--d", type=int, default=512)
  parser.add_argument("--f", type=int, default=1024)
  parser.add_argument("--experts", type=int, default=16)
  parser.add_argument("--k", type=int, default=1)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  bound = args.k * args.tokens * args.d * 4  # fp32, each way
  print(f"MoE layer, {args.tokens} tokens/device, D {args.d}, F {args.f}, {args.experts} experts, "
        f"top-{args.k}, fp32, 8 fake CPU devices (mesh data 8/ep x expert ep); per device, "
        f"forward; lower bound k x tokens x D x 4 B = {bound / MiB:.2f} MiB each way\n")
  print("| ep | dispatch | sent per layer (fwd) | / lower bound (2 ways) | overflow pass "
        "(only on overflow) | fwd+bwd balanced | fwd+bwd all to one expert |")
  print("|---|---|---|---|---|---|---|")
  for ep in (2, 4, 8):
    sent = layer_bytes(ep, args)
    balanced, skewed = step_times(ep, args, False), step_times(ep, args, True)
    for d in DISPATCHES:
      total, branch = sent[d]
      print(f"| {ep} | {d} | {total / MiB:.2f} MiB | {total / (2 * bound):.2f} | "
            f"{branch / MiB:.2f} MiB | {balanced[d] * 1e3:.1f} ms | {skewed[d] * 1e3:.1f} ms |",
            flush=True)


if __name__ == "__main__":
  main()
