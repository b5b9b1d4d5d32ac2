"""Model FLOPs, hardware peak and MFU; metric sinks (metrics.jsonl and TensorBoard)."""
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import llama4_jax as l4
from train import health
from train.schema import to_dict

# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
             "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def active_matmul_params(cfg: l4.TextConfig) -> int:
  """Parameters a token multiplies through (active experts only; the embedding gather is free)."""
  d, h = cfg.hidden_size, cfg.head_dim
  total = d * h * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
  total *= cfg.num_hidden_layers
  for i in range(cfg.num_hidden_layers):
    if cfg.is_moe(i):
      total += 3 * d * cfg.intermediate_size * (cfg.num_experts_per_tok + 1)
      total += d * cfg.num_local_experts
    else:
      total += 3 * d * cfg.intermediate_size_mlp
  return total + d * cfg.vocab_size


def train_flops_per_token(cfg: l4.TextConfig, seq_len: int) -> float:
  """6 * active params + causal attention (QK^T and PV over the keys a query sees), x3 for
  forward + backward."""
  attn = 0.0
  for i in range(cfg.num_hidden_layers):
    window = seq_len
    if cfg.is_chunked(i) and cfg.attention_chunk_size is not None:
      window = min(seq_len, cfg.attention_chunk_size)
    attn += 4 * cfg.num_attention_heads * cfg.head_dim * (window + 1) / 2
  return 3 * (2 * active_matmul_params(cfg) + attn)


