"""Kernels chosen by the mesh's devices (the target), not by the host that compiles: the flash
attention kernel and the MoE grouped matmul, with the recipe's explicit choice checked against
the target. Flash kernels (Mosaic/Triton) cannot be auto-partitioned, so they run per device
under `shard_map`: batch split like the activations, heads over `tensor`.
"""
from functools import partial

import jax
from jax.sharding import Mesh, PartitionSpec as P

from llama4_jax import flash, moe
from sharding.rules import RULES

ATTENTION = {"tpu": "splash", "gpu": "gpu_flash", "cpu": "xla"}  # auto, by platform
MATMUL = {"tpu": "ragged_dot", "gpu": "ragged_dot", "cpu": "blocked"}
FLASH = {"splash": (flash.splash, "tpu"), "gpu_flash": (flash.gpu_flash, "gpu")}
FFN = {"ragged_dot": moe.expert_ffn_ragged, "blocked": moe.expert_ffn_blocked}


def platform(mesh: Mesh) -> str:
  """tpu | gpu | cpu: what the mesh's devices are."""
  name = mesh.devices.flat[0].platform.lower()
  return "gpu" if name in ("gpu", "cuda", "rocm") else name


def attention_kind(mesh: Mesh, choice: str) -> str:
  """The attention path for `choice` (auto | xla | splash | gpu_flash) on `mesh`."""
  target = platform(mesh)
  kind = ATTENTION.get(target, "xla") if choice == "auto" else choice
  if kind in FLASH and FLASH[kind][1] != target:
    raise ValueError(f"model.attention={choice}: {kind} runs on {FLASH[kind][1]} devices, this "
                     f"mesh's are {target} (use auto or xla)")
  if kind != "xla" and mesh.shape["context"] > 1:
    if choice != "auto":
      raise ValueError(f"model.attention={choice} with mesh.context={mesh.shape['context']}: "
                       f"context parallelism runs the XLA path (use auto or xla)")
    return "xla"
  return kind


def flash_fn(mesh: Mesh, choice: str = "auto"):
  """`l4.Hooks.flash_fn` for `mesh`, or None for the XLA path."""
  kind = attention_kind(mesh, choice)
  if kind == "xla":
    return None
  batch = tuple(a for a in RULES["batch"] if mesh.shape[a] > 1) or None
  heads = "tensor" if mesh.shape["tensor"] > 1 else None
  tokens, ids = P(batch, None, heads), P(batch, None)

  def fn(q, k, v, ids_BT, window):
    body = partial(FLASH[kind][0], window=window)
    return jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens, ids),
                         out_specs=tokens, check_vma=False)(q, k, v, ids_BT)
  return fn


def expert_ffn(mesh: Mesh, choice: str = "auto"):
  """The MoE grouped matmul for `choice` (auto | ragged_dot | blocked) on `mesh`."""
  return FFN[MATMUL.get(platform(mesh), "ragged_dot") if choice == "auto" else choice]
