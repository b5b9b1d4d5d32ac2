"""The training core: one trace, exact resume after SIGKILL, SIGTERM, accumulation, schedules."""
import dataclasses
import json
import random
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import transformers

import llama4_jax as l4
from llama4_jax.config import text_to_hf
from train import config as config_lib, convert, loop, losses, optim, params as params_lib, step as step_lib
from train.stages import lm as pretrain
from train_util import TINY, train_process, write_recipe


def _losses(workdir) -> dict:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, xla_cache):
  """An uninterrupted 12-step run in a subprocess (also fills the compilation cache)."""
  root = tmp_path_factory.mktemp("ref")
  proc = train_process(write_recipe(root / "r.yaml", root / "work"), xla_cache)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  return root / "work"


def test_in_process_run_traces_once_and_writes_everything(tmp_path):
  cfg = config_lib.from_dict(config_lib.RunConfig,
                             {**TINY, "workdir": str(tmp_path), "steps": 6, "report": True})
  before = step_lib.TRACE_COUNT["train_step"]
  record = loop.run(cfg)
  assert step_lib.TRACE_COUNT["train_step"] == before + 1
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(6)) and record["step"] == 5
  for key in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu", "expert_counts"):
    assert key in rows[-1]
  assert np.asarray(rows[-1]["expert_counts"]).shape == (2, 4)
  counts = np.asarray(rows[-1]["expert_counts"], np.float64)  # max / mean load per MoE layer
  np.testing.assert_allclose(rows[-1]["expert_load_max_mean"], counts.max(1) / counts.mean(1),
                             rtol=1e-4)
  assert all(1.0 <= r <= 4.0 for r in rows[-1]["expert_load_max_mean"])
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert (tmp_path / "report.png").stat().st_size > 10_000
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4", "6"]


def test_log_every_throttles_the_metrics_log(tmp_path):
  cfg = config_lib.from_dict(config_lib.RunConfig,
                             {**TINY, "workdir": str(tmp_path), "steps": 7, "log_every": 3})
  record = loop.run(cfg)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [0, 3, 6] and record["step"] == 6


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, reference_run, xla_cache):
  recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "work")
  kill_after = random.Random(time.time_ns()).randint(2, 9)  # a random step, reported on failure
  proc = train_process(recipe, xla_cache)
  metrics = tmp_path / "work" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, f"run ended before the kill at step {kill_after}"
  resumed = train_process(recipe, xla_cache)
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out
  want, got = _losses(reference_run), _losses(tmp_path / "work")
  assert sorted(got) == sorted(want) == list(range(12))
  assert got == want, f"killed after {kill_after} steps"


def test_sigterm_saves_then_resumes_on_a_two_device_mesh(tmp_path, reference_run, xla_cache):
  recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "work")
  proc = train_process(recipe, xla_cache)
  metrics = tmp_path / "work" / "metrics.jsonl"
  while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143, out  # not "finished": a `&&` chain or a scheduler must see it
  stopped_at = max(_losses(tmp_path / "work")) + 1
  assert f"llama4-train: interrupted at step {stopped_at}, checkpoint saved" in out
  saved = sorted(int(p.name) for p in (tmp_path / "work" / "checkpoints").iterdir() if p.name.isdigit())
  stopped_at = max(_losses(tmp_path / "work")) + 1
  assert saved[-1] == stopped_at < 12, "the state after the last logged step is saved"
  # Restart on a (data 2) mesh: the checkpoint is restored onto the new sharding.
  resumed = train_process(recipe, xla_cache, "--set", "mesh.data=2", devices=2)
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out
  want, got = _losses(reference_run), _losses(tmp_path / "work")
  assert sorted(got) == list(range(12))
  for s in range(stopped_at):
    assert got[s] == want[s]
  # data parallel sums the batch in another order: equal to float32 rounding, not bitwise
  np.testing.assert_allclose([got[s] for s in range(stopped_at, 12)],
                             [want[s] for s in range(stopped_at, 12)], rtol=2e-5)


def test_a_training_checkpoint_exports_to_hf(tmp_path, reference_run):
  step = reference_run / "checkpoints" / "12"
  out = convert.orbax_to_hf(step, tmp_path / "hf", progress=False)
  cfg_back, params = l4.load_hf(out)
  recipe = config_lib.from_dict(config_lib.RunConfig, TINY).model.build()
  assert text_to_hf(cfg_back.text) == text_to_hf(recipe.text)
  trained = ocp.StandardCheckpointer().restore(step / "state")["params"]
  assert trained["embed"].dtype == np.float32
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, trained))
  assert transformers.Llama4ForCausalLM.from_pretrained(out).config.num_local_experts == 4


