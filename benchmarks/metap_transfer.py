"""Does the learning rate tuned on a proxy transfer? LR sweeps of the tiny Llama 4 (dense + MoE with
a shared expert, RoPE + NoPE layers, QK norm) at several widths and depths, under the `mup`
default and the `sp` control, in the same run.

    python benchmarks/metap_transfer.py [--out benchmarks/out] [--steps 200] [--quick]

Widths 32..256 at 2 layers (proxy: width 32), then depths 2..8 layers at width 64 (proxy: 2 layers);
every LR of a grid trains at once (vmap) on fresh batches of a learnable Markov chain; the loss is
the mean of the last 20 steps, the optimum the vertex of a parabola through the best grid point and
its neighbours (`metap_check.fitted_optimum`). Writes metap_transfer.png (loss vs LR, one curve per
width / depth, both parametrizations) and metap_transfer.json (every loss and fitted optimum).
Under `mup` the optimum should move <= 1 octave across widths and the best loss should not get
worse with width; under `sp` the optimum moves with width.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

from train import metap_check as mc
from train.config import MetaPConfig, OptimConfig

INIT_STD = 0.1  # the proxy's init std (a tuned hyperparameter; the table scales it)


def run_family(name: str, sizes: list[int], make_cfg, base_cfg, log2_lrs, opt, batches) -> dict:
  base = mc.base_overrides(base_cfg)
  results = {"sizes": sizes, "log2_lrs": log2_lrs.tolist()}
  for preset in ("mup", "sp"):
    results[preset] = {"loss": [], "log2_opt": [], "best": []}
  for size in sizes:
    t = time.perf_counter()
    losses = mc.sweep(make_cfg(size), {p: MetaPConfig(preset=p, base=base) for p in ("mup", "sp")},
                      opt, list(2.0 ** log2_lrs), batches)
    for preset, loss in losses.items():
      r = results[preset]
      r["loss"].append([float(x) for x in loss])
      r["log2_opt"].append(mc.fitted_optimum(log2_lrs, loss))
      r["best"].append(float(np.nanmin(np.where(np.isfinite(loss), loss, np.nan))))
    print(f"{name} {size}: mup opt 2^{results['mup']['log2_opt'][-1]:.2f} best "
          f"{results['mup']['best'][-1]:.4f} | sp opt 2^{results['sp']['log2_opt'][-1]:.2f} best "
          f"{results['sp']['best'][-1]:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
  for preset in ("mup", "sp"):
    r = results[preset]
    r["opt_spread_octaves"] = float(np.ptp(r["log2_opt"]))
    r["opt_slope"] = float(np.polyfit(np.log2(sizes), r["log2_opt"], 1)[0])
  return results


def plot(results: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
  for row, (family, label) in enumerate((("width", "width"), ("depth", "layers"))):
    res = results[family]
    for col, preset in enumerate(("mup", "sp")):
      ax = axes[row, col]
      for size, loss, opt in zip(res["sizes"], res[preset]["loss"], res[preset]["log2_opt"]):
        line, = ax.plot(res["log2_lrs"], loss, marker="o", ms=3, label=f"{label} {size}")
        ax.axvline(opt, color=line.get_color(), ls=":", lw=1)
      ax.set_title(f"{preset}: {family} (optimum spread {res[preset]['opt_spread_octaves']:.2f} "
                   f"octaves)")
      ax.set_xlabel("log2 peak LR")
      ax.set_ylabel("train loss (last 20 steps)")
      ax.legend(fontsize=8)
      finite = [x for l in res[preset]["loss"] for x in l if np.isfinite(x)]
      ax.set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 2.0))
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
  ap.add_argument("--steps", type=int, default=150)
  ap.add_argument("--quick", action="store_true", help="3 widths, 2 depths, 5 LRs (a smoke run)")
  args = ap.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  log2_lrs = np.arange(-11.0, -3.0, 1.0) if not args.quick else np.arange(-9.0, -4.0, 1.0)
  opt = OptimConfig(schedule="constant", warmup_steps=args.steps // 10, weight_decay=0.1,
                    clip_norm=1e9, eps=1e-12)
  batches = mc.markov_batches(args.steps, 16, 32)
  widths = [32, 64, 128, 256] if not args.quick else [32, 64, 128]
  depths = [2, 4, 8] if not args.quick else [2, 4]
  t = time.perf_counter()
  results = {
      "width": run_family("width", widths, lambda w: mc.width_config(w, init_std=INIT_STD),
                          mc.width_config(32, init_std=INIT_STD), log2_lrs, opt, batches),
      "depth": run_family("depth", depths,
                          lambda n: mc.width_config(64, layers=n, init_std=INIT_STD),
                          mc.width_config(64, layers=2, init_std=INIT_STD), log2_lrs, opt, batches),
      "steps": args.steps, "batch": [16, 32], "seconds": None}
  results["seconds"] = round(time.perf_counter() - t)
  (args.out / "metap_transfer.json").write_text(json.dumps(results, indent=1))
  plot(results, args.out / "metap_transfer.png")
  for family in ("width", "depth"):
    for preset in ("mup", "sp"):
      r = results[family][preset]
      print(f"{family:5} {preset:3}: optimum log2 LR {[round(x, 2) for x in r['log2_opt']]} "
            f"(spread {r['opt_spread_octaves']:.2f} octaves, slope {r['opt_slope']:+.2f}); "
            f"best loss {[round(x, 4) for x in r['best']]}")
  print(f"{results['seconds']} s; wrote {args.out}/metap_transfer.png and .json")


if __name__ == "__main__":
  main()
