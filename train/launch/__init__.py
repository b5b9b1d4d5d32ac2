"""`llama4-launch ENGINE CONFIG.yaml --hosts N --devices-per-host D`: renders a multi-host launch
file that starts one `llama4-train` process per host, for SkyPilot, SLURM or GKE/XPK.

The recipe is checked first: it must parse, its mesh must cover hosts x devices-per-host devices,
and its batch must split evenly over the hosts. Templates are the files next to this module;
`{{name}}` placeholders are filled from the options, and one left unfilled is an error.
"""
import argparse
import re
import shlex
import sys
from pathlib import Path

from llama4_jax import hf_io
from train import cli, config as config_lib
import sharding

TEMPLATES = {"skypilot": "skypilot.yaml", "slurm": "slurm.sbatch", "xpk": "xpk.sh"}
DEFAULTS = {"accelerator": "H100:8", "port": "8476", "time": "7-00:00:00", "cluster": "llama4",
            "tpu_type": "v5p-512", "slices": "1", "image": "gcr.io/PROJECT/llama4-jax:latest"}


def check(cfg: config_lib.RunConfig, hosts: int, devices_per_host: int) -> None:
  """The recipe fits the pod: raises ValueError naming what does not."""
  sizes = sharding.resolve(cfg.mesh, hosts * devices_per_host)
  if cfg.data.batch_size % hosts:
    raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by {hosts} hosts")
  batch_devices = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  if cfg.data.batch_size % batch_devices:
    raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by the "
                     f"{batch_devices} devices the batch is split over (data x fsdp x expert)")
  sharding.partition_specs(cfg.model.build(), sizes)  # e.g. experts not divisible by `expert`


def _job_name(config: str) -> str:
  """configs/scout/pretrain.yaml -> llama4-scout-pretrain"""
  path = Path(config)
  return "-".join(["llama4", *([path.parent.name] if path.parent.name else []), path.stem])


def render(engine: str, config: str, hosts: int, devices_per_host: int, overrides=(),
           **params: str) -> str:
  if engine not in TEMPLATES:
    raise ValueError(f"unknown engine {engine!r}; choose one of {sorted(TEMPLATES)}")
  cfg = config_lib.load(config, tuple(overrides))
  check(cfg, hosts, devices_per_host)
  values = {**DEFAULTS, "name": _job_name(config), **{k: str(v) for k, v in params.items()
                                                      if v is not None},
            "config": shlex.quote(config), "hosts": str(hosts),
            "devices_per_host": str(devices_per_host),
            "overrides": "".join(f" --set {shlex.quote(o)}" for o in overrides)}
  text = (Path(__file__).parent / TEMPLATES[engine]).read_text()

  def fill(m: re.Match) -> str:
    if m.group(1) not in values:
      raise ValueError(f"template {TEMPLATES[engine]} needs {m.group(1)!r}, which has no value")
    return values[m.group(1)]
  return re.sub(r"\{\{(\w+)\}\}", fill, text)


def main(argv=None) -> int:
  p = cli.Parser(prog="llama4-launch", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("engine", choices=sorted(TEMPLATES))
  p.add_argument("config", help="YAML recipe, e.g. configs/scout/pretrain.yaml")
  p.add_argument("--hosts", type=int, required=True, help="machines (one process each)")
  p.add_argument("--devices-per-host", type=int, required=True, help="GPUs or TPU chips per host")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="recipe override, checked here and passed on to llama4-train")
  for key, default in DEFAULTS.items():
    p.add_argument(f"--{key.replace('_', '-')}", dest=key, help=f"default: {default}")
  p.add_argument("--name", help="job name (default: llama4-<dir>-<recipe>)")
  p.add_argument("-o", "--output", help="write here instead of stdout")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
  cli.add_debug(p)
  args = vars(p.parse_args(argv))
  for flag in ("hosts", "devices_per_host"):
    if args[flag] < 1:
      p.error(f"--{flag.replace('_', '-')} must be >= 1, got {args[flag]}")
  out, debug, overwrite = args.pop("output"), args.pop("debug"), args.pop("overwrite")
  recipe = args["config"]

  def launch() -> int:
    text = render(args.pop("engine"), args.pop("config"), args.pop("hosts"),
                  args.pop("devices_per_host"), args.pop("set"), **args)
    if out:
      hf_io.check_output(out, (recipe,), overwrite)  # never over the recipe itself
      Path(out).write_text(text)
    else:
      sys.stdout.write(text)
    return 0
  return cli.run("llama4-launch", launch, debug)


if __name__ == "__main__":
  sys.exit(main())
