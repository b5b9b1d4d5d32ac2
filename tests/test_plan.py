"""llama4-plan on full Scout (no allocation) against a test-sized simulated mesh, in a subprocess
(the fake device count must be set before jax starts)."""
import json
import subprocess
import sys

import llama4_jax as l4

ARGS = ["configs/scout/pretrain.yaml", "--devices", "16", "--set", "mesh.fsdp=4", "--set",
        "mesh.expert=4", "--set", "data.batch_size=16", "--set", "data.seq_len=256",
        "--set", "model.param_dtype=bfloat16"]  # bf16 params, fp32 optimizer state


def _plan(*extra):
  return subprocess.run([sys.executable, "-m", "train.plan", *ARGS, *extra], capture_output=True,
                        text=True, timeout=400)


def test_plan_full_scout_on_16_simulated_devices():
  proc = _plan("--json")
  assert proc.returncode == 0, proc.stderr[-3000:]
  p = json.loads(proc.stdout)
  scout = l4.presets.scout()
  assert p["params"] == l4.param_count(l4.Config(text=scout.text)) == 107_769_861_120
  assert p["mesh"] == {"data": 1, "fsdp": 4, "expert": 4, "tensor": 1, "context": 1}
  # bf16 params split 16 ways (norms, a few MB, replicated); fp32 Adam moments: 4x the params
  assert 2 * p["params"] / 16 <= p["params_bytes"] < 2 * p["params"] / 16 * 1.001
  assert 4 * p["params_bytes"] <= p["optimizer_bytes"] < 4 * p["params_bytes"] + 1024
  assert p["argument_bytes"] >= p["params_bytes"] + p["optimizer_bytes"]
  assert p["alias_bytes"] >= p["params_bytes"] + p["optimizer_bytes"]  # donated state
  assert p["temp_bytes"] > 0
  assert p["peak_bytes"] == (p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"]
                             + p["temp_bytes"])


def test_plan_refuses_a_mesh_that_does_not_fit_the_devices():
  proc = _plan("--set", "mesh.expert=8")
  assert proc.returncode == 2
  assert "multiply to 32, but there are 16 devices" in proc.stderr


def test_plan_refuses_an_unknown_topology_in_one_line():
  proc = subprocess.run([sys.executable, "-m", "train.plan", "configs/quickstart.yaml",
                         "--topology", "v9:4x4"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("llama4-plan:")]
  assert len(errors) == 1 and "--topology 'v9:4x4': expected GEN:AxB" in errors[0]
  assert "Traceback" not in proc.stderr