def measure_matmul_peak(dtype=jnp.float32, n: int = 1024, repeats: int = 5, trials: int = 5) -> float:
  """FLOP/s of a square matmul on the default device, best of `trials` (the CPU 'peak')."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(trials):
    t0 = time.perf_counter()
    for _ in range(repeats):
      out = f(a)
    out.block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 * repeats / best


def peak_flops(override: float | None, dtype) -> tuple[float, str]:
  """(peak FLOP/s per device, where it came from)."""
  if override:
    return override, "config"
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_BF16.items():
    if name in kind:
      return flops, f"datasheet {name}"
  return measure_matmul_peak(dtype), f"measured matmul on {kind}"


def _records_before(path: Path, step: int) -> list[str]:
  """metrics.jsonl's lines of steps before `step` (later ones are recomputed after a restart).
  A torn last line (a kill mid-write) is dropped; a bad line elsewhere raises, named."""
  from train import data
  return [line for _, record, line in data.jsonl_records(path, torn_tail=True)
          if record["step"] < step]


def _summary_writer(path: Path):
  """tensorboardX's SummaryWriter, imported without its optional torch import (3 s of every
  start where torch is installed; scalars need none of it)."""
  import sys
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
  else:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
      from tensorboardX import SummaryWriter
    finally:
      del sys.modules["torch"]
  return SummaryWriter(str(path))


class Sinks:
  """metrics.jsonl (one object per step) and TensorBoard scalars, on process 0 only."""

  def __init__(self, workdir: Path, resume_step: int):
    self.active = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self.tb = None
    if not self.active:
      return
    if self.path.exists():
      self.path.write_text("".join(l + "\n" for l in _records_before(self.path, resume_step)))
    self.tb = _summary_writer(workdir / "tensorboard")
    self.file = self.path.open("a")

  def write(self, record: dict) -> None:
    if not self.active:
      return
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    for k, v in record.items():
      if isinstance(v, (int, float)) and k != "step":
        self.tb.add_scalar(k, v, record["step"])

  def close(self):
    if self.active:
      self.file.close()
      self.tb.close()


def load_ratio(counts: np.ndarray) -> np.ndarray:
  """max / mean of tokens per expert, per MoE layer ([..., E] -> [...]): 1 is balanced, E is
  every token on one expert (the busiest expert device's share of the work, x ep)."""
  counts = np.asarray(counts, np.float64)
  return np.round(counts.max(-1) / np.maximum(counts.mean(-1), 1e-12), 4)


def to_record(step: int, metrics: dict, seconds: float, tokens: int, flops_per_token: float,
              peak: float, devices: int) -> dict:
  """Host-side record of one step's fetched metrics; `tokens` processed in `seconds`."""
  rec = {"step": step}
  for k, v in metrics.items():
    a = np.asarray(v)
    rec[k] = a.tolist() if a.ndim else float(a)
  if np.ndim(rec.get("expert_counts")) == 2 and np.size(rec["expert_counts"]):
    rec["expert_load_max_mean"] = load_ratio(np.asarray(rec["expert_counts"])).tolist()
  rec["tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
  rec["mfu"] = rec["tokens_per_s"] * flops_per_token / (peak * devices)
  return rec


def run_peak(cfg, workdir: Path, start: int) -> tuple[float, str]:
  """`peak_flops` of the run; a restart keeps the peak its workdir measured on this device kind
  and dtype (WORKDIR/config.json): MFU stays comparable across restarts, and the restart skips
  the 0.5 s of matmul timing."""
  kind, path = jax.devices()[0].device_kind, workdir / "config.json"
  if start and not cfg.peak_flops_per_device and path.is_file():
    try:
      old = json.loads(path.read_text())
      if (old["peak_source"] == f"measured matmul on {kind}"
          and old["model"]["compute_dtype"] == cfg.model.compute_dtype):
        return float(old["peak_flops"]), old["peak_source"]
    except (ValueError, KeyError, TypeError):  # an older or damaged file: measured again
      pass
  return peak_flops(cfg.peak_flops_per_device, jnp.dtype(cfg.model.compute_dtype))


class StepLog:
  """The loop's record keeping: each fetched step's record (rates from the host clock), its health
  check, metrics.jsonl / TensorBoard every `log_every` steps (and the run's first step, with
  `startup_s`: seconds from importing `train` to that step's metrics) and the progress bar;
  WORKDIR/config.json with the peak."""

  def __init__(self, cfg, model_cfg: l4.Config, devices: int, workdir: Path, start: int, ckpt):
    from tqdm import tqdm
    self.sinks = Sinks(workdir, start)  # a bad metrics.jsonl stops the run here
    self.flops_per_token = train_flops_per_token(model_cfg.text, cfg.data.seq_len)
    self.peak, source = run_peak(cfg, workdir, start)
    (workdir / "config.json").write_text(json.dumps(
        {**to_dict(cfg), "peak_flops": self.peak, "peak_source": source}, indent=2))
    self.tokens, self.devices, self.ckpt = cfg.data.batch_size * cfg.data.seq_len, devices, ckpt
    self.every, self.last_step = cfg.log_every, cfg.steps - 1
    self.health = health.Health(cfg.optim.skip_nonfinite)
    self.bar = tqdm(total=cfg.steps, initial=start, disable=jax.process_index() != 0, desc="train")
    self.last, self.first = time.perf_counter(), start

  def flush(self, n: int, device_metrics, host_metrics: dict) -> dict:
    """Step n's record; raises health.Diverged (after recording it) on a step past the limit."""
    fetched = jax.device_get(device_metrics)  # blocks on step n only; n+1 is already queued
    now = time.perf_counter()
    rec = to_record(n, fetched, now - self.last, self.tokens, self.flops_per_token, self.peak,
                    self.devices)
    self.last = now
    rec.update(host_metrics)
    if n == self.first:  # imports, setup, restore and the first compile: what a compile cache cuts
      import train
      rec["startup_s"] = now - train.STARTED
    try:
      self.health.check(rec, self.ckpt.latest_step())
    finally:  # every `log_every`-th step, the last, and any non-finite one (it raised the alarm)
      if n % self.every == 0 or n in (self.first, self.last_step) or rec.get("nonfinite"):
        self.sinks.write(rec)
    self.bar.update(1)
    self.bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
    return rec

  def close(self) -> None:
    self.sinks.close()
    self.bar.close()
