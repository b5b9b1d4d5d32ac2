"""THE table from logical axis names to mesh axes, and the shardings it implies.

Parameters carry logical axes (`l4.param_specs`); RULES maps each to mesh axes. Expert weights
[E, D, F] land on (expert, fsdp, tensor); other weights shard D over (fsdp, expert), so every
weight is split over all non-data devices; the batch is split over (data, fsdp, expert). A mesh
axis of size 1 is dropped from the spec, so one table serves every mesh.
"""
import math
from typing import Mapping

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import llama4_jax as l4
from llama4_jax import quant

RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp", "expert"),  # expert weights already use `expert` for E: fsdp only there
    "norm": (),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "expert": ("expert",),
    "router": (),
    # the vision tower (~0.9B params): widths over fsdp, MLP/heads over expert x tensor
    "vision_patch": (),
    "vision_pos": (),
    "vision_embed": ("fsdp",),
    "vision_heads": ("tensor",),
    "vision_mlp": ("expert", "tensor"),
    "vision_proj": ("fsdp", "expert"),
    "bias": (),
    "lora_rank": (),  # LoRA adapters (train/lora.py): their other axis follows the weight's
    # activations (the model's `ACTIVATION_AXES`, logits): the batch as above, the residual
    # stream's width replicated (fsdp shards weights, not activations)
    "seq": ("context",),
    "kv_seq": (),  # attention masks' key axis: every key of the row
    "vision_tokens": (),  # a tile's patches: tiles are the vision tower's batch
    "act_embed": (),
}


def spec_for(name: str, shape: tuple[int, ...], axes: tuple[str, ...],
             mesh_shape: Mapping[str, int]) -> P:
  """PartitionSpec of one array with logical `axes`; non-dividing sizes are an error. A mesh axis
  serves the first dimension that asks for it (e.g. `expert` for E, not again for embed)."""
  parts, used = [], set()
  for dim, logical in zip(shape, axes):
    if logical not in RULES:
      raise ValueError(f"{name}: logical axis {logical!r} has no rule; known: {sorted(RULES)}")
    mesh_axes = tuple(a for a in RULES[logical] if mesh_shape.get(a, 1) > 1 and a not in used)
    used.update(mesh_axes)
    size = math.prod(mesh_shape[a] for a in mesh_axes)
    if dim % size:
      raise ValueError(f"{name}: axis {logical!r} of size {dim} is not divisible by mesh axes "
                       f"{mesh_axes} of total size {size}")
    parts.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return P(*parts)


def partition_specs(cfg: l4.Config, mesh_shape: Mapping[str, int]) -> dict:
  """PartitionSpec for every leaf of `l4.init_params(cfg, ...)`, for mesh axis sizes only (no
  devices needed: golden tests check pod-sized meshes on a laptop)."""
  specs = l4.param_specs(cfg)
  paths, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=l4.is_spec)
  out = [spec_for(jax.tree_util.keystr(p), s.shape, s.axes, mesh_shape) for p, s in paths]
  return jax.tree.unflatten(treedef, out)


def param_shardings(cfg: l4.Config, mesh: Mesh) -> dict:
  """NamedSharding for every leaf of `l4.init_params(cfg, ...)`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      partition_specs(cfg, dict(mesh.shape)),
                      is_leaf=lambda x: isinstance(x, P))


def tree_shardings(tree: dict, cfg: l4.Config, mesh: Mesh) -> dict:
  """NamedSharding for every array of a params tree whose leaves may be quantized (QLoRA's int4
  frozen base, FP8 experts): a `QTensor`'s packed/scale arrays and an `FP8Tensor`'s values keep
  the weight's axes; an FP8 scale's size-1 input axis is not split ("norm": replicated)."""
  def one(path, x, axes):
    return named(mesh, jax.tree_util.keystr(path), x.shape, axes)

  def leaf(path, x, axes):
    if isinstance(x, quant.QTensor):
      return quant.QTensor(one(path, x.packed, axes), one(path, x.scale, axes), x.group)
    if isinstance(x, quant.FP8Tensor):
      return quant.FP8Tensor(one(path, x.values, axes),
                             one(path, x.scale, (*axes[:-2], "norm", axes[-1])))
    return one(path, x, axes)
  return jax.tree_util.tree_map_with_path(leaf, tree, l4.param_axes(cfg),
                                          is_leaf=quant.is_quantized)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, T] inputs: the batch over (data, fsdp, expert)."""
  axes = tuple(a for a in RULES["batch"] if mesh.shape[a] > 1)
  return NamedSharding(mesh, P(axes or None))


def state_shardings(tx: optax.GradientTransformation, abstract_opt_state, param_sh, mesh: Mesh):
  """Optimizer-state shardings: moments like their params, everything else replicated."""
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, param_sh,
                               transform_non_params=lambda _: replicated)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def replicated_like(sh: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """Replicated over `sh`'s mesh (a single-device sharding is its own)."""
  return replicated(sh.mesh) if isinstance(sh, NamedSharding) else sh


def named(mesh: Mesh, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> NamedSharding:
  """The sharding of one array `name` with logical `axes` on `mesh` (the table's)."""
  return NamedSharding(mesh, spec_for(name, shape, axes, dict(mesh.shape)))


def one_device() -> jax.sharding.Sharding:
  """The first local device alone (what a host-side measure or conversion runs on)."""
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
