"""Frozen-weight memory of QLoRA (int4 block matrices + bf16 scales) against the bf16 base, and the
adapters' size, for Scout and Maverick's text models: exact byte counts from the abstract trees
(`jax.eval_shape`: nothing is allocated).

    python benchmarks/qlora_memory.py [--rank 16] [--group 64]
"""
import argparse
import dataclasses

import jax
import jax.numpy as jnp

import llama4_jax as l4
from train import lora
from train.config import LoraConfig


def sizes(cfg: l4.Config, lcfg: LoraConfig) -> dict:
  base = jax.eval_shape(lambda: l4.init_params(cfg, jax.random.key(0), jnp.bfloat16))
  frozen = jax.eval_shape(lambda b: lora.freeze(b, lcfg), base)
  adapters = jax.eval_shape(lambda: lora.init_adapters(cfg, lcfg, jax.random.key(0)))
  blocks_bf16, blocks_int4 = l4.quant.nbytes(base["blocks"]), l4.quant.nbytes(frozen["blocks"])
  return {"bf16": l4.quant.nbytes(base), "qlora_frozen": l4.quant.nbytes(frozen),
          "blocks_ratio": blocks_int4 / blocks_bf16, "adapters_fp32": l4.quant.nbytes(adapters)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--group", type=int, default=64)
  args = parser.parse_args()
  lcfg = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, quantize=True, group_size=args.group)
  gib = 2 ** 30
  for name, preset in (("scout", l4.presets.scout), ("maverick", l4.presets.maverick)):
    cfg = dataclasses.replace(preset(), vision=None)
    s = sizes(cfg, lcfg)
    print(f"{name:9s} frozen bf16 {s['bf16'] / gib:7.1f} GiB -> QLoRA {s['qlora_frozen'] / gib:6.1f}"
          f" GiB (x{s['qlora_frozen'] / s['bf16']:.3f} overall; block matrices "
          f"x{s['blocks_ratio']:.4f}); adapters r={args.rank} fp32 {s['adapters_fp32'] / gib:.2f} GiB")


if __name__ == "__main__":
  main()
