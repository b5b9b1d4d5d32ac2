"""What the model is given to run on a mesh (`l4.Hooks`): activation sharding constraints from
the RULES table, the expert-parallel MoE, context-parallel attention and the target's kernels."""
import jax
from jax.sharding import Mesh, NamedSharding

import llama4_jax as l4
from sharding import context, expert, kernels
from sharding.rules import spec_for


def constrain_fn(mesh: Mesh):
  """(activation, logical axes) -> the activation constrained to the table's sharding."""
  mesh_shape = dict(mesh.shape)

  def constrain(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    spec = spec_for(f"activation {axes}", x.shape, axes, mesh_shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return constrain


def hooks(mesh: Mesh, attention: str = "auto", grouped_matmul: str = "auto",
          dispatch: str = "all_to_all", capacity: float = 2.0, scan: bool = True) -> l4.Hooks:
  """Hooks for `l4.apply` on `mesh`: constraints at block boundaries, around the MoE and on the
  logits; expert-parallel dispatch when the expert axis is > 1; context-parallel attention when
  the context axis is > 1; the flash kernel and grouped matmul of the mesh's platform (or the
  given ones, checked against it); `dispatch` and `capacity` as `mesh.expert_dispatch` and
  `mesh.expert_capacity`; `scan` as `model.scan_layers`."""
  ffn = kernels.expert_ffn(mesh, grouped_matmul)
  return l4.Hooks(moe_fn=expert.moe_fn(mesh, ffn, dispatch, capacity), constrain=constrain_fn(mesh),
                  attend_fn=context.attend_fn(mesh), flash_fn=kernels.flash_fn(mesh, attention),
                  scan=scan)