def test_a_stage_starts_from_the_last_stages_training_checkpoint(tmp_path, reference_run):
  """Mid-training: 4x the sequence length, bf16 params, from WORKDIR/checkpoints/STEP."""
  step = reference_run / "checkpoints" / "12"
  run = config_lib.from_dict(config_lib.RunConfig, {
      **TINY, "data": {**TINY["data"], "seq_len": 128},
      "model": {**TINY["model"], "init_from_checkpoint": str(step), "param_dtype": "bfloat16"}})
  model_cfg = run.model.build()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  loaded = params_lib.initial_params(run, model_cfg, sharding)
  trained = ocp.StandardCheckpointer().restore(step / "state")["params"]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a), np.asarray(b).astype(jnp.bfloat16)), loaded, trained)
  other = config_lib.from_dict(config_lib.RunConfig, {**TINY, "model": {
      **TINY["model"], "text": {"num_local_experts": 8},
      "init_from_checkpoint": str(step)}})
  with pytest.raises(ValueError, match=r"its config differs .* in \['num_local_experts'\]"):
    params_lib.initial_params(other, other.model.build(), sharding)
  with pytest.raises(FileNotFoundError, match="neither a converted checkpoint"):
    params_lib.initial_params(dataclasses.replace(run, model=dataclasses.replace(
        run.model, init_from_checkpoint=str(tmp_path))), model_cfg, sharding)


def test_initial_params_from_a_hf_checkpoint(tmp_path):
  cfg = config_lib.from_dict(config_lib.RunConfig, TINY)
  model_cfg = cfg.model.build()
  params = l4.init_params(model_cfg, jax.random.key(3))
  l4.save_hf(tmp_path / "hf", model_cfg, params)
  run = config_lib.from_dict(config_lib.RunConfig, {**TINY, "model": {
      **TINY["model"], "init_from_hf": str(tmp_path / "hf")}})
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  loaded = params_lib.initial_params(run, model_cfg, sharding)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  other = config_lib.from_dict(config_lib.RunConfig, {**TINY, "model": {
      "preset": "tiny", "text": {"vocab_size": 280, "pad_token_id": 0},
      "init_from_hf": str(tmp_path / "hf")}})
  with pytest.raises(ValueError, match=r"its config differs from the recipe.s model in \[.pad_token_id., .vocab_size.\]"):
    params_lib.initial_params(other, other.model.build(), sharding)


def _setup(accum):
  cfg = config_lib.from_dict(config_lib.RunConfig, TINY)
  model_cfg = cfg.model.build()
  tx, lr = optim.make(cfg.optim, model_cfg, 10)
  # z-loss is a per-token sum, so accumulation is exact; the load-balance loss is per microbatch
  loss_fn = pretrain.make_loss(model_cfg, jnp.float32, False, 1e-4, 0.0)
  params = l4.init_params(model_cfg, jax.random.key(0))
  return step_lib.make_train_step(loss_fn, tx, lr, accum), step_lib.init_state(params, tx)


def test_gradient_accumulation_equals_the_full_batch():
  rng = np.random.RandomState(0)
  seg = np.repeat(np.asarray([[1] * 20 + [2] * 10 + [0] * 2]), 4, axis=0)
  batch = {"tokens": jnp.asarray(rng.randint(0, 258, (4, 32)), jnp.int32),
           "segment_ids": jnp.asarray(seg, jnp.int32),
           "positions": jnp.asarray(np.concatenate([np.arange(20), np.arange(10), [0, 0]])[None].repeat(4, 0), jnp.int32)}
  outs = []
  for accum in (1, 4):
    step_fn, state = _setup(accum)
    outs.append(jax.jit(step_fn)(state, batch))
  for state, m in outs[1:]:
    np.testing.assert_allclose(m["loss"], outs[0][1]["loss"], rtol=1e-6)
    np.testing.assert_array_equal(m["expert_counts"], outs[0][1]["expert_counts"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 state.params, outs[0][0].params)


def test_bf16_params_keep_fp32_optimizer_state_and_one_rounding_per_step():
  cfg = config_lib.from_dict(config_lib.RunConfig, TINY)
  model_cfg = cfg.model.build()
  tx, lr = optim.make(cfg.optim, model_cfg, 10)
  loss_fn = pretrain.make_loss(model_cfg, jnp.bfloat16, False, 0.0, 0.0, loss_chunk=8)
  params16 = l4.init_params(model_cfg, jax.random.key(0), jnp.bfloat16)
  state = step_lib.init_state(params16, tx)
  assert {a.dtype for a in jax.tree.leaves(state.opt_state) if a.ndim} == {jnp.dtype(jnp.float32)}
  rng = np.random.RandomState(0)
  batch = {"tokens": jnp.asarray(rng.randint(0, 258, (4, 32)), jnp.int32),
           "segment_ids": jnp.ones((4, 32), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (4, 32))}
  step_fn = jax.jit(step_lib.make_train_step(loss_fn, tx, lr))
  new, m = step_fn(*step_fn(state, batch)[:1], batch)  # step 0 has lr 0 (warmup)
  assert {a.dtype for a in jax.tree.leaves(new.params)} == {jnp.dtype(jnp.bfloat16)}
  # the update is applied in fp32 to the fp32 view of the params and rounded once
  mu = new.opt_state[2].mu  # Adam's first moment (after freezing and clipping), fp32
  assert mu["embed"].dtype == jnp.float32 and float(jnp.abs(mu["embed"]).max()) > 0
  assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
  # matrices move; norm weights at 1.0 do not: an update below half a bf16 ulp (2**-8) rounds away,
  # which is why fp32 params are the default
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, params16)
  assert changed["embed"] and changed["blocks"][1]["moe"]["gate"] and changed["lm_head"]
  assert not changed["final_norm"]


