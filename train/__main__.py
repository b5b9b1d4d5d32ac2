"""`llama4-train CONFIG.yaml [--set a.b=value ...]`, `llama4-train --report WORKDIR`.

CONFIG.yaml is a recipe (one run) or a `pipeline:` of stages (train/pipeline.py).

Multi-host: start one process per host with `--distributed` (SLURM, Open MPI, TPU pods and GKE are
detected by `jax.distributed`) or with `--coordinator HOST:PORT --num-processes N --process-id I`.
"""
import argparse
import sys
from pathlib import Path

from train import cli, workdir


def make_parser() -> argparse.ArgumentParser:
  parser = cli.Parser(prog="llama4-train", description=__doc__)
  parser.add_argument("config", nargs="?", help="YAML recipe (configs/...)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="typed override, e.g. --set optim.lr=1e-3 (repeatable)")
  parser.add_argument("--report", metavar="WORKDIR", help="only write WORKDIR/report.png")
  parser.add_argument("--distributed", action="store_true",
                      help="jax.distributed.initialize() with the cluster's auto-detection")
  parser.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
  parser.add_argument("--num-processes", type=int, help="processes (hosts) in the job")
  parser.add_argument("--process-id", type=int, help="this process's index")
  cli.add_debug(parser)
  return parser


def main(argv=None) -> int:
  if argv is None:  # the command itself (not a caller passing argv): see cli.exec_with_huge_pages
    cli.exec_with_huge_pages()
  parser = make_parser()
  args = parser.parse_args(argv)
  if args.config is None and not args.report:
    parser.error("a CONFIG.yaml is required (or --report WORKDIR)")
  try:
    return cli.run("llama4-train", lambda: _main(args), args.debug)
  except workdir.Interrupted as e:  # saved; a scheduler must not take the run as finished
    print(f"llama4-train: {e}", file=sys.stderr)
    return 143


def _main(args) -> int:
  if args.report:
    from train import report
    print(report.write(args.report))
    return 0
  from train import config as config_lib, pipeline
  recipe = config_lib.read_yaml(args.config)
  staged = "pipeline" in recipe
  if staged:
    pipeline.stages(recipe, tuple(args.set))  # every stage checked before anything starts
  else:
    cfg = config_lib.load(args.config, tuple(args.set))
  if args.distributed or args.coordinator or args.num_processes or args.process_id is not None:
    import jax
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  if staged:
    first = pipeline.stages(recipe, tuple(args.set))[0][1]
    steps = workdir.use_compile_cache(first.compile_cache and Path(pipeline.section(recipe).workdir)
                                      / first.compile_cache)  # one cache for every stage
    pipeline.run(recipe, tuple(args.set), steps)
    return 0
  from train import loop
  steps = workdir.use_compile_cache(cfg.compile_cache and Path(cfg.workdir) / cfg.compile_cache)
  record = loop.run(cfg, steps)
  if record:
    print(f"step {record['step']}: loss {record['loss']:.4f}, {record['tokens_per_s']:.0f} tok/s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
