"""The train step exported next to the compilation cache, so a restart neither traces nor lowers it.

jax's persistent compilation cache (`workdir.use_compile_cache`) spares a restart the XLA compile,
but jax still traces the step and lowers it to StableHLO to find its cache key: on the quickstart
that is 2.4 s of tracing and 1.5 s of lowering in a 8.9 s warm start. `Step` exports the step once
(`jax.export`: StableHLO serialized with flatbuffers, no pickle) under a key of everything that
shapes the program. A later run with the same key deserializes it and compiles the same module,
which the compilation cache then serves.

The key hashes the recipe (less its workdir and cache paths), the source files of the `llama4_jax`,
`sharding` and `train` packages, the versions of jax, jaxlib, flax and optax, the jax flags that
change tracing, the devices, and every argument's shape, dtype and sharding. Code outside those
(a monkeypatch) is not in it: delete `compile_cache/steps/` after such a change.
"""
import functools
import hashlib
import importlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Callable

import jax

_PACKAGES = ("llama4_jax", "sharding", "train")
_LIBRARIES = ("jax", "jaxlib", "flax", "optax")
_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
          "jax_threefry_partitionable", "jax_use_shardy_partitioner", "jax_numpy_dtype_promotion",
          "jax_numpy_rank_promotion", "jax_enable_checks")


@functools.cache
def code_key() -> str:
  """sha256 of the packages' sources and the libraries' versions (read once per process)."""
  h = hashlib.sha256()
  for name in _PACKAGES:
    root = Path(importlib.import_module(name).__file__).parent
    for path in sorted(root.rglob("*.py")):
      h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
  for lib in _LIBRARIES:
    h.update(f"{lib}=={importlib.metadata.version(lib)}\0".encode())
  return h.hexdigest()


def recipe_key(recipe: dict) -> dict:
  """The recipe as it shapes the step: its workdir and compile-cache paths left out."""
  return {k: v for k, v in recipe.items() if k not in ("workdir", "compile_cache")}


class Step:
  """`train_step(state, batch) -> (state, metrics)`, the jitted `fn` run through its export in
  `directory`: read back when a run with the same key wrote it, else exported there by the first
  call. The state is donated as `fn`'s is."""

  def __init__(self, fn: Callable, state_shardings, batch_sharding, recipe: dict,
               directory: Path):
    self.fn, self.recipe, self.directory = fn, recipe_key(recipe), Path(directory)
    self.shardings = (jax.tree.leaves(state_shardings), batch_sharding)
    self.treedef, self.call, self.path = None, None, None

  def __call__(self, state, batch):
    if self.call is None:
      self.treedef = jax.tree.structure(state)
      self.call = self._load_or_export(jax.tree.leaves(state), batch)
    leaves, metrics = self.call(jax.tree.leaves(state), batch)
    return jax.tree.unflatten(self.treedef, leaves), metrics

  def key(self, leaves, batch) -> str:
    args = [(tuple(x.shape), str(x.dtype), str(x.sharding))
            for x in jax.tree.leaves((leaves, batch))]
    devices = [(d.id, d.process_index, d.device_kind) for d in jax.devices()]
    flags = {flag: repr(getattr(jax.config, flag, None)) for flag in _FLAGS}  # as of this call
    blob = json.dumps([code_key(), flags, self.recipe, args, devices], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]

  def _flat(self) -> Callable:
    """`fn` over the state's leaves (jax.export serializes lists and dicts, not TrainState)."""
    def flat(leaves, batch):
      state, metrics = self.fn(jax.tree.unflatten(self.treedef, leaves), batch)
      return jax.tree.leaves(state), metrics
    return jax.jit(flat, in_shardings=self.shardings, out_shardings=(self.shardings[0], None),
                   donate_argnums=0)

  def _load_or_export(self, leaves, batch) -> Callable:
    self.path = self.directory / f"{self.key(leaves, batch)}.jaxexport"
    exported = None
    if self.path.exists():
      try:
        exported = jax.export.deserialize(bytearray(self.path.read_bytes()))
      except Exception as e:  # a torn or foreign file: exported again below
        print(f"{self.path}: unreadable ({type(e).__name__}: {e}); exporting the step again")
    if exported is None:
      try:
        exported = jax.export.export(self._flat())(leaves, batch)
      except Exception as e:  # e.g. a host callback in the step: it runs as it is
        print(f"train step not exported ({type(e).__name__}: {str(e)[:200]}); a restart "
              f"traces it again")
        self.path = None
        return self._flat()
      self._write(exported.serialize())
    return jax.jit(exported.call, donate_argnums=0)

  def _write(self, blob: bytes) -> None:
    """Atomically: a reader sees the whole export or none (hosts sharing the workdir included)."""
    self.directory.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, self.path)
