"""The train step compiled by the TPU compiler (libtpu AOT, no TPU needed) for a small v5p slice:
splash attention and the accelerator grouped matmul in the program, memory figures from the TPU
compiler, flash below the XLA path's temporaries on a long row; topology and kernel errors before
compiling."""
import importlib.util
import os
import re

import pytest

from train import plan

if importlib.util.find_spec("libtpu") is None:
  if os.environ.get("LLAMA4_REQUIRE_TPU_COMPILER"):
    raise RuntimeError("libtpu is not installed but LLAMA4_REQUIRE_TPU_COMPILER is set "
                       "(pip install -e '.[tpu]')")
  pytest.skip("libtpu is not installed (pip install -e '.[tpu]')", allow_module_level=True)

TOPOLOGY = "v5p:2x2x1"  # 4 chips
# 2 layer groups of 4 (chunked RoPE + NoPE, MoE + dense), 16 experts over `expert`, Scout's head
# size, rows of 1024 tokens in 4 chunks, bf16 compute, remat: what the pod recipes run, small
# (about 40 s + 55 s of compiling on 2 cores).
REDUCED = ("model.text.num_hidden_layers=8", "model.text.num_local_experts=16",
           "model.text.hidden_size=256", "model.text.head_dim=128",
           "model.text.num_attention_heads=4", "model.text.num_key_value_heads=2",
           "model.text.attention_chunk_size=256", "data.seq_len=1024", "data.batch_size=4",
           "mesh.data=2", "mesh.expert=2", "model.compute_dtype=bfloat16", "model.remat=true")


@pytest.fixture(scope="module")
def compiled():
  """attention kind -> (plan figures, optimized HLO)."""
  out = {}
  for kind in ("splash", "xla"):
    overrides = REDUCED + (f"model.attention={kind}",)
    step = plan.compile_step("configs/quickstart.yaml", overrides, TOPOLOGY)
    out[kind] = (plan.figures("configs/quickstart.yaml", *step, TOPOLOGY), step[2].as_text())
  return out


@pytest.mark.slow
def test_the_program_holds_the_tpu_kernels(compiled):
  figures, hlo = compiled["splash"]
  assert figures["attention"] == "splash" and figures["devices"] == 4
  assert re.search(r"splash_mha_fwd_segmented", hlo) and re.search(r"splash_mha_dkv", hlo)
  assert "ragged_dot" in hlo or "ragged-dot" in hlo  # the MoE's grouped matmul, not dense blocks
  assert "ragged-all-to-all" in hlo  # mesh.expert=2: the all-to-all dispatch
  assert "splash" not in compiled["xla"][1]


@pytest.mark.slow
def test_tpu_memory_figures_and_flash_below_the_xla_path(compiled):
  splash, xla = compiled["splash"][0], compiled["xla"][0]
  for p in (splash, xla):
    assert 0 < p["params_bytes"] < p["argument_bytes"] < p["peak_bytes"] < p["hbm_bytes"]
    assert p["temp_bytes"] > 0 and p["flops"] > 0 and p["step_s_lower_bound"] > 0
    assert p["collective_bytes"]["all-reduce"] + p["collective_bytes"]["reduce-scatter"] > 0
  assert splash["temp_bytes"] < xla["temp_bytes"]
  assert splash["flops"] == xla["flops"]  # model FLOPs do not depend on the kernel


@pytest.mark.parametrize("overrides,topology,culprit", [
    ((), "v7x:2x2", "--topology 'v7x:2x2'"),
    ((), "v5p-8", "--topology 'v5p-8': expected GEN:AxB"),
    (("mesh.data=8",), TOPOLOGY, "there are 4 devices"),
    (("model.attention=gpu_flash", "mesh.data=4"), TOPOLOGY, "gpu_flash runs on gpu devices"),
    (("model.attention=splash", "mesh.data=1", "mesh.context=4"), TOPOLOGY,
     "context parallelism runs the XLA path"),
])
def test_bad_targets_fail_before_compiling(overrides, topology, culprit):
  with pytest.raises(ValueError, match=re.escape(culprit)):
    plan.plan("configs/quickstart.yaml", overrides, topology)


def test_splash_is_refused_on_cpu_devices():
  with pytest.raises(ValueError, match="splash runs on tpu devices, this mesh's are cpu"):
    plan.plan("configs/quickstart.yaml", ("model.attention=splash",))


def test_all_to_all_dispatch_compiles_to_ragged_all_to_all_for_tpu():
  """The MoE layer alone on (expert 4) of v5p:2x2x1: ragged-all-to-all moves the tokens (no
  all-gather of activations), its buffers within 2x the lower bound; the overflow pass apart."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  import sharding as sh
  from llama4_jax import moe
  from train import hlo
  d, f, e, tokens, k = 256, 512, 8, 512, 1
  mesh = sh.make_mesh(sh.MeshConfig(expert=4), plan.topology_devices(TOPOLOGY))
  fn = sh.expert.moe_fn(mesh, moe.expert_ffn_ragged, "all_to_all")
  shapes = {"router": (d, e), "gate": (e, d, f), "up": (e, d, f), "down": (e, f, d),
            "shared_gate": (d, f), "shared_up": (d, f), "shared_down": (f, d)}
  spec = lambda n: P("expert") if n in ("gate", "up", "down") else P()
  p = {n: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, spec(n)))
       for n, s in shapes.items()}
  x = jax.ShapeDtypeStruct((4, tokens, d), jnp.bfloat16, sharding=sh.batch_sharding(mesh))
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(fn(p, x, k)[0].astype(jnp.float32)), (0, 1)))
  with jax.set_mesh(mesh), jax.default_matmul_precision("default"):  # as `plan.compile_step`
    text = grad.lower(p, x).compile().as_text()
  assert "ragged-all-to-all" in text
  sent = hlo.collective_bytes(text, 4)
  bound = k * tokens * d * 2  # bf16, each way
  assert 0 < sent["ragged-all-to-all"] <= 2 * 4 * bound  # 4 ways: dispatch, combine, transposes
  assert sent["all-to-all"] < 0.01 * bound  # offsets for the transposes' ragged exchanges
  assert not [l for l in text.splitlines()
              if re.search(r"all-gather(-start)?\(", l) and re.search(r"\bbf16\[\d+,256\]", l)]
  assert hlo.collective_bytes(text, 4, conditional=True)["ragged-all-to-all"] > 0
