"""`llama4-train CONFIG.yaml [--set a.b=value ...]`, `llama4-train --report WORKDIR`."""
import argparse
import sys

from train import config as config_lib


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="llama4-train", description=__doc__)
  parser.add_argument("config", nargs="?", help="YAML recipe (configs/...)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="typed override, e.g. --set optim.lr=1e-3 (repeatable)")
  parser.add_argument("--report", metavar="WORKDIR", help="only write WORKDIR/report.png")
  args = parser.parse_args(argv)
  if args.report:
    from train import report
    print(report.write(args.report))
    return 0
  if args.config is None:
    parser.error("a CONFIG.yaml is required (or --report WORKDIR)")
  try:
    cfg = config_lib.load(args.config, tuple(args.set))
  except (config_lib.ConfigError, FileNotFoundError) as e:
    print(f"llama4-train: {e}", file=sys.stderr)
    return 2
  from train import loop
  record = loop.run(cfg)
  if record:
    print(f"step {record['step']}: loss {record['loss']:.4f}, {record['tokens_per_s']:.0f} tok/s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
