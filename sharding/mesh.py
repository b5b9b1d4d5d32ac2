"""Mesh configuration: axis sizes (data, fsdp, expert, tensor, context) -> a `jax.sharding.Mesh`,
and how the MoE crosses the expert axis (`sharding.expert`).

Sizes multiply to the number of devices; one axis may be -1, meaning "the remaining devices".
Errors are raised before anything is compiled.
"""
import dataclasses
import math

import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "expert", "tensor", "context")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = 1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  context: int = 1
  expert_dispatch: str = "all_to_all"  # all_to_all | all_gather (sharding/expert.py)
  expert_capacity: float = 2.0  # all_to_all's first-pass slots, x the balanced share (>= 1)

  def __post_init__(self):
    sizes = self.sizes()
    if sum(v == -1 for v in sizes.values()) > 1:
      raise ValueError(f"mesh {sizes}: at most one axis may be -1")
    bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
    if bad:
      raise ValueError(f"mesh axis sizes must be >= 1 or -1, got {bad}")
    if self.expert_dispatch not in ("all_to_all", "all_gather"):
      raise ValueError(f"mesh.expert_dispatch={self.expert_dispatch!r}: expected all_to_all or "
                       f"all_gather")
    if not 1.0 <= self.expert_capacity < float("inf"):
      raise ValueError(f"mesh.expert_capacity={self.expert_capacity}: must be >= 1 (the slot "
                       f"holds that many times the balanced share of the assignments)")

  def sizes(self) -> dict[str, int]:
    return {a: getattr(self, a) for a in AXES}


def resolve(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Axis sizes with -1 filled in; their product must be `num_devices`."""
  sizes = cfg.sizes()
  known = math.prod(v for v in sizes.values() if v != -1)
  for a, v in sizes.items():
    if v == -1:
      if num_devices % known:
        raise ValueError(f"mesh {sizes}: {num_devices} devices are not divisible by {known}")
      sizes[a] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh {sizes}: the axis sizes multiply to {math.prod(sizes.values())}, "
                     f"but there are {num_devices} devices")
  return sizes


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  """A mesh over all (or the given) devices, axes in AXES order, GSPMD (Auto) axis types."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = resolve(cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  try:
    grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, NotImplementedError, ValueError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))
