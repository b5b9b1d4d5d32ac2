"""sharding: device meshes and the ONE table from logical parameter axes to mesh axes.

The model (`llama4_jax`) only names its axes (`l4.param_specs`); this package decides where they
live. Only this package touches JAX sharding APIs.
"""
from sharding import context, expert, kernels, report
from sharding.activations import constrain_fn, hooks
from sharding.mesh import AXES, MeshConfig, make_mesh, resolve
from sharding.rules import (RULES, batch_sharding, named, one_device, param_shardings,
                            partition_specs, replicated, replicated_like, spec_for,
                            state_shardings, tree_shardings)

__all__ = ["AXES", "MeshConfig", "RULES", "batch_sharding", "constrain_fn", "expert", "hooks",
           "kernels", "make_mesh", "report", "named", "one_device", "param_shardings", "partition_specs", "replicated",
           "replicated_like", "resolve", "spec_for", "state_shardings", "tree_shardings"]
