"""report.png of a workdir: the loss curve, the expert load (MoE layers x experts) and each MoE
layer's max / mean load over the steps."""
from pathlib import Path

import numpy as np

from train import data, metrics


def read_metrics(workdir: Path) -> list[dict]:
  path = Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a training workdir?")
  return [record for _, record, _ in data.jsonl_records(path, torn_tail=True)]


def write(workdir: Path) -> Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read_metrics(workdir)
  steps = [r["step"] for r in records]
  loss = [r["loss"] for r in records]
  counts = np.asarray([r["expert_counts"] for r in records], np.float64)  # [steps, L_moe, E]
  fig, (ax_loss, ax_load, ax_ratio) = plt.subplots(1, 3, figsize=(18, 4.5))
  ax_loss.plot(steps, loss, lw=1)
  ax_loss.set(xlabel="step", ylabel="loss", title="training loss", yscale="log")
  ax_loss.grid(alpha=0.3)
  if counts.ndim == 3 and counts.shape[1] > 0:
    tail = counts[len(counts) * 4 // 5:].sum(0)  # the last 20% of steps
    share = tail / np.maximum(tail.sum(-1, keepdims=True), 1)
    im = ax_load.imshow(share, aspect="auto", cmap="viridis", vmin=0.0)
    ax_load.set(xlabel="expert", ylabel="MoE layer (in order)", xticks=range(share.shape[1]),
                yticks=range(share.shape[0]), title="share of tokens per expert (last 20% of steps)")
    fig.colorbar(im, ax=ax_load)
    ratio = metrics.load_ratio(counts)  # [steps, L_moe]
    for layer in range(ratio.shape[1]):
      ax_ratio.plot(steps, ratio[:, layer], lw=1, label=f"MoE layer {layer}")
    ax_ratio.axhline(1.0, color="gray", lw=0.5)
    ax_ratio.set(xlabel="step", ylabel="max / mean tokens per expert",
                 title="expert load imbalance (1 = balanced)")
    ax_ratio.legend(fontsize="small")
  else:
    ax_load.set_axis_off()
    ax_ratio.set_axis_off()
  fig.tight_layout()
  out = Path(workdir) / "report.png"
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
