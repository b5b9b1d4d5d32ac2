"""Faults a long run meets: corrupt or torn checkpoints, a torn metrics log, divergence to NaN,
a second run on the same workdir, a recipe changed under a workdir. Nothing is ever deleted, the
run either resumes from the newest good state or stops with one line naming the cause."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from guard_util import one_line_error, snapshot
from train import __main__ as train_main, config as config_lib, loop
from train_util import TINY, train_process, write_recipe


def _cfg(workdir, **over) -> config_lib.RunConfig:
  d = yaml.safe_load(yaml.safe_dump(TINY))
  d.update({"workdir": str(workdir), "steps": 6, **over})
  return config_lib.from_dict(config_lib.RunConfig, d)


def _losses(workdir) -> dict:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 6-step run with checkpoints 2, 4, 6."""
  workdir = tmp_path_factory.mktemp("trained") / "work"
  loop.run(_cfg(workdir))
  assert _steps(workdir) == [2, 4, 6]
  return workdir


def _copy(trained, tmp_path):
  work = tmp_path / "work"
  shutil.copytree(trained, work)
  for name in ("config.json", "run.json"):  # they record the workdir: point them at the copy
    for f in work.rglob(name):
      f.write_text(f.read_text().replace(str(trained), str(work)))
  return work


DAMAGE = {
    "truncated arrays": lambda d: [f.write_bytes(f.read_bytes()[:7]) for f in (d / "state").rglob("*")
                                   if f.is_file() and not f.name.startswith("_")],
    "missing state": lambda d: shutil.rmtree(d / "state"),
    "bad iterator file": lambda d: [f.write_text("{not json") for f in (d / "data").rglob("*")
                                    if f.is_file() and not f.name.startswith("_")],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_corrupt_newest_checkpoint_is_moved_aside_and_the_previous_one_used(
    trained, tmp_path, capsys, damage):
  work = _copy(trained, tmp_path)
  DAMAGE[damage](work / "checkpoints" / "6")
  loop.run(_cfg(work))
  err = capsys.readouterr().err
  assert "checkpoint step 6 cannot be restored" in err and "trying the step before it" in err
  aside = list((work / "checkpoints.corrupt").iterdir())
  assert [p.name.split("-")[0] for p in aside] == ["6"]  # kept, not deleted
  assert _steps(work) == [2, 4, 6]
  # steps 4 and 5 were recomputed from checkpoint 4: bit-identical to the first time
  assert _losses(work) == _losses(trained)


def test_an_interrupted_save_is_ignored_on_resume(trained, tmp_path):
  """What kill -9 during an async save leaves: a step folder orbax never committed."""
  work = _copy(trained, tmp_path)
  torn = work / "checkpoints" / "8.orbax-checkpoint-tmp-1234567"
  shutil.copytree(work / "checkpoints" / "6", torn)
  (torn / "_CHECKPOINT_METADATA").unlink(missing_ok=True)
  loop.run(_cfg(work, steps=8))
  assert _steps(work) == [4, 6, 8] and sorted(_losses(work)) == list(range(8))
  assert not torn.exists()  # the uncommitted temporary is cleaned


def test_a_torn_metrics_line_is_repaired(trained, tmp_path, capsys):
  work = _copy(trained, tmp_path)
  with open(work / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "loss": 1.2')  # a kill in the middle of a write
  loop.run(_cfg(work, steps=8))
  assert "dropped a torn last line" in capsys.readouterr().err
  assert sorted(_losses(work)) == list(range(8))


def test_a_bad_metrics_line_in_the_middle_is_named(trained, tmp_path, capsys):
  work = _copy(trained, tmp_path)
  lines = (work / "metrics.jsonl").read_text().splitlines()
  lines[2] = lines[2][:20]
  (work / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  recipe = write_recipe(tmp_path / "r.yaml", work, steps=8)
  before = snapshot(work)
  assert train_main.main([str(recipe)]) == 2
  assert "metrics.jsonl:3: not JSON" in one_line_error(capsys.readouterr().err,
                                                                 "llama4-train")
  assert snapshot(work) == before


def test_a_changed_model_cannot_resume_a_workdir(trained, tmp_path, capsys):
  work = _copy(trained, tmp_path)
  recipe = write_recipe(tmp_path / "r.yaml", work, steps=8)
  before = snapshot(work)
  assert train_main.main([str(recipe), "--set", "model.text.intermediate_size=48"]) == 2
  line = one_line_error(capsys.readouterr().err, "llama4-train")
  assert "trained with different ['text.intermediate_size']" in line, line
  assert snapshot(work) == before


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(trained, tmp_path, capsys):
  work = _copy(trained, tmp_path)
  recipe = write_recipe(tmp_path / "r.yaml", work, steps=8)
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (work / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
    before = snapshot(work)
    assert train_main.main([str(recipe)]) == 2
    line = one_line_error(capsys.readouterr().err, "llama4-train")
    assert f"in use by another run (pid {sleeper.pid}" in line
    assert snapshot(work) == before
  finally:
    sleeper.kill()
    sleeper.wait()
  assert train_main.main([str(recipe)]) == 0  # its process is gone: the lock is stale
  assert _steps(work)[-1] == 8 and not (work / ".lock").exists()


@pytest.mark.slow
def test_two_concurrent_runs_the_second_is_refused(tmp_path, capsys):
  work = tmp_path / "work"
  recipe = write_recipe(tmp_path / "r.yaml", work, steps=2000)
  first = train_process(recipe, tmp_path / "cache")
  try:
    deadline = time.time() + 240
    while not (work / "metrics.jsonl").exists() and time.time() < deadline:
      time.sleep(0.1)
    assert first.poll() is None
    assert train_main.main([str(recipe)]) == 2
    assert "in use by another run" in one_line_error(capsys.readouterr().err, "llama4-train")
  finally:
    first.kill()
    first.wait()


def _all_finite(step_dir) -> bool:
  state = ocp.StandardCheckpointer().restore(step_dir / "state")
  return all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state["params"]))


def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
  """lr 1e30: step 1's update blows the weights up, step 2's gradient is NaN."""
  work = tmp_path / "work"
  recipe = write_recipe(tmp_path / "r.yaml", work, steps=30, checkpoint={"every": 1, "keep": 1},
                        optim={"lr": 1e30, "warmup_steps": 2})
  assert train_main.main([str(recipe)]) == 2
  line = one_line_error(capsys.readouterr().err, "llama4-train")
  assert "step 2: grad_norm nan" in line and "newest checkpoint: step 2" in line
  records = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [0, 1, 2] and records[-1]["nonfinite"] == 1
  assert _steps(work) == [2] and _all_finite(work / "checkpoints" / "2")


def test_skip_nonfinite_skips_bad_steps_without_updating_then_stops(tmp_path, capsys):
  work = tmp_path / "work"
  recipe = write_recipe(tmp_path / "r.yaml", work, steps=30, checkpoint={"every": 1, "keep": 10},
                        optim={"lr": 1e30, "warmup_steps": 2, "skip_nonfinite": 2})
  assert train_main.main([str(recipe)]) == 2
  line = one_line_error(capsys.readouterr().err, "llama4-train")
  assert "step 4:" in line and "2 skipped before it" in line
  records = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r.get("skipped_steps") for r in records] == [None, None, 1, 2, 3]
  assert _steps(work) == [1, 2, 3, 4]  # the skipped steps' states: the last finite params
  restore = lambda s: ocp.StandardCheckpointer().restore(work / "checkpoints" / str(s) / "state")
  for s in (3, 4):
    jax.tree.map(np.testing.assert_array_equal, restore(s)["params"], restore(2)["params"])


def test_exporting_into_the_workdir_is_refused_and_destroys_nothing(trained, tmp_path, capsys):
  """The reported data loss: `orbax-to-hf WD/checkpoints/6 WD` replaced the workdir."""
  from train import convert
  work = _copy(trained, tmp_path)
  before = snapshot(tmp_path)
  for out in (work, work / "checkpoints", work / "checkpoints" / "6"):
    for extra in ([], ["--overwrite"]):
      assert convert.main(["orbax-to-hf", str(work / "checkpoints" / "6"), str(out), *extra]) == 2
      line = one_line_error(capsys.readouterr().err, "llama4-convert")
      assert "the input" in line and "choose another output path" in line
  assert snapshot(tmp_path) == before
