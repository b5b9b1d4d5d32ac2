"""A ragged all-to-all into fixed slots: the one communication primitive of expert dispatch.

Contract (`exchange`): every device of `axis` (n devices, this one at index i) sends the rows
x[starts[j] : starts[j] + sizes[j]] to device j, with sizes[j] <= slot; on device j they land in
rows [i * slot, i * slot + sizes[j]) of a [n * slot, ...] result whose other rows are zero.
`recv[i]` is what device i sends here (sizes transposed over the axis), which the ragged
collective needs and the dense one does not.

Two implementations of that contract:
- `ragged=True`: `jax.lax.ragged_all_to_all` (TPU, GPU): only the sizes[j] rows move.
- `ragged=False`: one dense `jax.lax.all_to_all` of n zero-padded slots of `slot` rows (XLA:CPU in
  jaxlib 0.10 has no ragged-all-to-all): n * slot rows move whatever the sizes.
Both are linear in `x` and differentiable (the transpose of each is the same exchange reversed),
and the dense one runs on fake CPU devices, so the offset arithmetic around them is tested there.
"""
import jax
import jax.numpy as jnp


def exchange(x: jax.Array, starts: jax.Array, sizes: jax.Array, recv: jax.Array, slot: int,
             axis: str, ragged: bool) -> jax.Array:
  """See the module docstring: x [R, ...] -> [n * slot, ...] (n = size of `axis`)."""
  n = starts.shape[0]
  if ragged:
    out = jnp.zeros((n * slot, *x.shape[1:]), x.dtype)
    here = jnp.full((n,), jax.lax.axis_index(axis) * slot, jnp.int32)  # where mine land on j
    return jax.lax.ragged_all_to_all(x, out, starts.astype(jnp.int32), sizes.astype(jnp.int32),
                                     here, recv.astype(jnp.int32), axis_name=axis)
  rows = starts[:, None] + jnp.arange(slot)[None, :]  # [n, slot] rows of x for each destination
  keep = jnp.arange(slot)[None, :] < sizes[:, None]
  rows = jnp.where(keep, rows, x.shape[0])  # out of range: filled with zeros
  padded = x.at[rows.reshape(-1)].get(mode="fill", fill_value=0)
  return jax.lax.all_to_all(padded, axis, 0, 0, tiled=True)
