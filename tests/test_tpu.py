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
