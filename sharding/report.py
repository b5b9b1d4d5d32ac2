"""Sharding-rule reports, computed from mesh axis sizes alone (no devices, no compile): where every
parameter lives, what one device holds, and helpers for asserting properties in a user's tests.

    rows = sharding.report.placements(l4.presets.scout(), {"fsdp": 64, "expert": 16}, "bfloat16")
    assert not sharding.report.replicated_above(rows, 2**20)      # nothing over 1 MiB everywhere
    assert all("expert" in r.mesh_axes for r in rows if r.axes[:2] == ("layers", "experts"))
"""
import math
from typing import Mapping, NamedTuple

import jax
import numpy as np

import llama4_jax as l4
from sharding import rules


class Placement(NamedTuple):
  """One parameter: its path, shape, logical axes, PartitionSpec, and bytes in all / per device."""
  name: str
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  spec: jax.sharding.PartitionSpec
  total_bytes: int
  device_bytes: int

  @property
  def mesh_axes(self) -> tuple[str, ...]:
    """The mesh axes the parameter is split over (empty: every device holds all of it)."""
    return tuple(a for part in self.spec if part for a in ((part,) if isinstance(part, str) else part))


def placements(cfg: l4.Config, mesh_shape: Mapping[str, int], dtype="bfloat16") -> list[Placement]:
  """Every parameter of `cfg` on a mesh of `mesh_shape` (axis -> size), stored as `dtype`."""
  itemsize = np.dtype(jax.numpy.dtype(dtype)).itemsize
  specs = rules.partition_specs(cfg, mesh_shape)
  out = []
  for (path, s), spec in zip(jax.tree_util.tree_flatten_with_path(l4.param_specs(cfg),
                                                                  is_leaf=l4.is_spec)[0],
                             jax.tree.leaves(specs, is_leaf=lambda x: isinstance(
                                 x, jax.sharding.PartitionSpec))):
    split = [math.prod(mesh_shape[a] for a in ((p,) if isinstance(p, str) else p or ()))
             for p in spec] + [1] * (len(s.shape) - len(spec))
    shard = math.prod(-(-d // k) for d, k in zip(s.shape, split))
    out.append(Placement(jax.tree_util.keystr(path), tuple(s.shape), tuple(s.axes), spec,
                         math.prod(s.shape) * itemsize, shard * itemsize))
  return out


def replicated_above(rows: list[Placement], nbytes: int) -> list[str]:
  """Names of parameters larger than `nbytes` that every device holds whole."""
  return [r.name for r in rows if not r.mesh_axes and r.total_bytes > nbytes]


def table(rows: list[Placement], replicated_over: int = 2**20) -> str:
  """A text report: one line per parameter, then the replicated ones over `replicated_over`
  bytes and the totals."""
  width = max(len(r.name) for r in rows)
  lines = [f"{'parameter':<{width}}  {'shape':<22} {'logical axes':<40} {'PartitionSpec':<38} "
           f"{'per device':>12}"]
  for r in rows:
    lines.append(f"{r.name:<{width}}  {str(r.shape):<22} {','.join(r.axes):<40} "
                 f"{str(tuple(r.spec)):<38} {_size(r.device_bytes):>12}")
  big = replicated_above(rows, replicated_over)
  lines.append(f"replicated on every device and over {_size(replicated_over)}: "
               f"{', '.join(big) if big else 'none'}")
  total, device = sum(r.total_bytes for r in rows), sum(r.device_bytes for r in rows)
  lines.append(f"params: {_size(total)} in all, {_size(device)} per device "
               f"({total / device:.1f}x split)")
  return "\n".join(lines)


def _size(n: int) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"
