"""`llama4-plan CONFIG.yaml --devices N [--set ...]`: per-device memory of a recipe's training step
on a pod, found on a laptop.

It builds the recipe's real train step (the same `loop.build` a run uses) on N fake CPU devices,
lowers and compiles it against abstract inputs (nothing is allocated), and prints, per device:
params and optimizer state from their shardings, and the compiled executable's argument, output
and temporary bytes. XLA:CPU's buffer assignment stands in for the accelerator's, so temporaries
are an estimate (no GPU/TPU-specific fusion or rematerialisation).
"""
import argparse
import json
import math
import os
import sys
import time

GiB = 2**30


def _per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes one device holds: each leaf's shard (the largest, for uneven splits)."""
  import jax
  leaves = jax.tree.leaves(abstract_tree)
  shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return sum(math.prod(sh.shard_shape(a.shape)) * a.dtype.itemsize for a, sh in zip(leaves, shs))


def plan(config: str, overrides: tuple[str, ...] = ()) -> dict:
  """Compiles `config`'s train step on the current (fake) devices; returns the figures."""
  import jax
  from train import config as config_lib, loop
  cfg = config_lib.load(config, overrides)
  model_cfg = cfg.model.build()
  t = loop.build(cfg, model_cfg)
  state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                       t.abstract_state.replace(frozen=t.abstract_frozen), t.state_shardings)
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  batch = _batch(cfg, model_cfg, shape, t.batch_sharding)
  start = time.perf_counter()
  compiled = t.train_step.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  return {
      "config": config, "devices": jax.device_count(), "mesh": dict(t.mesh.shape),
      "params": sum(math.prod(a.shape) for a in jax.tree.leaves(t.abstract_state.params)),
      "param_dtype": cfg.model.param_dtype, "compute_dtype": cfg.model.compute_dtype,
      "remat": cfg.model.remat, "batch": shape,
      "params_bytes": _per_device_bytes(t.abstract_state.params, t.state_shardings.params),
      "optimizer_bytes": _per_device_bytes(t.abstract_state.opt_state,
                                           t.state_shardings.opt_state),
      "frozen_bytes": (0 if t.abstract_frozen is None else
                       _per_device_bytes(t.abstract_frozen, t.state_shardings.frozen)),
      "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
      "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
      # donated state: outputs reuse the arguments' buffers (alias), counted once
      "peak_bytes": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                     - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
      "compile_s": round(time.perf_counter() - start, 1),
  }


def _batch(cfg, model_cfg, shape, sharding) -> dict:
  """Abstract inputs of the recipe's stage, as its data pipeline makes them."""
  import jax
  import jax.numpy as jnp
  spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  if cfg.dpo is not None:
    return {**{f"{k}_{f}": spec(shape) for k in ("chosen", "rejected") for f in ("tokens", "mask")},
            "ref_logps": spec((shape[0], 2), jnp.float32)}
  if cfg.rl is not None:
    return {**{k: spec(shape) for k in ("tokens", "attention_mask", "completion_mask")},
            "advantages": spec(shape[:1], jnp.float32),
            **{k: spec(shape, jnp.float32) for k in ("old_logps", "ref_logps")}}
  batch = {k: spec(shape) for k in ("tokens", "segment_ids", "positions")}
  if cfg.data.chat or model_cfg.vision is not None:
    batch["loss_mask"] = spec(shape)
  if model_cfg.vision is not None:  # mmdata's rows: each row's padded tiles
    s = model_cfg.vision.image_size
    batch["pixel_values"] = spec((shape[0], cfg.data.row_tiles, 3, s, s), jnp.bfloat16)
  return batch


def format_plan(p: dict) -> str:
  mesh = " x ".join(f"{k} {v}" for k, v in p["mesh"].items() if v > 1) or "1 device"
  rows = [("params (sharded)", p["params_bytes"]),
          ("optimizer state (sharded)", p["optimizer_bytes"]),
          ("frozen base (LoRA, sharded)", p["frozen_bytes"]), ("arguments", p["argument_bytes"]),
          ("outputs (not aliased)", p["output_bytes"] - p["alias_bytes"]),
          ("temporaries", p["temp_bytes"]), ("peak", p["peak_bytes"])]
  lines = [f"{p['config']}: {p['params']:,} params on {p['devices']} devices ({mesh}); "
           f"batch {p['batch'][0]} x {p['batch'][1]}, {p['param_dtype']} params, "
           f"{p['compute_dtype']} compute, remat {p['remat']}; compiled in {p['compile_s']} s",
           "per device:"]
  lines += [f"  {name:<28}{b / GiB:10.2f} GiB" for name, b in rows]
  return "\n".join(lines)


def main(argv=None) -> int:
  from train import cli
  parser = cli.Parser(prog="llama4-plan", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("config", help="YAML recipe, e.g. configs/scout/pretrain.yaml")
  parser.add_argument("--devices", type=int, required=True, help="simulated device count")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--json", action="store_true", help="print the figures as JSON")
  cli.add_debug(parser)
  args = parser.parse_args(argv)
  if not 1 <= args.devices <= 65536:
    parser.error(f"--devices must be in [1, 65536], got {args.devices}")
  if "jax" in sys.modules:
    raise RuntimeError("llama4-plan must set the fake device count before jax is imported")
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")

  def run() -> int:
    p = plan(args.config, tuple(args.set))
    print(json.dumps(p) if args.json else format_plan(p))
    return 0
  return cli.run("llama4-plan", run, args.debug)


if __name__ == "__main__":
  sys.exit(main())
