"""`llama4-plan CONFIG.yaml (--topology v5p:8x8x4 | --devices N) [--set ...]`: per-device memory,
FLOPs, collective traffic and a roofline of a recipe's training step on a pod, found on a laptop.
With `--rules`, only where each parameter lives (sharding/report.py): no compile, no devices.

It builds the recipe's real train step (the same `loop.build` a run uses), lowers and compiles it
against abstract inputs (nothing is allocated) and reads the compiled program:
- `--topology NAME` compiles it with the TPU compiler (libtpu, `pip install -e ".[tpu]"`) for that
  pod slice, with the target's kernels (splash attention, ragged_dot): the figures are the TPU's.
- `--devices N` compiles it with XLA:CPU on N fake devices (no libtpu needed). XLA:CPU's buffer
  assignment and fusion stand in for the accelerator's, so its temporaries overstate a TPU's
  (3.8x on one Scout case).
Per device it prints params and optimizer state (from their shardings), the program's arguments,
temporaries and peak against the chip's HBM, model FLOPs (`metrics.train_flops_per_token` x
tokens / devices: 6 x active params + causal attention, no rematerialisation), collective bytes
sent by kind (`train/hlo.py`), and a roofline: step time >= max(FLOPs / peak, collective bytes /
ICI bandwidth), so MFU <= FLOPs / (peak x that time).
"""
import argparse
import json
import math
import os
import re
import sys
import time

GiB = 2**30
# Per chip: HBM GiB, dense bf16 FLOP/s, ICI bytes/s (vendor figures; ICI: all links, one direction)
CHIPS = {"v4": (32, 275e12, 300e9), "v5e": (16, 197e12, 200e9), "v5p": (95, 459e12, 600e9),
         "v6e": (32, 918e12, 448e9)}
TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?$")


def chip(topology: str) -> tuple[str, int]:
  """(generation, chip count) of a topology name like v5p:8x8x4; ValueError naming a bad one."""
  m = TOPOLOGY.match(topology)
  if not m:
    raise ValueError(f"--topology {topology!r}: expected GEN:AxB or GEN:AxBxC with GEN one of "
                     f"{sorted(CHIPS)} (e.g. v5p:2x2x1, v5e:4x4, v6e:8x8)")
  return m.group(1), math.prod(int(d) for d in m.groups()[1:] if d)


def topology_devices(topology: str) -> list:
  """TPU device descriptions of `topology` (no TPU needed: libtpu compiles for them)."""
  chip(topology)
  try:
    from jax.experimental import topologies
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except (RuntimeError, ValueError) as e:  # no libtpu, or a shape the generation lacks
    raise ValueError(f"--topology {topology}: {' '.join(str(e).split())[:300]} (is libtpu "
                     f"installed? pip install -e \".[tpu]\")") from e


def _per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes one device holds: each leaf's shard (the largest, for uneven splits)."""
  import jax
  leaves = jax.tree.leaves(abstract_tree)
  shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return sum(math.prod(sh.shard_shape(a.shape)) * a.dtype.itemsize for a, sh in zip(leaves, shs))


def compile_step(config: str, overrides: tuple[str, ...] = (), topology: str | None = None):
  """(run config, trainer, compiled train step, compile seconds) for the current (fake) devices or
  a TPU topology."""
  import jax
  from train import config as config_lib, loop
  cfg = config_lib.load(config, overrides)
  model_cfg = cfg.model.build()
  t = loop.build(cfg, model_cfg, topology_devices(topology) if topology else None)
  state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                       t.abstract_state.replace(frozen=t.abstract_frozen), t.state_shardings)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=t.batch_sharding)
           for k, (shape, dtype) in t.stage.batch_spec(t.model_cfg).items()}
  start = time.perf_counter()
  # Pallas TPU kernels ask the current mesh's device kind, and reject 'highest' precision dots
  precision = "default" if topology else jax.config.jax_default_matmul_precision
  with jax.set_mesh(t.mesh), jax.default_matmul_precision(precision):
    compiled = t.train_step.lower(state, batch).compile()
  return cfg, t, compiled, time.perf_counter() - start


def plan(config: str, overrides: tuple[str, ...] = (), topology: str | None = None) -> dict:
  """Compiles `config`'s train step; returns the figures (see the module docstring)."""
  return figures(config, *compile_step(config, overrides, topology), topology)


def figures(config: str, cfg, t, compiled, seconds: float, topology: str | None) -> dict:
  """The plan's figures of a compiled train step (`compile_step`'s results)."""
  import jax
  from train import hlo, metrics
  mem, devices = compiled.memory_analysis(), t.mesh.size
  tokens = cfg.data.batch_size * cfg.data.seq_len
  flops = metrics.train_flops_per_token(t.model_cfg.text, cfg.data.seq_len) * tokens / devices
  text = compiled.as_text()
  comm = hlo.collective_bytes(text, devices)
  branch = hlo.collective_bytes(text, devices, conditional=True)  # the MoE's overflow pass
  hbm, peak, ici = CHIPS[chip(topology)[0]] if topology else (None, None, None)
  step_s = max(flops / peak, sum(comm.values()) / ici) if topology else None
  return {
      "config": config, "target": topology or f"{devices} fake CPU devices", "devices": devices,
      "mesh": dict(t.mesh.shape), "attention": sharding_kind(t.mesh, cfg),
      "params": sum(math.prod(a.shape) for a in jax.tree.leaves(t.abstract_state.params)),
      "param_dtype": cfg.model.param_dtype, "compute_dtype": cfg.model.compute_dtype,
      "remat": cfg.model.remat, "batch": (cfg.data.batch_size, cfg.data.seq_len),
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
      "hbm_bytes": hbm and hbm * GiB, "flops": flops, "collective_bytes": comm,
      "conditional_collective_bytes": branch,
      "peak_flops": peak, "ici_bytes_per_s": ici, "step_s_lower_bound": step_s,
      "mfu_upper_bound": step_s and flops / (peak * step_s), "compile_s": round(seconds, 1),
  }


