"""Training-step throughput on this machine: ours vs HF transformers (torch), same config and batch.

    python benchmarks/train_step.py [--steps 10] [--skip-hf]

Prints tokens/s, model-FLOPs utilisation against the fp32 matmul peak measured in the same run,
and the ratio to HF's `Llama4ForCausalLM` + torch AdamW on the identical `bench` config:
d 512, 8 layers, 8 heads / 2 KV, head_dim 64, 8 experts top-1, expert width 1024, dense width
2048, MoE every 2nd layer, vocab 8192, batch 4 x 512, fp32.
"""
import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import llama4_jax as l4
from train import config as run_config, metrics, optim, step as step_lib
from train.stages import lm as pretrain

BENCH = dataclasses.replace(
    l4.presets.tiny().text, vocab_size=8192, hidden_size=512, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=8,
    num_experts_per_tok=1, intermediate_size=1024, intermediate_size_mlp=2048,
    interleave_moe_layer_step=2, attention_chunk_size=8192, floor_scale=8192,
    rope_theta=500000.0, rope_scaling=None, bos_token_id=1, eos_token_id=(2,), pad_token_id=0)
BATCH, SEQ = 4, 512


def ours(ids: np.ndarray, steps: int) -> float:
  cfg = l4.Config(text=BENCH)
  ocfg = run_config.OptimConfig(lr=1e-4, warmup_steps=1)
  tx, lr = optim.make(ocfg, cfg, 1000)
  loss_fn = pretrain.make_loss(cfg, jnp.float32, False, 0.0, 0.0)
  fn = jax.jit(step_lib.make_train_step(loss_fn, tx, lr), donate_argnums=0)
  state = step_lib.init_state(jax.jit(l4.init_params, static_argnums=0)(cfg, jax.random.key(0)), tx)
  batch = {"tokens": jnp.asarray(ids), "segment_ids": jnp.ones_like(ids),
           "positions": jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), ids.shape)}
  for _ in range(2):  # compile + warm up
    state, m = fn(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = fn(state, batch)
  jax.block_until_ready(m)
  return BATCH * SEQ * steps / (time.perf_counter() - t0)


def hf(ids: np.ndarray, steps: int) -> float:
  import torch
  import transformers
  from llama4_jax import config as config_lib
  torch.manual_seed(0)
  hf_cfg = transformers.Llama4TextConfig(**config_lib.text_to_hf(BENCH))
  model = transformers.Llama4ForCausalLM(hf_cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  x = torch.as_tensor(ids, dtype=torch.long)

  def step():
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
  for _ in range(2):
    step()
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  return BATCH * SEQ * steps / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--skip-hf", action="store_true")
  args = parser.parse_args()
  ids = np.random.RandomState(0).randint(0, BENCH.vocab_size, (BATCH, SEQ)).astype(np.int32)
  peak = metrics.measure_matmul_peak(jnp.float32, n=2048, repeats=3)
  flops = metrics.train_flops_per_token(BENCH, SEQ)
  tok_s = ours(ids, args.steps)
  print(f"device: {jax.devices()[0].device_kind}, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
  print(f"model FLOPs per token (train): {flops / 1e6:.1f} M")
  print(f"llama4-jax : {tok_s:8.1f} tok/s  MFU {tok_s * flops / peak:6.1%}")
  if not args.skip_hf:
    hf_tok_s = hf(ids, max(args.steps // 2, 3))
    print(f"HF (torch) : {hf_tok_s:8.1f} tok/s  MFU {hf_tok_s * flops / peak:6.1%}")
    print(f"ratio      : {tok_s / hf_tok_s:.2f}x")


if __name__ == "__main__":
  main()