def test_schedules():
  o = config_lib.OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd")
  wsd = optim.schedule(o, 100)
  assert [float(wsd(s)) for s in (0, 5, 10, 50, 79, 100)] == pytest.approx([0, 0.5, 1, 1, 1, 0.1])
  cos = optim.schedule(config_lib.OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), 100)
  assert float(cos(10)) == pytest.approx(1.0) and float(cos(100)) == pytest.approx(0.1)
  assert float(cos(55)) == pytest.approx(0.55, abs=1e-6)


def test_decay_mask_skips_norms_only():
  mask = optim.decay_mask(l4.presets.tiny())
  assert mask["final_norm"] is False and mask["blocks"][0]["attn_norm"] is False
  assert mask["embed"] is True and mask["blocks"][1]["moe"]["gate"] is True


def test_targets_stay_inside_documents_and_loss_mask():
  batch = {"tokens": jnp.asarray([[5, 6, 7, 8, 9, 0]]),
           "segment_ids": jnp.asarray([[1, 1, 1, 2, 2, 0]]),
           "loss_mask": jnp.asarray([[0, 0, 1, 1, 1, 0]])}
  targets, weights = losses.next_token_targets(batch)
  assert targets.tolist() == [[6, 7, 8, 9, 0, 0]]
  # 7 -> 8 crosses documents; 9 -> pad is padding; loss_mask drops the target 6
  assert weights.tolist() == [[0, 1, 0, 1, 0, 0]]


def test_chunked_cross_entropy_equals_whole_rows():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 16, 8), jnp.float32)
  w = jnp.asarray(rng.randn(8, 50), jnp.float32)
  targets = jnp.asarray(rng.randint(0, 50, (2, 16)))
  weights = jnp.asarray(rng.rand(2, 16) > 0.3, jnp.float32)

  def loss(x, w, chunk):
    return losses.chunked_cross_entropy(lambda h: h @ w, x, targets, weights, 1e-3, chunk)[0]
  whole, whole_grads = jax.value_and_grad(loss, (0, 1))(x, w, 0)
  want = losses.cross_entropy(x @ w, targets, weights, 1e-3)[0]
  np.testing.assert_allclose(whole, want, rtol=0, atol=0)
  for chunk in (4, 8):
    got, got_grads = jax.value_and_grad(loss, (0, 1))(x, w, chunk)
    np.testing.assert_allclose(got, whole, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_grads,
                 whole_grads)


def test_a_restart_reads_every_program_from_the_workdirs_compile_cache(tmp_path):
  """`llama4-train`'s default cache, WORKDIR/compile_cache: a second process running the same
  recipe (another workdir pointed at that cache) compiles and exports nothing new, nor a third
  given a copy of the cache at another path (keys hold no path), and the runs record their time
  to the first step (`startup_s`; cold vs warm: README, "Step efficiency")."""
  import os
  import shutil
  import subprocess
  import sys
  from train_util import FAST_COMPILE
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}"
  cache, moved = tmp_path / "a" / "compile_cache", tmp_path / "elsewhere" / "cache"

  def run_recipe(name: str, cache_dir, **extra) -> list[str]:
    """Runs recipe `name` in its own workdir; the entries of `cache_dir` afterwards."""
    recipe = write_recipe(tmp_path / f"{name}.yaml", tmp_path / name, steps=2, **extra)
    subprocess.run([sys.executable, "-m", "train", str(recipe)], env=env, check=True,
                   capture_output=True)
    first = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["startup_s"] > 0
    return sorted(p.name for p in cache_dir.iterdir())
  entries = [run_recipe("a", cache), run_recipe("b", cache, compile_cache=str(cache))]
  shutil.copytree(cache, moved)
  entries.append(run_recipe("c", moved, compile_cache=str(moved)))
  assert entries[0] and entries[1] == entries[0]  # every program of the restart was a cache hit
  assert entries[2] == entries[0]  # and of the run given the cache at another path
  # one exported train step, written by "a", read back by "b" and "c" (train/step_cache.py)
  assert [len(list((d / "steps").iterdir())) for d in (cache, moved)] == [1, 1]
  assert not (tmp_path / "b" / "compile_cache").exists()
