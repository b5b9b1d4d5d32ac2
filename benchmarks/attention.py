"""Self-attention tokens/s: the XLA path against the flash kernel of this machine's accelerator.

    python benchmarks/attention.py [--lengths 8192 32768] [--steps 5]

On a TPU (splash) or GPU (Pallas gpu_flash) it times one attention layer's forward + backward
with Scout's heads (40 query heads, 8 KV heads, head_dim 128, bf16, one row), for a NoPE layer
(the whole row) and a chunked RoPE layer (8192-token chunks), at each length, and prints tokens/s
of both paths and their ratio, measured alternately in one process. On a CPU there is no kernel to
time: it runs the kernels in Pallas interpret mode on a small case and prints their largest
difference from the XLA path instead.
"""
import argparse
import dataclasses
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import llama4_jax as l4
from llama4_jax import attention, flash, model

HEADS, KV_HEADS, HEAD_DIM, CHUNK = 40, 8, 128, 8192


def _inputs(length: int, dtype, seed=0, heads=HEADS, kv=KV_HEADS, dim=HEAD_DIM):
  r = np.random.RandomState(seed)
  return [jnp.asarray(r.randn(1, length, n, dim), dtype) for n in (heads, kv, kv)]


def _context(length: int, chunk: int):
  cfg = dataclasses.replace(l4.presets.tiny().text, attention_chunk_size=chunk)
  return model.token_context(cfg, 1, length)


def _timed(fn, args, steps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def accelerator(lengths, steps: int) -> None:
  kernel = {"tpu": flash.splash, "gpu": flash.gpu_flash}[jax.default_backend()]
  print(f"{jax.devices()[0].device_kind}: {kernel.__name__} vs XLA, fwd+bwd, 1 row, "
        f"{HEADS}/{KV_HEADS} heads x {HEAD_DIM}, bf16")
  for length in lengths:
    ctx = _context(length, CHUNK)
    for chunked in (False, True):
      window = CHUNK if chunked else None
      mask, ids = (ctx.chunk_mask_BTS if chunked else ctx.full_mask_BTS), ctx.ids_BT[int(chunked)]
      loss = {"xla": lambda q, k, v: jnp.sum(attention.attend_blocked(
                  q, k, v, mask, window, attention.QUERY_BLOCK).astype(jnp.float32)),
              "flash": lambda q, k, v: jnp.sum(kernel(q, k, v, ids, window).astype(jnp.float32))}
      args = _inputs(length, jnp.bfloat16)
      fns = {k: jax.jit(jax.grad(f, (0, 1, 2))) for k, f in loss.items()}
      times = {k: [] for k in fns}
      for _ in range(3):  # alternate: both see the same machine state
        for k, f in fns.items():
          times[k].append(_timed(f, args, steps))
      tps = {k: length / min(v) for k, v in times.items()}
      print(f"  {length:6d} tokens, {'chunked' if chunked else 'NoPE   '}: XLA {tps['xla']:10.0f} "
            f"tok/s, flash {tps['flash']:10.0f} tok/s, x{tps['flash'] / tps['xla']:.2f}")


def interpret_check() -> None:
  length, chunk = 256, 64
  ctx = _context(length, chunk)
  q, k, v = _inputs(length, jnp.float32, heads=4, kv=2, dim=64)
  print(f"{jax.devices()[0].device_kind}: no flash kernel to time; Pallas interpret mode, "
        f"{length} tokens, chunk {chunk}, fp32, largest |kernel - XLA|:")
  for name, kernel in (("splash", flash.splash), ("gpu_flash", flash.gpu_flash)):
    for chunked in (False, True):
      mask = ctx.chunk_mask_BTS if chunked else ctx.full_mask_BTS
      want = attention.attend(q, k, v, mask)
      got = partial(kernel, interpret=True)(q, k, v, ctx.ids_BT[int(chunked)],
                                            chunk if chunked else None)
      print(f"  {name:10s} {'chunked' if chunked else 'NoPE'}: {float(jnp.abs(got - want).max()):.2e}")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  if jax.default_backend() in ("tpu", "gpu"):
    accelerator(args.lengths, args.steps)
  else:
    interpret_check()


if __name__ == "__main__":
  main()