def sharding_kind(mesh, cfg) -> str:
  from sharding import kernels
  return kernels.attention_kind(mesh, cfg.model.attention)


def _size(b: float) -> str:
  return f"{b / GiB:10.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:10.2f} MiB"


def format_plan(p: dict) -> str:
  mesh = " x ".join(f"{k} {v}" for k, v in p["mesh"].items() if v > 1) or "1 device"
  hbm = f" of {p['hbm_bytes'] / GiB:.0f} GiB HBM" if p["hbm_bytes"] else ""
  rows = [("params (sharded)", p["params_bytes"]),
          ("optimizer state (sharded)", p["optimizer_bytes"]),
          ("frozen base (LoRA, sharded)", p["frozen_bytes"]), ("arguments", p["argument_bytes"]),
          ("outputs (not aliased)", p["output_bytes"] - p["alias_bytes"]),
          ("temporaries", p["temp_bytes"]), (f"peak{hbm}", p["peak_bytes"])]
  lines = [f"{p['config']}: {p['params']:,} params on {p['target']} ({mesh}); batch "
           f"{p['batch'][0]} x {p['batch'][1]}, {p['param_dtype']} params, {p['compute_dtype']} "
           f"compute, remat {p['remat']}, {p['attention']} attention; compiled in "
           f"{p['compile_s']} s", "per device:"]
  lines += [f"  {name:<28}{_size(b)}" for name, b in rows]
  lines.append(f"  {'model FLOPs per step':<28}{p['flops'] / 1e12:10.3f} TFLOP")
  lines += [f"  {kind + ' sent':<28}{_size(b)}" for kind, b in p["collective_bytes"].items() if b]
  lines += [f"  {kind + ' sent':<28}{_size(b)} only when a conditional branch runs (MoE overflow)"
            for kind, b in p["conditional_collective_bytes"].items() if b]
  if p["step_s_lower_bound"]:
    lines.append(f"  roofline: step >= {p['step_s_lower_bound']:.3f} s = max(FLOPs / "
                 f"{p['peak_flops'] / 1e12:.0f} TFLOP/s, collectives / "
                 f"{p['ici_bytes_per_s'] / 1e9:.0f} GB/s ICI), MFU <= "
                 f"{p['mfu_upper_bound']:.1%}")
  return "\n".join(lines)


def rules_report(config: str, overrides: tuple[str, ...], devices: int) -> str:
  """`llama4-plan --rules`: `sharding.report.table` for the recipe's model on its mesh resolved
  for `devices` devices, params stored as `model.param_dtype`."""
  import sharding
  from sharding import report
  from train import config as config_lib
  cfg = config_lib.load(config, overrides)
  mesh_shape = sharding.resolve(cfg.mesh, devices)
  rows = report.placements(cfg.model.build(), mesh_shape, cfg.model.param_dtype)
  mesh = " x ".join(f"{a} {n}" for a, n in mesh_shape.items() if n > 1) or "one device"
  return f"mesh: {mesh} ({devices} devices)\n" + report.table(rows)


def main(argv=None) -> int:
  from train import cli
  parser = cli.Parser(prog="llama4-plan", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("config", help="YAML recipe, e.g. configs/scout/pretrain.yaml")
  target = parser.add_mutually_exclusive_group(required=True)
  target.add_argument("--topology", help="TPU slice to compile for, e.g. v5p:8x8x4 (libtpu)")
  target.add_argument("--devices", type=int, help="fake CPU device count (XLA:CPU estimate)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--json", action="store_true", help="print the figures as JSON")
  parser.add_argument("--rules", action="store_true",
                      help="only the sharding rules: every parameter's logical axes, PartitionSpec "
                           "and bytes per device on the recipe's mesh (no compile, no devices)")
  cli.add_debug(parser)
  args = parser.parse_args(argv)
  if args.devices is not None and not 1 <= args.devices <= 65536:
    parser.error(f"--devices must be in [1, 65536], got {args.devices}")
  if "jax" in sys.modules:
    raise RuntimeError("llama4-plan must set the fake device count before jax is imported")
  os.environ["JAX_PLATFORMS"] = "cpu"  # a topology's TPU devices are descriptions, not a backend
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile beside other libtpu users
  if args.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")

  def run() -> int:
    if args.rules:
      print(rules_report(args.config, tuple(args.set), args.devices or chip(args.topology)[1]))
      return 0
    p = plan(args.config, tuple(args.set), args.topology)
    print(json.dumps(p) if args.json else format_plan(p))
    return 0
  return cli.run("llama4-plan", run, args.debug)


if __name__ == "__main__":
  sys.exit(main())
