"""Test hygiene in one place: rank promotion is an error, fp32 matmuls are exact fp32, and XLA
spends little time optimising code for models this small (it compiles more than it runs)."""
import os
import tempfile

from train_util import FAST_COMPILE  # noqa: E402  (tests/ is on sys.path: rootdir conftest)
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
# libtpu (the [tpu] extra) compiles for TPU topologies; tests run on the CPU, several at once
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

# Identical programs compiled again (a new jit of the same function, another test's run of the
# same recipe) are read back from a per-run on-disk cache instead (shared by the xdist workers).
jax.config.update("jax_compilation_cache_dir", os.environ.setdefault(
    "LLAMA4_TEST_COMPILATION_CACHE", tempfile.mkdtemp(prefix="llama4-jax-compile-cache-")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

import llama4_jax as l4  # noqa: E402

# One compiled forward shared by every test (config and flags are static).
apply_jit = jax.jit(l4.apply, static_argnums=0,
                    static_argnames=("remat", "return_hidden", "hooks"))
extend_jit = jax.jit(l4.extend, static_argnums=0)


@pytest.fixture(scope="session")
def hf_causal(tmp_path_factory):
  """variant name -> (HF Llama4ForCausalLM, its save_pretrained directory), built once."""
  import hf_reference as ref
  cache = {}

  def get(name: str):
    if name not in cache:
      model = ref.causal_lm(ref.VARIANTS[name], seed=sorted(ref.VARIANTS).index(name) + 1)
      path = tmp_path_factory.mktemp(f"hf_{name}")
      model.save_pretrained(path)
      cache[name] = (model, path)
    return cache[name]
  return get
